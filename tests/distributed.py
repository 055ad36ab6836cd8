"""Helpers of the tests that start their own gloo process groups (no accelerate)."""
import os
import socket

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int) -> None:
    """Join a CPU process group of `world` ranks on localhost:port."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
