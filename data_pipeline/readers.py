"""Readers for the three benchmarks' annotation files, with a report of malformed input.

Layout of a dataset folder (`--root`), as the benchmarks ship and as `synth` writes:

    CUHK-PEDES/  reid_raw.json       list of {split, id, file_path, captions[], processed_tokens}
    ICFG-PEDES/  ICFG-PEDES.json     list of {split, id, file_path, captions[]} (ICFG_PEDES.json too)
    RSTPReid/    data_captions.json  list of {split, id, img_path, captions[]}
    <root>/imgs/<path>               the images, <path> taken from the annotation

Split rules: "train" and "test" are themselves; any other split is "val" (ICFG-PEDES has no val,
so another split there is a problem). One Record per (image, caption) pair; train ids are remapped
to 0..n-1 in increasing order of the file's ids, val/test keep the file's ids.

Problems (wrong types, missing keys, empty captions, missing images, duplicates) are collected in
an `AnnotationReport`: each kind is counted and its first examples kept. With on_error="fail" (the
default) the reader raises `AnnotationError` after reading the whole file, so the report shows
every problem at once; with on_error="skip" the offending records are dropped and the report is
returned for the caller to show.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tbps.data_pipeline.schema import Record


@dataclass(frozen=True)
class FormatSpec:
    name: str
    filenames: tuple[str, ...]   # accepted annotation file names, first is preferred
    path_field: str              # the key holding the image path
    has_val: bool


FORMATS = {
    "cuhk-pedes": FormatSpec("cuhk-pedes", ("reid_raw.json",), "file_path", has_val=True),
    "icfg-pedes": FormatSpec("icfg-pedes", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path",
                             has_val=False),
    "rstpreid": FormatSpec("rstpreid", ("data_captions.json",), "img_path", has_val=True),
}
ON_ERROR = ("fail", "skip")
IMAGE_DIR = "imgs"


class AnnotationError(ValueError):
    """Malformed annotation input; str() is the full report."""

    def __init__(self, report: "AnnotationReport"):
        self.report = report
        super().__init__(report.render())


@dataclass
class AnnotationReport:
    """Counts of each kind of problem with the first `max_examples` examples of each."""

    source: str
    max_examples: int = 3
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    entries: int = 0
    records: int = 0

    def add(self, kind: str, where: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(f"{where}: {detail}")

    @property
    def ok(self) -> bool:
        return not self.counts

    def render(self) -> str:
        if self.ok:
            return f"{self.source}: {self.entries} entries, {self.records} records, no problems"
        total = sum(self.counts.values())
        lines = [f"{self.source}: {total} problem(s) in {self.entries} entries"]
        for kind, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {kind}: {n}")
            lines.extend(f"    e.g. {ex}" for ex in self.examples[kind])
        return "\n".join(lines)


def find_annotation_file(fmt: str, root: Path) -> Path:
    spec = _spec(fmt)
    for name in spec.filenames:
        if (root / name).is_file():
            return root / name
    looked = ", ".join(str(root / n) for n in spec.filenames)
    raise FileNotFoundError(f"no {fmt} annotation file: looked for {looked}")


def read_annotations(fmt: str, root: str | os.PathLike, *, on_error: str = "fail",
                     check_images: bool = True, max_examples: int = 3
                     ) -> tuple[dict[str, list[Record]], AnnotationReport]:
    """Read a dataset folder into records per split.

    Returns ({split: [Record, ...]}, report). Raises FileNotFoundError if the annotation file or
    the image folder is missing, ValueError if the file is not a JSON list, and AnnotationError
    if on_error == "fail" and any entry is malformed.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    spec, root = _spec(fmt), Path(root)
    path = find_annotation_file(fmt, root)
    image_dir = root / IMAGE_DIR
    if check_images and not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); repair or restore the file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); repair or restore the file") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}; "
                         f"is it the {fmt} annotation file?")

    report = AnnotationReport(source=str(path), max_examples=max_examples, entries=len(entries))
    pairs = _validate_entries(entries, spec, image_dir if check_images else None, report)
    if not report.ok and on_error == "fail":
        raise AnnotationError(report)
    records = _number_records(pairs)
    report.records = sum(len(r) for r in records.values())
    return records, report


