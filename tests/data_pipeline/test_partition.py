"""The loader's split of work over ranks and workers, its seeds and its tar reader's edge cases.

    python -m pytest -q tests/data_pipeline/test_partition.py
"""
import io
import tarfile

import numpy as np
import pytest

from tbps.data_pipeline.partition import balanced_counts, eval_share, train_share
from tbps.data_pipeline.seeds import seed_of
from tbps.data_pipeline.tar_reader import _read_range, _read_range_tarfile


def test_balanced_counts():
    assert balanced_counts(17, 5) == [4, 4, 3, 3, 3]
    assert balanced_counts(3, 5) == [1, 1, 1, 0, 0]
    assert sum(balanced_counts(1001, 7)) == 1001


@pytest.mark.parametrize("num_batches,workers", [(15, 2), (7, 3), (4, 4), (9, 1)])
def test_train_shares_tile_each_rank_range_batch_aligned(num_batches, workers):
    B = 8
    for rank in range(3):
        for start_batch in range(num_batches + 1):
            shares = [train_share(num_batches, B, rank, w, workers, start_batch)
                      for w in range(workers)]
            assert sorted(role for role, *_ in shares) == list(range(workers))
            covered = sorted((start, start + quota) for _, start, quota, _ in shares)
            assert covered[0][0] == rank * num_batches * B
            assert covered[-1][1] == (rank + 1) * num_batches * B
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
            assert all(start % B == 0 for _, start, _, _ in shares)
            assert sum(done for *_, done in shares) == start_batch


@pytest.mark.parametrize("n,world,workers", [(37, 2, 2), (5, 3, 2), (100, 4, 3), (1, 1, 1)])
def test_eval_shares_take_every_sample_once(n, world, workers):
    taken = [i for r in range(world) for w in range(workers)
             for i in range(*eval_share(n, r, world, w, workers))]
    assert taken == list(range(n))


def test_seed_of_is_numpy_seed_sequence_of_the_parts():
    for parts in [(), (0,), (3, 1, 0, 1), (2**40, 7), (2**64 - 1,)]:
        expected = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
        assert seed_of(*parts) == expected
    assert seed_of(np.int64(5), np.uint32(2)) == seed_of(5, 2)
    assert seed_of(0, 1, 2, 3) == 3898271682            # fixed: past runs' shuffles depend on it
    assert seed_of(1, 2) != seed_of(2, 1)


def _tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = {"comment": "extended"}
            tar.addfile(info, io.BytesIO(data))


def test_extended_header_inside_a_sample_restarts_at_that_sample(tmp_path):
    path = tmp_path / "mid.tar"
    members = [(f"s{k}.{ext}", b"%s%d" % (ext.encode(), k), k == 2 and ext == "json")
               for k in range(5) for ext in ("jpg", "json")]
    _tar(path, members, tarfile.PAX_FORMAT)
    for first, end in ((0, 5), (1, 3), (2, 4), (3, 5)):
        got = list(_read_range(path, first, end))
        assert got == list(_read_range_tarfile(path, first, end))
        assert [s["__key__"] for s in got] == [f"s{k}" for k in range(first, end)]
        assert all(s["json"] == b"json" + s["__key__"][1:].encode() for s in got)


def test_a_tar_cut_at_a_block_boundary_is_a_read_error_too(tmp_path):
    path = tmp_path / "whole.tar"
    _tar(path, [(f"s{k}.{ext}", bytes(700), False) for k in range(3) for ext in ("jpg", "json")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:512 * 12])          # s0, s1 whole; s2 and the end gone
    got = []
    with pytest.raises(tarfile.ReadError, match="no end-of-archive block"):
        for sample in _read_range(cut, 0, 3):
            got.append(sample["__key__"])
    assert got == ["s0"]          # s1 may have had more members: not taken as whole
    assert [s["__key__"] for s in _read_range(path, 0, 3)] == ["s0", "s1", "s2"]


def test_truncated_tar_ends_with_a_read_error_after_the_whole_samples(tmp_path):
    path = tmp_path / "whole.tar"
    _tar(path, [(f"s{k}.{ext}", bytes(700), False) for k in range(3) for ext in ("jpg", "json")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:512 * 13 + 100])     # members of 3 blocks: s2.jpg's data
    got = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for sample in _read_range(cut, 0, 3):
            got.append(sample["__key__"])
    assert got == ["s0", "s1"]
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):   # skipped, not read
        list(_read_range(cut, 3, 4))
    assert [s["__key__"] for s in _read_range(cut, 0, 2)] == ["s0", "s1"]
