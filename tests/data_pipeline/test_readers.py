import json

import pytest

from tbps.data_pipeline.readers import AnnotationError, read_annotations


def _write(root, name, entries, images=()):
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for img in images:
        (root / "imgs" / img).parent.mkdir(parents=True, exist_ok=True)
        (root / "imgs" / img).write_bytes(b"x")
    (root / name).write_text(json.dumps(entries))


GOOD = {
    "cuhk-pedes": ("reid_raw.json", "file_path"),
    "icfg-pedes": ("ICFG-PEDES.json", "file_path"),
    "rstpreid": ("data_captions.json", "img_path"),
}


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_split_rules_and_id_remapping(tmp_path, fmt):
    name, field = GOOD[fmt]
    entries = [
        {"split": "train", "id": 7, field: "a/1.jpg", "captions": ["one", "two"]},
        {"split": "train", "id": 3, field: "a/2.jpg", "captions": ["three"]},
        {"split": "test", "id": 9, field: "b/1.jpg", "captions": ["four"]},
    ]
    if fmt != "icfg-pedes":
        entries.append({"split": "val", "id": 5, field: "c/1.jpg", "captions": ["five"]})
        entries.append({"split": "gallery", "id": 6, field: "c/2.jpg", "captions": ["six"]})
    _write(tmp_path, name, entries, [e[field] for e in entries])
    records, report = read_annotations(fmt, tmp_path)
    assert report.ok
    train = records["train"]
    assert [(r.pid, r.raw_id, r.image_id, r.caption) for r in train] == [
        (1, 7, 0, "one"), (1, 7, 0, "two"), (0, 3, 1, "three")]
    assert [r.index for r in train] == [0, 1, 2]
    assert records["test"][0].pid == 9          # val/test keep the file's id
    if fmt != "icfg-pedes":
        assert [r.raw_id for r in records["val"]] == [5, 6]   # any other split is val


def test_icfg_alternative_file_name(tmp_path):
    _write(tmp_path, "ICFG_PEDES.json",
           [{"split": "train", "id": 0, "file_path": "x.jpg", "captions": ["c"]}], ["x.jpg"])
    records, _ = read_annotations("icfg-pedes", tmp_path)
    assert len(records["train"]) == 1


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_malformed_entries_are_reported_then_fail_or_skip(tmp_path, fmt):
    name, field = GOOD[fmt]
    entries = [
        {"split": "train", "id": 1, field: "ok.jpg", "captions": ["fine caption"]},
        {"split": "train", field: "noid.jpg", "captions": ["x"]},                 # missing key
        {"split": "train", "id": "7", field: "str.jpg", "captions": ["x"]},       # wrong type
        {"split": "train", "id": 2, field: "caps.jpg", "captions": "not a list"},  # wrong type
        {"split": "train", "id": 3, field: "empty.jpg", "captions": ["  ", "kept"]},
        {"split": "train", "id": 4, field: "gone.jpg", "captions": ["x"]},         # no image
        {"split": "train", "id": 5, field: "ok.jpg", "captions": ["dup image"]},
        {"split": "train", "id": 6, field: "twice.jpg", "captions": ["same", "same"]},
        ["not", "an", "object"],
    ]
    images = ["ok.jpg", "noid.jpg", "str.jpg", "caps.jpg", "empty.jpg", "twice.jpg"]
    _write(tmp_path, name, entries, images)
    with pytest.raises(AnnotationError) as err:
        read_annotations(fmt, tmp_path)
    text = str(err.value)
    for kind, n in [("missing_key", 1), ("wrong_type", 2), ("empty_caption", 1),
                    ("missing_image", 1), ("duplicate_image", 1), ("duplicate_caption", 1),
                    ("not_an_object", 1)]:
        assert f"{kind}: {n}" in text, text
    assert "entry 5" in text and "gone.jpg" in text          # the first examples are shown
    records, report = read_annotations(fmt, tmp_path, on_error="skip")
    assert [r.caption for r in records["train"]] == ["fine caption", "kept", "same"]
    assert sum(report.counts.values()) == 8


def test_icfg_rejects_val_split(tmp_path):
    _write(tmp_path, "ICFG-PEDES.json",
           [{"split": "val", "id": 0, "file_path": "x.jpg", "captions": ["c"]}], ["x.jpg"])
    with pytest.raises(AnnotationError, match="unknown_split"):
        read_annotations("icfg-pedes", tmp_path)


def test_missing_file_and_bad_json_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="reid_raw.json"):
        read_annotations("cuhk-pedes", tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_annotations("cuhk-pedes", tmp_path)
    (tmp_path / "reid_raw.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_annotations("cuhk-pedes", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_annotations("market1501", tmp_path)
