"""Tests of the synthetic dataset generator: format, determinism, identities, captions, config.

    python -m pytest tests/data_pipeline/test_synthetic.py -q

Small sizes (a few dozen ids) keep the whole file to a few seconds on 2 CPU cores.
"""
import json
from pathlib import Path

import pytest
from PIL import Image

from tbps.data_pipeline.synthetic import (
    ANNOTATION_FILE,
    META_FILE,
    PROBE_CAPTION,
    SynthConfig,
    generate,
    make_captions,
    preview,
    sample_identities,
    tokenize,
)

SMALL = {"num_train_ids": 12, "num_val_ids": 4, "num_test_ids": 4, "images_per_id": 3}


def _gen(out: Path, workers: int = 1, **changes) -> list[dict]:
    generate(out, SynthConfig(**{**SMALL, **changes}), workers=workers, progress=False)
    return json.loads((out / ANNOTATION_FILE).read_text())


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    _gen(out)
    return out


def test_format(small):
    records = json.loads((small / ANNOTATION_FILE).read_text())
    cfg = SynthConfig(**SMALL)
    assert len(records) == cfg.num_ids * cfg.images_per_id
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert {r["id"] for r in records} == set(range(1, cfg.num_ids + 1))
    for r in records:
        assert list(r) == ["split", "captions", "file_path", "processed_tokens", "id"]
        assert isinstance(r["id"], int) and r["split"] == cfg.split_of(r["id"])
        pid, name = r["file_path"].split("/")[1:]
        assert r["file_path"].startswith("synth/") and pid == f"{r['id']:05d}"
        assert name.startswith(f"{r['id']:05d}_") and name.endswith(".jpg")
        assert len(r["captions"]) == 2 and r["captions"][0] != r["captions"][1]
        for caption, tokens in zip(r["captions"], r["processed_tokens"], strict=True):
            assert set(caption) <= set("abcdefghijklmnopqrstuvwxyz ,.")  # lower case, no digits
            assert "  " not in caption and caption.endswith(".")
            assert tokens == tokenize(caption) == caption.replace(",", "").replace(".", "").split()
        with Image.open(small / "imgs" / r["file_path"]) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 96))
    splits = [r["split"] for r in records]
    assert splits == sorted(splits, key=["train", "val", "test"].index)  # train ids first


@pytest.mark.parametrize("height,width", [(384, 128), (64, 24)])
def test_image_size(tmp_path, height, width):
    records = _gen(tmp_path, num_train_ids=2, num_val_ids=0, num_test_ids=1, images_per_id=2,
                   height=height, width=width)
    for r in records:
        with Image.open(tmp_path / "imgs" / r["file_path"]) as img:
            assert img.size == (width, height) and img.mode == "RGB"


def test_deterministic_across_runs_and_workers(tmp_path, small):
    _gen(tmp_path / "a", workers=1)
    _gen(tmp_path / "b", workers=2)
    reference = _tree_bytes(small)
    assert ANNOTATION_FILE in reference and len(reference) == 2 + SynthConfig(**SMALL).num_ids * 3
    assert _tree_bytes(tmp_path / "a") == reference
    assert _tree_bytes(tmp_path / "b") == reference


def test_different_seed_differs(tmp_path, small):
    _gen(tmp_path, seed=1)
    ours, theirs = _tree_bytes(small), _tree_bytes(tmp_path)
    assert ours.keys() == theirs.keys()
    assert ours[ANNOTATION_FILE] != theirs[ANNOTATION_FILE]
    assert all(ours[k] != theirs[k] for k in ours if k.endswith(".jpg"))


def test_images_of_an_identity_vary(small):
    images = [(small / "imgs/synth/00001" / f"00001_{k}.jpg").read_bytes() for k in range(3)]
    assert len(set(images)) == 3


def test_identities_unique_and_splits_disjoint():
    cfg = SynthConfig()  # the default size: 1300 ids
    identities = sample_identities(cfg)
    assert [i.id for i in identities] == list(range(1, cfg.num_ids + 1))
    assert len({i.attributes() for i in identities}) == len(identities)
    by_split = {s: {i.id for i in identities if i.split == s} for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [1000, 100, 200]
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    share_hats = sum(i.hat_colour is not None for i in identities) / len(identities)
    assert 0.15 < share_hats < 0.25


def test_meta_matches_annotations(small):
    meta = json.loads((small / META_FILE).read_text())
    assert SynthConfig.from_json(meta[0]["config"]) == SynthConfig(**SMALL)
    assert meta[1:] == [i.__dict__ for i in sample_identities(SynthConfig(**SMALL))]


def test_probe_words_in_train_vocabulary():
    cfg = SynthConfig()
    vocab = set()
    for ident in sample_identities(cfg)[: cfg.num_train_ids]:
        for k in range(cfg.images_per_id):
            vocab.update(w for c in make_captions(ident, k, cfg) for w in tokenize(c))
    assert set(tokenize(PROBE_CAPTION)) <= vocab
    assert 60 <= len(vocab) <= 120


def test_drop_attribute_prob():
    """With no drops every caption names hair and skin; with the default some leave one out."""
    def captions(drop):
        cfg = SynthConfig(num_train_ids=50, num_val_ids=0, num_test_ids=1, drop_attribute_prob=drop)
        identities = sample_identities(cfg)
        return [c for i in identities for k in range(4) for c in make_captions(i, k, cfg)]
    assert all("hair" in c and "skin" in c for c in captions(0.0))
    assert any("hair" not in c or "skin" not in c for c in captions(0.35))


@pytest.mark.parametrize("field,value", [
    ("num_train_ids", 0), ("num_test_ids", -1), ("images_per_id", 0), ("captions_per_image", 0),
    ("height", 10), ("width", 2.5), ("seed", -1), ("occlusion_prob", 1.5), ("hat_prob", -0.1),
    ("drop_attribute_prob", "x"), ("colour_jitter", -1.0), ("noise_std", 500.0), ("clutter", True),
    ("num_val_ids", 99_999), ("caption_style", "tweets"), ("background", None),
    ("attribute_profile", "x"), ("figure_zoom", (1.2, 1.1)), ("figure_zoom", [1.0, 1.0]),
    ("disjoint_from", {"seed": 0}),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**{field: value})


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        SynthConfig(0)


def test_overwrite_protection(tmp_path):
    _gen(tmp_path, num_train_ids=3, num_val_ids=1, num_test_ids=2)  # 6 ids x 3 images
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _gen(tmp_path)
    small = SynthConfig(num_train_ids=2, num_val_ids=0, num_test_ids=1, images_per_id=1)
    generate(tmp_path, small, progress=False, overwrite=True)
    assert len(json.loads((tmp_path / ANNOTATION_FILE).read_text())) == 3
    assert len(list((tmp_path / "imgs").rglob("*.jpg"))) == 3  # no stale images left behind


def test_rejects_bad_workers(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        generate(tmp_path, SynthConfig(**SMALL), workers=0, progress=False)


def test_preview(small, tmp_path):
    path = preview(small, tmp_path / "sheet.png", n_ids=3, per_id=2)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.height >= 3 * 96 * 3 and sheet.width >= 2 * 32 * 3
