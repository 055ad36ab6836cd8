import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from tbps.data_pipeline.bench import run_bench
from tbps.data_pipeline.loader import (
    EvalLoader,
    LoaderConfig,
    LoaderStats,
    TrainLoader,
    _mp_context,
    _read_range,
    _read_range_tarfile,
    decode_image,
    ranges_of,
    read_pieces,
)
from tbps.data_pipeline.manifest import ShardInfo, read_manifest, read_meta
from tbps.data_pipeline.sharding import ShardOptions, shard_dataset
from tbps.data_pipeline.transforms import TrainAugment

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

CFG = dict(image_size=(96, 32), shuffle_buffer=32)


def _epoch(root, tok, epoch, *, rank=0, world=2, workers=2, batch=8, start=0, loader=None):
    loader = loader or TrainLoader(root, tok, LoaderConfig(batch_size=batch, num_workers=workers,
                                                           **CFG), rank=rank, world_size=world)
    return [b for b in loader.epoch(epoch, start)], loader


def test_two_ranks_two_workers_see_every_sample_once(shard_root, tokenizer):
    orders = {}
    for rank in range(2):
        loader = TrainLoader(shard_root, tokenizer, LoaderConfig(batch_size=8, num_workers=2, **CFG),
                             rank=rank, world_size=2)
        assert loader.num_batches == 15                       # 240 // (8 x 2)
        for epoch in range(2):                                # persistent workers, two epochs
            batches = list(loader.epoch(epoch))
            assert len(batches) == 15
            orders[rank, epoch] = torch.cat([b["index"] for b in batches]).tolist()
        assert loader.stats.snapshot() == dict.fromkeys(loader.stats.KINDS, 0)
    for epoch in range(2):
        seen = Counter(orders[0, epoch] + orders[1, epoch])
        assert sorted(seen) == list(range(240)) and set(seen.values()) == {1}
    assert orders[0, 0] != orders[0, 1]                       # order changes between epochs
    again, _ = _epoch(shard_root, tokenizer, 1, rank=0)
    assert torch.cat([b["index"] for b in again]).tolist() == orders[0, 1]   # not between runs
    b = again[0]
    assert b["image"].shape == (8, 96, 32, 3) and b["image"].dtype == torch.uint8
    assert b["erase"].shape == (8, 4) and b["input_ids"].shape == (8, 77)
    assert b["pid"].dtype == torch.long and b["noisy"].dtype == torch.bool


def test_batch_matches_manifest(shard_root, tokenizer):
    rows = {r["index"]: r for r in read_manifest(shard_root, split="train").to_pylist()}
    batches, _ = _epoch(shard_root, tokenizer, 0, world=1, workers=0)
    for b in batches[:3]:
        for i, idx in enumerate(b["index"].tolist()):
            assert b["pid"][i] == rows[idx]["pid"]
            assert b["image_id"][i] == rows[idx]["image_id"]
            assert np.array_equal(b["input_ids"][i].numpy(), tokenizer.encode(rows[idx]["caption"]))


def test_uneven_shards_give_equal_batch_counts(tmp_path, synth_root, tokenizer):
    out = tmp_path / "uneven"
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=50), progress=False)
    sizes = [s["num_samples"] for s in read_meta(out)["splits"]["train"]["shards"]]
    assert len(set(sizes)) > 1
    seen = Counter()
    for rank in range(2):
        batches, loader = _epoch(out, tokenizer, 0, rank=rank, batch=7)
        assert len(batches) == loader.num_batches == 240 // 14
        seen.update(torch.cat([b["index"] for b in batches]).tolist())
    assert set(seen.values()) == {1} and len(seen) == 17 * 14


def test_too_few_shards_fails_at_start(tmp_path, synth_root, tokenizer):
    out = tmp_path / "few"
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=100), progress=False)
    with pytest.raises(ValueError, match="smaller --shard-size"):
        TrainLoader(out, tokenizer, LoaderConfig(batch_size=8, num_workers=2, **CFG), rank=0,
                    world_size=2)


