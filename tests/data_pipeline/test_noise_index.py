"""Noise index files (RDE's `noiseindex/*.npy` layout) in and out of `tbps shard`.

    python -m pytest -q tests/data_pipeline/test_noise_index.py

The fixture index is written as RDE's `inject_noisy_correspondence` writes one (an int64 array,
the identity outside the chosen pairs, the chosen pairs' own numbers shuffled among them, one of
them left in place), and the expected caption of every pair is written out by hand. With
TBPS_RDE_CHECKOUT naming a checkout of github QinYang79/RDE, the files it ships are read too, and
with TBPS_IRRA_CHECKOUT naming one of anosorae/IRRA as well, launch/parity/data_path.py runs.
"""
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps.data_pipeline.cli import main
from tbps.data_pipeline.manifest import read_manifest, read_meta
from tbps.data_pipeline.noise import (
    NoiseIndexError,
    noise_source,
    noisy_fraction,
    read_noise_index,
    write_noise_index,
)

FORMATS = {   # format: (annotation file, image path key, the authors' train id of the first id)
    "cuhk-pedes": ("reid_raw.json", "file_path", 1),   # their reader subtracts 1 from CUHK ids
    "icfg-pedes": ("ICFG-PEDES.json", "file_path", 0),
    "rstpreid": ("data_captions.json", "img_path", 0),
}


def _dataset(root: Path, fmt: str) -> Path:
    """Six train pairs (numbered below in annotation order), a test and (where the format has
    one) a val entry between them."""
    name, key, base = FORMATS[fmt]
    a, b = base, base + 1
    entries = [
        {"split": "train", "id": a, key: "a/1.png", "captions": ["p0 a1 first", "p1 a1 second"]},
        {"split": "test", "id": 40, key: "t/1.png", "captions": ["test caption"]},
        {"split": "train", "id": b, key: "b/1.png", "captions": ["p2 b1"]},
        {"split": "train", "id": a, key: "a/2.png", "captions": ["p3 a2"]},
        {"split": "train", "id": b, key: "b/2.png", "captions": ["p4 b2 one", "p5 b2 two"]},
    ]
    if fmt != "icfg-pedes":
        entries.insert(3, {"split": "val", "id": 30, key: "v/1.png", "captions": ["val caption"]})
    for e in entries:
        (root / "imgs" / e[key]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (len(e[key]) * 20, 9, 9)).save(root / "imgs" / e[key])
    (root / name).write_text(json.dumps(entries))
    return root


def _authors_index(path: Path, n: int = 6) -> Path:
    """As `inject_noisy_correspondence` writes it: pairs [4, 1, 3, 5] chosen, their numbers
    shuffled to [1, 3, 4, 5] (pair 5 keeps its own caption), np.save of the int64 array."""
    noisy_inx = np.arange(n)
    noisy_inx[np.array([4, 1, 3, 5])] = np.array([1, 3, 4, 5])
    np.save(path, noisy_inx)
    return path


