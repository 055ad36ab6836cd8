"""Data problems count whichever rank met them: the loader's counters of every rank are summed
before they reach log.jsonl and metrics.json (2 gloo processes against the sum)."""
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import free_port, init_gloo

COUNTS = [{"corrupt_shard": 0, "bad_sample": 1, "bad_image": 0, "padded": 0},
          {"corrupt_shard": 1, "bad_sample": 0, "bad_image": 2, "padded": 12}]


def _worker(rank, port, out):
    from tbps.trainer.train import Run

    init_gloo(rank, port, 2)
    stats = SimpleNamespace(snapshot=lambda: dict(COUNTS[rank]))
    fake = SimpleNamespace(loader=SimpleNamespace(stats=stats))
    out[rank] = Run._data_problems(fake)
    dist.destroy_process_group()


def test_every_ranks_data_problems_are_summed():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(free_port(), out), nprocs=2, start_method="spawn")
        got = dict(out)
    want = {k: COUNTS[0][k] + COUNTS[1][k] for k in COUNTS[0]}
    assert got == {0: want, 1: want}
