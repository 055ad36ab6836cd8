import numpy as np
import pytest

from tbps.data_pipeline.noise import apply_noise, noise_source
from tbps.data_pipeline.schema import Record


@pytest.mark.parametrize("n", [1000, 68126, 37])
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_exact_count_and_a_true_permutation(n, rate):
    src = noise_source(n, rate, seed=1)
    assert sorted(src.tolist()) == list(range(n))           # every caption used exactly once
    assert int((src != np.arange(n)).sum()) == int(np.floor(rate * n))


def test_nested_across_rates_and_deterministic():
    n = 5000
    sets = [set(np.flatnonzero(noise_source(n, r, seed=7) != np.arange(n))) for r in
            (0.2, 0.5, 0.8)]
    assert sets[0] < sets[1] < sets[2]
    assert np.array_equal(noise_source(n, 0.5, 7), noise_source(n, 0.5, 7))
    assert not np.array_equal(noise_source(n, 0.5, 7), noise_source(n, 0.5, 8))


def test_zero_rate_and_bad_rates():
    assert np.array_equal(noise_source(10, 0.0, 0), np.arange(10))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="noise rate"):
            noise_source(10, bad, 0)
    with pytest.raises(ValueError, match="one pair"):
        noise_source(10, 0.15, 0)


def test_records_keep_image_and_pid_and_record_the_source():
    recs = [Record(split="train", index=i, pid=i // 2, raw_id=i // 2, image_id=i,
                   image_path=f"{i}.jpg", caption=f"caption {i}") for i in range(100)]
    out = apply_noise(recs, 0.5, seed=0)
    noisy = [r for r in out if r.noisy]
    assert len(noisy) == 50
    for r in out:
        orig = recs[r.index]
        assert (r.pid, r.image_path, r.image_id) == (orig.pid, orig.image_path, orig.image_id)
        assert r.caption == recs[r.caption_src].caption
        assert r.caption_pid == recs[r.caption_src].pid
        assert r.noisy == (r.caption_src != r.index)