# ------------------------------------------------------------------------------------------------


def _spec(fmt: str) -> FormatSpec:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _split_of(raw: str, spec: FormatSpec) -> str | None:
    if raw in ("train", "test"):
        return raw
    return "val" if spec.has_val else None


def _validate_entries(entries: list, spec: FormatSpec, image_dir: Path | None,
                      report: AnnotationReport) -> list[tuple[str, int, str, int, str]]:
    """Check every entry; return the good (split, raw_id, image_path, caption_index, caption)."""
    pairs = []
    image_owner: dict[str, int] = {}           # image path -> entry number that claimed it
    for n, entry in enumerate(entries):
        where = f"entry {n}"
        if not isinstance(entry, dict):
            report.add("not_an_object", where, f"expected an object, got {type(entry).__name__}")
            continue
        missing = [k for k in ("split", "id", spec.path_field, "captions") if k not in entry]
        if missing:
            report.add("missing_key", where, f"missing {', '.join(missing)}")
            continue
        raw_split, raw_id, img, caps = (entry["split"], entry["id"], entry[spec.path_field],
                                        entry["captions"])
        bad = _type_problem(raw_split, raw_id, img, caps, spec.path_field)
        if bad:
            report.add("wrong_type", where, bad)
            continue
        split = _split_of(raw_split, spec)
        if split is None:
            report.add("unknown_split", where, f"split {raw_split!r} ({spec.name} has only "
                                               "train and test)")
            continue
        img = img.replace("\\", "/")
        if img in image_owner:
            report.add("duplicate_image", where,
                       f"{img!r} already listed by entry {image_owner[img]}")
            continue
        image_owner[img] = n
        if image_dir is not None and not (image_dir / img).is_file():
            report.add("missing_image", where, f"{image_dir / img} does not exist")
            continue
        seen_captions = set()
        for c, caption in enumerate(caps):
            text = caption.strip()
            if not text:
                report.add("empty_caption", f"{where} caption {c}", "empty caption")
            elif text in seen_captions:
                report.add("duplicate_caption", f"{where} caption {c}", f"repeats {text[:40]!r}")
            else:
                seen_captions.add(text)
                pairs.append((split, raw_id, img, c, text))
        if not caps:
            report.add("no_captions", where, "captions list is empty")
    return pairs


def _type_problem(split, raw_id, img, caps, path_field: str) -> str | None:
    if not isinstance(split, str):
        return f"split should be a string, got {type(split).__name__}"
    if isinstance(raw_id, bool) or not isinstance(raw_id, int):
        return f"id should be an integer, got {raw_id!r}"
    if not isinstance(img, str) or not img:
        return f"{path_field} should be a non-empty string, got {img!r}"
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        return "captions should be a list of strings"
    return None


def _number_records(pairs) -> dict[str, list[Record]]:
    """Assign per-split indices, image ids and remapped train pids."""
    train_ids = sorted({raw_id for split, raw_id, *_ in pairs if split == "train"})
    train_pid = {raw_id: i for i, raw_id in enumerate(train_ids)}
    records: dict[str, list[Record]] = defaultdict(list)
    image_ids: dict[str, dict[str, int]] = defaultdict(dict)
    for split, raw_id, img, c, text in pairs:
        ids = image_ids[split]
        image_id = ids.setdefault(img, len(ids))
        pid = train_pid[raw_id] if split == "train" else raw_id
        records[split].append(Record(split=split, index=len(records[split]), pid=pid,
                                     raw_id=raw_id, image_id=image_id, image_path=img,
                                     caption=text, caption_index=c))
    return dict(records)


def records_to_dicts(records: list[Record]) -> list[dict]:
    return [dataclasses.asdict(r) for r in records]