def _shard(capsys, root, out, fmt="cuhk-pedes", *extra) -> tuple[int, str]:
    code = main(["shard", "--format", fmt, "--root", str(root), "--out", str(out),
                 "--shard-size", "4", "--tokenizer", "none", "--quiet", *map(str, extra)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _train(out: Path) -> list[dict]:
    rows = read_manifest(out, split="train").to_pylist()
    return sorted(rows, key=lambda r: r["index"])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_authors_index_gives_the_pairs_worked_out_by_hand(tmp_path, capsys, fmt):
    root = _dataset(tmp_path / "data", fmt)
    index = _authors_index(tmp_path / "idx.npy")
    code, err = _shard(capsys, root, tmp_path / "out", fmt, "--noise-index", index)
    assert code == 0, err
    got = [(r["image_path"], r["pid"], r["caption"], r["noisy"], r["caption_src"],
            r["caption_pid"]) for r in _train(tmp_path / "out")]
    assert got == [                 # pair i keeps its image and pid, takes pair src[i]'s caption
        ("a/1.png", 0, "p0 a1 first", False, 0, 0),
        ("a/1.png", 0, "p3 a2", True, 3, 0),              # another image of the same person
        ("b/1.png", 1, "p2 b1", False, 2, 1),
        ("a/2.png", 0, "p4 b2 one", True, 4, 1),
        ("b/2.png", 1, "p1 a1 second", True, 1, 0),
        ("b/2.png", 1, "p5 b2 two", False, 5, 1),         # chosen, but its shuffle kept it
    ]
    for split in ("test", "val") if fmt != "icfg-pedes" else ("test",):
        rows = read_manifest(tmp_path / "out", split=split).to_pylist()
        assert [(r["caption"], r["noisy"]) for r in rows] == [(f"{split} caption", False)]
    meta = read_meta(tmp_path / "out")
    assert meta["options"]["noise_rate"] == 0.5 and meta["options"]["noise_seed"] is None
    assert meta["options"]["noise_index"] == str(index)
    assert meta["noise_index"]["noisy_pairs"] == 3 and meta["noise_index"]["pairs"] == 6


def test_seeded_noise_round_trips_through_a_file(tmp_path, capsys):
    src = noise_source(1000, 0.5, seed=4)
    path = write_noise_index(tmp_path / "n.npy", src)
    raw = np.load(path, allow_pickle=False)             # what another code reads
    assert raw.dtype == np.int64 and raw.shape == (1000,) and np.array_equal(raw, src)
    assert np.array_equal(read_noise_index(path, 1000), src) and noisy_fraction(src) == 0.5
    write_noise_index(path, src)                        # the same index again: a rerun
    with pytest.raises(NoiseIndexError, match="exists and holds another index"):
        write_noise_index(path, noise_source(1000, 0.5, seed=5))

    root = _dataset(tmp_path / "data", "cuhk-pedes")
    code, err = _shard(capsys, root, tmp_path / "seeded", "cuhk-pedes", "--noise-rate", "0.5",
                       "--noise-seed", "3", "--write-noise-index", tmp_path / "w.npy")
    assert code == 0, err
    code, err = _shard(capsys, root, tmp_path / "loaded", "cuhk-pedes",
                       "--noise-index", tmp_path / "w.npy")
    assert code == 0, err
    seeded, loaded = _train(tmp_path / "seeded"), _train(tmp_path / "loaded")
    assert sum(r["noisy"] for r in seeded) == 3
    fields = ("index", "image_path", "pid", "caption", "noisy", "caption_src", "caption_pid")
    assert [[r[f] for f in fields] for r in seeded] == [[r[f] for f in fields] for r in loaded]
    assert np.array_equal(np.load(tmp_path / "w.npy"), [r["caption_src"] for r in seeded])


def _save(obj, **kw):
    return lambda p: np.save(p, obj, **kw)


def _write_bytes(data: bytes):
    return lambda p: p.write_bytes(data)


def _pickle(p):
    with open(p, "wb") as fh:
        pickle.dump(list(range(6)), fh)


def _npz(p):
    with open(p, "wb") as fh:                 # a file object: savez adds no .npz suffix
        np.savez(fh, a=np.arange(6))


MALFORMED = {   # case: (how the file is written, what the message must say)
    "too short": (_save(np.arange(5)), "holds 5 entries but the train split has 6 pairs"),
    "too long": (_save(np.arange(7)), "holds 7 entries but the train split has 6 pairs"),
    "floats": (_save(np.arange(6, dtype=np.float64)), "holds float64 values"),
    "booleans": (_save(np.ones(6, dtype=bool)), "holds bool values"),
    "two-dimensional": (_save(np.arange(6).reshape(2, 3)), "has shape (2, 3)"),
    "above the range": (_save(np.array([0, 1, 2, 3, 4, 6])), "entry 5 is 6, outside 0..5"),
    "negative": (_save(np.array([-1, 1, 2, 3, 4, 5])), "entry 0 is -1, outside 0..5"),
    "not a permutation": (_save(np.array([0, 1, 1, 3, 4, 5])),
                          "not a permutation of 0..5: value 1 appears at entries 1 and 2"),
    "pickled objects": (_save(np.arange(6).astype(object), allow_pickle=True),
                        "not a readable .npy array without pickle"),
    "a pickle": (_pickle, "not a readable .npy array without pickle"),
    "an npz archive": (_npz, "is an .npz archive"),
    "empty": (_write_bytes(b""), "not a readable .npy array without pickle"),
    "cut short": (lambda p: p.write_bytes(_npy_bytes(np.arange(6))[:-9]),
                  "not a readable .npy array without pickle"),
}


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_index_is_refused_naming_the_file(tmp_path, capsys, case):
    root = _dataset(tmp_path / "data", "cuhk-pedes")
    write, expected = MALFORMED[case]
    path = tmp_path / "bad.npy"
    write(path)
    code, err = _shard(capsys, root, tmp_path / "out", "cuhk-pedes", "--noise-index", path)
    assert code == 2 and err.count("\n") == 1, err            # one line, exit 2
    assert f"noise index {path}:" in err and expected in err, err
    assert not (tmp_path / "out").exists()                    # refused before OUT is touched


def test_missing_file_folder_and_mixed_flags(tmp_path, capsys):
    root = _dataset(tmp_path / "data", "cuhk-pedes")
    for path, expected in [(tmp_path / "none.npy", "no such file"), (tmp_path, "is a folder")]:
        code, err = _shard(capsys, root, tmp_path / "out", "cuhk-pedes", "--noise-index", path)
        assert code == 2 and f"noise index {path}: {expected}" in err, err
    index = _authors_index(tmp_path / "idx.npy")
    for flag, value in (("--noise-rate", "0.2"), ("--noise-seed", "1")):
        code, err = _shard(capsys, root, tmp_path / "out", "cuhk-pedes", "--noise-index", index,
                           flag, value)
        assert code == 2 and f"{flag} cannot be given with it" in err, err
    code, err = _shard(capsys, root, tmp_path / "out", "cuhk-pedes", "--noise-rate", "0.5",
                       "--write-noise-index", tmp_path / "w.txt")
    assert code == 2 and "give a file name ending in .npy" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.environ.get("TBPS_RDE_CHECKOUT"),
                    reason="set TBPS_RDE_CHECKOUT to a checkout of github QinYang79/RDE")
def test_the_files_rde_ships_load():
    files = sorted(Path(os.environ["TBPS_RDE_CHECKOUT"]).glob("**/noiseindex/*.npy"))
    assert len(files) == 9
    for f in files:
        n = len(np.load(f, allow_pickle=False))
        rate = float(f.stem.rsplit("_", 1)[1])
        assert abs(noisy_fraction(read_noise_index(f, n)) - rate) < 1e-3, f


@pytest.mark.skipif(not (os.environ.get("TBPS_RDE_CHECKOUT")
                         and os.environ.get("TBPS_IRRA_CHECKOUT")),
                    reason="set TBPS_RDE_CHECKOUT and TBPS_IRRA_CHECKOUT to checkouts of github "
                           "QinYang79/RDE and anosorae/IRRA (about 40 s)")
def test_the_data_path_matches_the_authors(tmp_path):
    """launch/parity/data_path.py: splits, whitespace-normalised captions and noisy pairs equal;
    token ids differ only where the results file names why (an HTML entity, a word their
    vocabulary lacks)."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "launch/parity/data_path.py"),
                           "--rde", os.environ["TBPS_RDE_CHECKOUT"],
                           "--irra", os.environ["TBPS_IRRA_CHECKOUT"], "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    totals = json.loads((tmp_path / "data_path.json").read_text())["totals"]
    for code, counts in totals.items():
        for stage, n in counts.items():
            if stage.startswith(("splits", "noise", "captions: captions, whitespace")):
                assert n == 0, (code, stage, n)
        assert counts["tokens: differ"] + counts["tokens: their_errors"] == 12, (code, counts)
