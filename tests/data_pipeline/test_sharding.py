import io
import json
import shutil
import tarfile

import pytest
from PIL import Image

from tbps.data_pipeline import sharding
from tbps.data_pipeline.cli import main
from tbps.data_pipeline.manifest import read_manifest, read_meta
from tbps.data_pipeline.sharding import ShardError, ShardOptions, shard_dataset
from tbps.data_pipeline.verify import stats, verify


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".progress" not in p.parts and p.name != ".plan.json"}


def test_manifest_matches_shards_and_verify_passes(shard_root):
    meta = read_meta(shard_root)
    table = read_manifest(shard_root).to_pylist()
    assert {s: v["num_samples"] for s, v in meta["splits"].items()} == \
        {"train": 240, "val": 48, "test": 64}
    assert len(table) == 352 and meta["num_classes"] == 30
    assert len(meta["splits"]["train"]["shards"]) == 15
    train = [r for r in table if r["split"] == "train"]
    assert sorted(r["index"] for r in train) == list(range(240))
    assert sorted({r["pid"] for r in train}) == list(range(30))
    assert all(r["shard"].startswith("train/shard-") for r in train)
    with tarfile.open(shard_root / train[0]["shard"]) as tar:
        names = tar.getnames()
    assert names[:2] == [f"{train[0]['key']}.jpg", f"{train[0]['key']}.json"]
    assert verify(shard_root, progress=False) == []
    s = stats(shard_root)
    assert s["splits"]["train"]["ids"] == 30 and s["splits"]["test"]["images"] == 32


def test_same_bytes_for_same_input_whatever_the_workers(tmp_path, synth_root, shard_root):
    out = tmp_path / "again"
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=16), workers=2,
                  progress=False)
    assert _tree_bytes(out) == _tree_bytes(shard_root)


def test_resumes_after_interruption(tmp_path, synth_root, shard_root, monkeypatch):
    out = tmp_path / "resumed"
    real, calls = sharding.write_shard, []

    def flaky(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=16), progress=False)
    assert not (out / "manifest.parquet").exists()
    calls.clear()
    monkeypatch.setattr(sharding, "write_shard", real)
    written = []
    monkeypatch.setattr(sharding, "write_shard",
                        lambda *a, **k: written.append(a[:2]) or real(*a, **k))
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=16), progress=False)
    total = sum(len(v["shards"]) for v in read_meta(shard_root)["splits"].values())
    assert len(written) == total - 5               # 5 shards were done before the interruption
    assert _tree_bytes(out) == _tree_bytes(shard_root)


def test_other_options_refuse_to_mix_unless_overwrite(tmp_path, synth_root, shard_root):
    out = tmp_path / "mix"
    shutil.copytree(shard_root, out)
    with pytest.raises(ShardError, match="other input or options"):
        shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=32), progress=False)
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=32), progress=False,
                  overwrite=True)
    assert len(read_meta(out)["splits"]["train"]["shards"]) == 8
    assert verify(out, progress=False) == []


def test_noise_and_resize_at_shard_time(tmp_path, synth_root):
    out = tmp_path / "noisy"
    shard_dataset("cuhk-pedes", synth_root, out,
                  ShardOptions(shard_size=64, noise_rate=0.5, noise_seed=1, resize=(48, 16)),
                  progress=False)
    rows = read_manifest(out, split="train").to_pylist()
    noisy = [r for r in rows if r["noisy"]]
    assert len(noisy) == 120
    by_index = {r["index"]: r for r in rows}
    clean = read_manifest(out, split="test").to_pylist()
    assert not any(r["noisy"] for r in clean)                 # only train gets noise
    for r in noisy:
        assert r["caption_src"] != r["index"] and r["caption_pid"] == by_index[r["caption_src"]]["pid"]
    with tarfile.open(out / rows[0]["shard"]) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (16, 48)


def test_corrupt_source_image_fails_or_is_skipped(tmp_path, synth_root):
    root = tmp_path / "src"
    shutil.copytree(synth_root, root)
    entries = json.loads((root / "reid_raw.json").read_text())
    bad = root / "imgs" / entries[0]["file_path"]
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ShardError, match="cannot read image"):
        shard_dataset("cuhk-pedes", root, tmp_path / "a", ShardOptions(shard_size=16),
                      progress=False)
    out = tmp_path / "b"
    shard_dataset("cuhk-pedes", root, out, ShardOptions(shard_size=16, on_error="skip"),
                  progress=False)
    meta = read_meta(out)
    assert meta["skipped_images"] == 2                         # the image's two captions
    assert meta["splits"]["train"]["num_samples"] == 238
    assert verify(out, progress=False) == []


def test_verify_lists_every_problem(shard_copy):
    meta = read_meta(shard_copy)
    shards = meta["splits"]["train"]["shards"]
    flipped = shard_copy / shards[0]["name"]
    data = bytearray(flipped.read_bytes())
    data[600] ^= 0xFF
    flipped.write_bytes(bytes(data))
    (shard_copy / shards[1]["name"]).unlink()
    shutil.copy(shard_copy / shards[2]["name"], shard_copy / "train" / "shard-999999.tar")
    problems = verify(shard_copy, progress=False)
    text = "\n".join(problems)
    assert f"{shards[0]['name']}: sha256 differs" in text
    assert f"{shards[1]['name']}: missing" in text
    assert "shard-999999.tar: tar file not in the manifest" in text
    assert main(["verify", str(shard_copy), "--quiet"]) == 1


def test_cli_shard_errors_are_clear(tmp_path, capsys):
    assert main(["shard", "--format", "cuhk-pedes", "--root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "reid_raw.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard_size"):
        ShardOptions(shard_size=0)


def test_a_small_non_english_dataset_shards(tmp_path):
    root = tmp_path / "de"
    (root / "imgs").mkdir(parents=True)
    captions = {1: ["eine frau in einem roten mantel", "sie trägt eine schwarze tasche"],
                2: ["ein mann mit blauer hose"], 3: ["ein kind mit gelber mütze"]}
    entries = []
    for pid, caps in captions.items():
        Image.new("RGB", (8, 16), (pid * 60, 0, 0)).save(root / "imgs" / f"{pid}.jpg")
        entries.append({"split": "test" if pid == 3 else "train", "id": pid,
                        "file_path": f"{pid}.jpg", "captions": caps, "processed_tokens": []})
    (root / "reid_raw.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    assert main(["shard", "--format", "cuhk-pedes", "--root", str(root), "--out", str(out),
                 "--quiet"]) == 0
    from tbps.data_pipeline.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer.from_pretrained(out / "tokenizer")
    assert tok.unk_id not in tok.encode_batch(captions[1] + captions[2])