def _rewrite(path, edit):
    """Rewrite a tar, passing each (name, bytes) through edit (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_padded(shard_copy, tokenizer):
    shards = [s["name"] for s in read_meta(shard_copy)["splits"]["train"]["shards"]]
    rows = read_manifest(shard_copy, split="train").to_pylist()
    keys = {name: [r for r in rows if r["shard"] == name] for name in shards}
    lost = set()
    # a truncated tar: cut in the middle of the 8th sample's image
    path = shard_copy / shards[0]
    with tarfile.open(path) as tar:
        member = tar.getmembers()[2 * 7]
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    lost |= {r["index"] for r in keys[shards[0]][7:]}
    # an undecodable image, a sample without caption, a broken json
    bad_img, no_cap, bad_json = keys[shards[1]][3], keys[shards[2]][5], keys[shards[3]][0]
    _rewrite(shard_copy / shards[1], lambda n, d: b"garbage" if n == bad_img["key"] + ".jpg" else d)
    _rewrite(shard_copy / shards[2], lambda n, d: json.dumps(
        {k: v for k, v in json.loads(d).items() if k != "caption"}).encode()
        if n == no_cap["key"] + ".json" else d)
    _rewrite(shard_copy / shards[3], lambda n, d: b"{not json" if n == bad_json["key"] + ".json" else d)
    lost |= {bad_img["index"], no_cap["index"], bad_json["index"]}

    batches, loader = _epoch(shard_copy, tokenizer, 0, world=1, workers=2, batch=8)
    assert len(batches) == loader.num_batches == 30
    seen = Counter(torch.cat([b["index"] for b in batches]).tolist())
    assert set(seen) == set(range(240)) - lost                 # everything else is intact
    stats = loader.stats.snapshot()
    assert stats["corrupt_shard"] == 1 and stats["bad_image"] == 1 and stats["bad_sample"] >= 2
    assert stats["padded"] == 240 - len(set(seen)) == sum(seen.values()) - len(seen)


def test_resume_mid_epoch_yields_the_same_tail(shard_root, tokenizer):
    full, loader = _epoch(shard_root, tokenizer, 4, world=1, workers=2)
    for start in (3, 8):
        tail, _ = _epoch(shard_root, tokenizer, 4, world=1, workers=2, start=start,
                         loader=loader)
        assert len(tail) == len(full) - start
        for a, b in zip(full[start:], tail):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("modality", ["text", "image"])
def test_eval_loader_yields_each_sample_once_across_ranks(shard_root, tokenizer, modality):
    rows = read_manifest(shard_root, split="test").to_pylist()
    want = sorted({r["image_id"]: r["index"] for r in reversed(rows)}.values()) \
        if modality == "image" else sorted(r["index"] for r in rows)
    got = []
    for rank in range(3):
        loader = EvalLoader(shard_root, tokenizer, LoaderConfig(batch_size=5, num_workers=2, **CFG),
                            split="test", modality=modality, rank=rank, world_size=3)
        for b in loader:
            got += b["index"].tolist()
            assert ("image" in b) == (modality == "image")
    assert sorted(got) == want


def test_augmented_images_follow_the_per_sample_law_whatever_the_workers(shard_root, tokenizer):
    """Each image is flip -> pad -> crop of its decoded sample, drawn from (seed, epoch, index):
    the same bytes with 0 or 2 workers, and equal to a plain numpy reference."""
    aug = TrainAugment(pad=4, erase_p=1.0)
    images = {}
    for workers in (0, 2):
        cfg = LoaderConfig(batch_size=8, num_workers=workers, augment=aug, seed=7, **CFG)
        for b in TrainLoader(shard_root, tokenizer, cfg).epoch(3):
            for i, idx in enumerate(b["index"].tolist()):
                got = (b["image"][i].numpy(), tuple(b["erase"][i].tolist()))
                assert images.setdefault(idx, got)[1] == got[1]
                assert np.array_equal(images[idx][0], got[0])
    shards = [ShardInfo(**s) for s in read_meta(shard_root)["splits"]["train"]["shards"]]
    raw = read_pieces(ranges_of(shards, 0, 40), shard_root, LoaderStats(_mp_context()), 100)
    for s in raw:
        idx = int(json.loads(s["json"])["index"])
        img = decode_image(s["jpg"], (96, 32))
        geometry, box = aug.draw(96, 32, np.random.default_rng([7, 3, idx, 0xA06]))
        src = img[:, ::-1] if geometry.flip else img
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        ref = padded[4 + geometry.dy:4 + geometry.dy + 96, 4 + geometry.dx:4 + geometry.dx + 32]
        assert np.array_equal(images[idx][0], ref) and images[idx][1] == box


def test_pin_memory_is_an_option_defaulting_to_cuda(shard_root, tokenizer, monkeypatch):
    cfg = LoaderConfig(batch_size=8, num_workers=0, **CFG)
    assert cfg.pin == torch.cuda.is_available()
    assert TrainLoader(shard_root, tokenizer, LoaderConfig(batch_size=8, num_workers=0,
                                                           pin_memory=True, **CFG)
                       )._loader.pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.pin and not LoaderConfig(batch_size=8, pin_memory=False, **CFG).pin
    assert EvalLoader(shard_root, tokenizer, cfg, split="test", modality="text")._loader.pin_memory


def test_tar_reader_matches_tarfile_and_falls_back_for_pax(tmp_path, shard_root):
    name = read_meta(shard_root)["splits"]["train"]["shards"][0]["name"]
    path = shard_root / name
    for first, end in ((0, 16), (5, 9)):
        assert list(_read_range(path, first, end)) == list(_read_range_tarfile(path, first, end))
    # a pax tar (long member names) is read by tarfile from the sample where the fast reader stops
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        for k in range(4):
            for ext, data in (("jpg", b"img%d" % k), ("json", b"{}")):
                key = f"s{k}" if k < 2 else "s" + "x" * 120 + str(k)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    got = [(s["__key__"][:3], s["jpg"]) for s in _read_range(pax, 1, 4)]
    assert got == [("s1", b"img1"), ("sxx", b"img2"), ("sxx", b"img3")]
    # a damaged header ends the piece with an error the stream counts
    data = bytearray(path.read_bytes())
    first_size = int(data[124:136].split(b"\0")[0].strip(), 8)
    second = 512 + (first_size + 511) // 512 * 512
    data[second + 5] ^= 0xFF                         # the name field of the second header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(_read_range(bad, 0, 16))


def test_bench_reports_both_rates_and_their_ratio(shard_root, tokenizer):
    r = run_bench(shard_root, tokenizer, samples=48, batch_size=8, image_size=(96, 32), repeats=1)
    assert set(r["per_sample_us"]) == {"read", "parse", "augment", "batch", "tokenize",
                                       "decode + flip/crop into the batch"}
    for key in ("decode_only_samples_per_s", "loader_samples_per_s_per_core"):
        assert r[key]["median"] > 0
    ratio = r["loader_to_decode_ratio"]["median"]
    assert ratio == pytest.approx(r["loader_samples_per_s_per_core"]["median"]
                                  / r["decode_only_samples_per_s"]["median"], rel=1e-2)
