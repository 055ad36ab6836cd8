"""Collectives over torch.distributed (no accelerate, no DeepSpeed): what the losses, the
metrics and the loop exchange between ranks. Every function is the identity on one process.

`gather_with_grad` is an autograd all_gather: each rank computes its own rows against every
rank's keys, and the backward sums the keys' gradients back to their owners.
"""
from __future__ import annotations

import datetime
import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of x, differentiable back to every rank's x.

    torch.distributed.nn's all_gather: synchronous, and its backward (a reduce-scatter, done as
    an all-to-all where the backend has none, as gloo) sums each key's gradients from every rank
    back to its owner."""
    if world_size() == 1:
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # "use the functional collectives"
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimension differs between ranks."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather_nograd(n).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = gather_nograd(padded).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (elementwise; an all-reduce, no host read)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_varlen_list(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), as a list in rank order."""
    if world_size() == 1:
        return [x]
    sizes = all_gather_object(int(x.numel()))
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank when `flag` (a bool tensor on the training device) is true on any:
    one all-reduce and one host read."""
    if world_size() == 1:
        return bool(flag)
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopAgreement:
    """Every rank's stop request (a signal it got), agreed on at every optimizer step without
    waiting for it: `poll(local)` starts an all-reduce (MAX) of this step's flag and returns the
    result of the previous step's, which has long arrived. Every rank calls it once a step, so
    all see the same answer at the same step and stop together, one step after the request
    reached the last of them. The flag travels as a CPU tensor over gloo (the default group on
    CPU; a gloo side group next to NCCL), so reading it never waits for the GPU."""

    def __init__(self, timeout_s: float):
        self.group, self.pending = None, None
        if world_size() > 1:
            if dist.get_backend() == "gloo":
                self.group = dist.group.WORLD
            else:
                self.group = dist.new_group(backend="gloo",
                                            timeout=datetime.timedelta(seconds=timeout_s))

    def poll(self, local: bool) -> bool:
        if self.group is None:
            return local
        agreed = self._result()
        flag = torch.tensor([int(local)], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group,
                                        async_op=True), flag)
        return agreed

    def close(self) -> bool:
        """Wait for the last all-reduce (before a stop or the end); its result."""
        return self._result()

    def _result(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()
        return bool(flag.item())
