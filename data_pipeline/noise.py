"""Noisy-correspondence injection, the RDE protocol (METHODS.md, "Noise injection"), and noise
index files, the form in which RDE's code carries a noise setting.

Seeded noise (`noise_source`): a random subset C of floor(rate * N) training pairs has its
captions permuted among themselves; every image keeps its own pid. The subset is a prefix of one
seeded permutation of 0..N-1, so for one seed the noisy sets are nested across rates (20 % inside
50 % inside 80 %). Within C the captions move along one cycle (pair C[k] takes the caption of
C[k+1]), a permutation without fixed points: exactly floor(rate * N) pairs end up with another
pair's caption, where a random permutation would leave a few in place.

Index files (`read_noise_index`, `write_noise_index`): RDE ships `noiseindex/<dataset>_<rate>.npy`
and applies it in `inject_noisy_correspondence` (datasets/bases.py): a one-dimensional integer
array `src` of length N, the number of train (image, caption) pairs read in annotation order
(entries in file order, each entry's captions in order, every caption kept), and pair i takes the
caption of pair src[i]: image, image id and pid stay pair i's. Their files are int64 permutations
of 0..N-1 equal to i outside the noisy set; their shuffle of the noisy set is unseeded and may
leave a few of its pairs in place, so the realised noisy fraction, #{i: src[i] != i} / N, is
slightly under the nominal rate (CUHK-PEDES at 0.2: 13624 of 68126 pairs). Only those files
reproduce the paper's noisy pairs. `noise_source` gives the same layout, so this project's seeded
noise can be written as such a file and carried to another code.

Each record keeps the source pair's index (`caption_src`) and pid (`caption_pid`) and a `noisy`
flag (src[i] != i), for diagnostics only: training never reads them.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from tbps.data_pipeline.schema import Record


class NoiseIndexError(ValueError):
    """A noise index file that cannot be applied; str() names the file and what is wrong."""


def noise_source(n: int, rate: float, seed: int) -> np.ndarray:
    """src[i] = index of the pair whose caption pair i receives (src[i] == i when clean)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    num_noisy = int(np.floor(rate * n))
    if num_noisy == 1:
        raise ValueError(f"noise rate {rate} of {n} pairs selects one pair, which cannot swap "
                         "captions with itself; use a larger rate")
    order = np.random.default_rng(seed).permutation(n)
    chosen = order[:num_noisy]
    src = np.arange(n)
    src[chosen] = np.roll(chosen, -1)
    return src


def noisy_fraction(src: np.ndarray) -> float:
    """The realised noise rate: the fraction of pairs holding another pair's caption."""
    return float(np.count_nonzero(src != np.arange(len(src))) / len(src)) if len(src) else 0.0


def read_noise_index(path: str | os.PathLike, n: int) -> np.ndarray:
    """The int64 `src` held by an index file in RDE's layout, checked against n train pairs.

    Raises NoiseIndexError, naming the file, for a file that is missing, not a plain .npy array
    (pickled objects are refused, never unpickled), not one-dimensional integers, of another
    length than n, or not a permutation of 0..n-1.
    """
    path = Path(path)
    where = f"noise index {path}"
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise NoiseIndexError(f"{where}: no such file; check the path") from None
    except IsADirectoryError:
        raise NoiseIndexError(f"{where}: is a folder; give the .npy file") from None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickle" in text or "Object arrays" in text:
            text = "it holds pickled Python objects, which are never unpickled here"
        raise NoiseIndexError(f"{where}: not a readable .npy array without pickle ({text}); an "
                              "index file is one integer array saved by numpy.save") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        names = ", ".join(arr.files[:3])
        arr.close()
        raise NoiseIndexError(f"{where}: is an .npz archive ({names}); an index file is one "
                              "array saved by numpy.save")
    _check_index(arr, n, where)
    return arr.astype(np.int64, copy=False)


def _check_index(arr: np.ndarray, n: int, where: str) -> None:
    if arr.dtype.kind not in "iu":
        raise NoiseIndexError(f"{where}: holds {arr.dtype} values; an index file holds integers "
                              "(pair numbers, int64)")
    if arr.ndim != 1:
        raise NoiseIndexError(f"{where}: has shape {arr.shape}; an index file is one-dimensional, "
                              "one entry per train pair")
    if len(arr) != n:
        raise NoiseIndexError(
            f"{where}: holds {len(arr)} entries but the train split has {n} pairs; the file must "
            "come from the same annotation file read with every caption kept (entries in file "
            "order, captions in order), and no train record may have been skipped")
    bad = np.flatnonzero((arr < 0) | (arr >= n))
    if len(bad):
        raise NoiseIndexError(f"{where}: entry {bad[0]} is {arr[bad[0]]}, outside 0..{n - 1} "
                              f"({len(bad)} such entries); entries are train pair numbers")
    counts = np.bincount(arr, minlength=n)
    if (counts != 1).any():
        value = int(np.flatnonzero(counts > 1)[0])
        at = np.flatnonzero(arr == value)[:2].tolist()
        raise NoiseIndexError(
            f"{where}: is not a permutation of 0..{n - 1}: value {value} appears at entries "
            f"{at[0]} and {at[1]}, so a caption would be used twice and "
            f"{int((counts == 0).sum())} never; the protocol permutes captions among pairs")


def write_noise_index(path: str | os.PathLike, src: np.ndarray) -> Path:
    """Save `src` as an index file in RDE's layout (int64, one-dimensional, a permutation).

    An existing file is replaced only if it holds the same index (a rerun); another file there is
    refused. The write is atomic. Returns the path written.
    """
    path = Path(path)
    src = np.asarray(src)
    _check_index(src, len(src), f"noise index for {path}")
    if path.is_dir():
        raise NoiseIndexError(f"noise index {path}: is a folder; give a file name ending in .npy")
    if path.suffix != ".npy":
        raise NoiseIndexError(f"noise index {path}: give a file name ending in .npy (numpy.save "
                              "would add the suffix, and readers look for the name given)")
    if path.exists():
        try:
            same = np.array_equal(read_noise_index(path, len(src)), src)
        except NoiseIndexError:
            same = False
        if not same:
            raise NoiseIndexError(f"noise index {path}: exists and holds another index; "
                                  "choose another file name or remove it")
        return path
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        np.save(fh, src.astype(np.int64), allow_pickle=False)
    os.replace(tmp, path)
    return path


def apply_source(records: list[Record], src: np.ndarray) -> list[Record]:
    """Records of one split in index order, pair i given the caption of pair src[i]."""
    if [r.index for r in records] != list(range(len(records))):
        raise ValueError("records must be numbered 0..n-1 in order")
    if len(src) != len(records):
        raise ValueError(f"noise source has {len(src)} entries for {len(records)} records")
    out = []
    for rec, s in zip(records, src):
        if s == rec.index:
            out.append(rec)
        else:
            donor = records[s]
            out.append(rec.replace(caption=donor.caption, noisy=True, caption_src=int(s),
                                   caption_pid=donor.pid))
    return out


def apply_noise(records: list[Record], rate: float, seed: int) -> list[Record]:
    """Records of one split with the seeded protocol applied; records must be in index order."""
    return apply_source(records, noise_source(len(records), rate, seed))
