"""The data path against the authors' code: splits, captions, token ids and noisy pairs.

    python launch/parity/data_path.py --rde ~/src/RDE --irra ~/src/IRRA
    python launch/parity/data_path.py --rde ../rde-export --irra ../irra-export \
        --rde-commit b3fd396... --irra-commit cfc2378...    # exports without .git

--rde: a checkout of github QinYang79/RDE (the repository or its 2024-CVPR-RDE folder);
--irra: a checkout of github anosorae/IRRA. Nothing of theirs is copied: their readers run from
the checkout in a child process, and their tokenizer's vocabulary is read from their
data/bpe_simple_vocab_16e6.txt.gz at run time into a temporary folder.

A small fixture is written in each of the three annotation formats (CUHK-PEDES `reid_raw.json`,
ICFG-PEDES `ICFG-PEDES.json`, RSTPReid `data_captions.json`; a few identities, the splits
interleaved in the file, PNG images), with captions that probe the edges: surrounding and inner
whitespace, upper case, digits, an HTML entity, an accent, a curly apostrophe, a caption past 77
tokens, the word whose BPE merge the authors' vocabulary drops. Then, per format and code:

1. splits: the train pairs (pid, image id, image) in order; the test and val images (pid, image)
   and queries (pid) as the evaluation reads them (ours: `tbps shard`'s manifest, one image per
   image id as EvalLoader keeps it).
2. captions: every pair's caption, exactly and after whitespace normalisation.
3. token ids: their `tokenize` (datasets/bases.py) with their SimpleTokenizer against this
   project's CaptionTokenizer (`encode_batch`, the loader's call) over a CLIP BPE tokenizer built
   from their vocabulary file; ids up to the end token, then the padding.
4. noisy pairs (RDE): this project's seeded noise written with `--write-noise-index` and loaded by
   their `inject_noisy_correspondence`, and an index their code writes (its unseeded shuffle)
   loaded by `tbps shard --noise-index`: every pair's caption and clean flag.
The index files RDE ships are read as well (pairs, noisy pairs, realised rate).

Their code imports ftfy, prettytable and easydict; where one is missing it is replaced by a stub
for the run and named in the results: prettytable and easydict are not on the compared path
(dataset statistics, configs); a missing ftfy is replaced by the identity, which changes only
text ftfy would fix (mojibake, curly quotes, ligatures, full-width and control characters), so
captions holding such characters are counted apart and not compared. Results:
launch/results/parity/data_path.{json,md} (both commits, this project's, the command, counts of
differences at each stage with examples).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tbps.data_pipeline.cli import main as tbps_main
from tbps.data_pipeline.manifest import read_manifest
from tbps.data_pipeline.noise import noisy_fraction, read_noise_index
from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.kernels.environment import environment

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "launch/results/parity"
RATE, SEED = 0.5, 0
EXAMPLES = 3
FORMATS = {   # format: (their folder, annotation file, image key, their class, first train id)
    "cuhk-pedes": ("CUHK-PEDES", "reid_raw.json", "file_path", "cuhkpedes.CUHKPEDES", 1),
    "icfg-pedes": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path", "icfgpedes.ICFGPEDES", 0),
    "rstpreid": ("RSTPReid", "data_captions.json", "img_path", "rstpreid.RSTPReid", 0),
}
PLAIN = [
    "A woman with long black hair wears a white shirt and blue jeans.",
    "The man is wearing a grey jacket, black trousers and white sneakers.",
    "A MAN IN A GREEN COAT CARRIES A BROWN BAG.",
    "He carries 2 bags and wears size 42 shoes.",
    "  A woman with a red umbrella walks on the street.  \n",
    "a  young man   in a red\tjacket and dark pants",
    "The girl wears a pink dress &amp; white sandals.",
    "A person in a café-coloured coat with a scarf.",
    "A man in a jekyll and hyde t-shirt with black shorts.",
    "She has a ponytail, a yellow top, a short skirt and black boots; she holds a phone.",
    "A man with glasses, a blue shirt, khaki pants, and a black backpack walks forward.",
    "An old man in a brown sweater and grey trousers holds a walking stick in his right hand.",
    ("The pedestrian is a tall young woman with long wavy brown hair who is wearing a loose white "
     "blouse with short sleeves, a pair of tight light blue denim jeans rolled up at the ankles, "
     "white canvas shoes with thin soles, a small black leather handbag hanging from her left "
     "shoulder, silver earrings and a thin gold watch on her left wrist while she looks down at "
     "the phone in her right hand as she walks along the pavement."),
    "A boy in a striped t-shirt and shorts rides a bicycle.",
    "The woman wears a black coat, a white hat and carries a shopping bag.",
    "A man wearing a dark suit, a tie and black leather shoes.",
]
FTFY = ["The woman\u2019s bag is brown and she wears a green coat."]   # ftfy straightens the quote


# -- the fixture --------------------------------------------------------------------------------


def write_fixture(base: Path, fmt: str) -> Path:
    """A dataset folder in the format: 5 train ids (2 images: 3 captions and 1), 3 test ids and,
    except ICFG-PEDES (train and test only), 2 val ids; the splits interleaved in the file."""
    folder, name, key, _, first = FORMATS[fmt]
    root = base / folder
    captions = iter((PLAIN + FTFY) * 4)
    entries = []
    splits = [("train", 5, first, (3, 1)), ("test", 3, 100, (2, 2))]
    if fmt != "icfg-pedes":
        splits.append(("val", 2, 200, (2,)))
    for split, ids, first_id, per_image in splits:
        for i in range(ids):
            for j, k in enumerate(per_image):
                entries.append({"split": split, "id": first_id + i,
                                key: f"{split}/{first_id + i}_{j}.png",
                                "captions": [next(captions) for _ in range(k)]})
    order = np.random.default_rng(1).permutation(len(entries))
    entries = [entries[i] for i in order]
    for n, e in enumerate(entries):
        if fmt == "cuhk-pedes":          # the real file's extra field; neither reader uses it
            e["processed_tokens"] = [c.lower().split() for c in e["captions"]]
        path = root / "imgs" / e[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 32), (n * 7 % 256, n * 31 % 256, 90)).save(path)
    (root / name).write_text(json.dumps(entries))
    return root


# -- their side ---------------------------------------------------------------------------------

# Runs in a child process whose working folder is their code: their readers, tokenize and noise
# injection, imported module by module (their datasets/__init__.py imports torchvision for the
# loaders, which the compared path does not use).
THEIR_SIDE = r'''
import importlib, json, sys, types
import numpy as np
code, job = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, code)
stubbed = []
for name in ("ftfy", "prettytable", "easydict"):
    try:
        importlib.import_module(name)
    except ImportError:
        stub = types.ModuleType(name)
        stub.fix_text, stub.PrettyTable, stub.EasyDict = (lambda text: text), object, dict
        sys.modules[name] = stub
        stubbed.append(name)
package = types.ModuleType("datasets")
package.__path__ = [code + "/datasets"]
sys.modules["datasets"] = package
bases = importlib.import_module("datasets.bases")
module, cls = job["reader"].split(".")
ds = getattr(importlib.import_module("datasets." + module), cls)(root=job["root"], verbose=False)
tok = bases.SimpleTokenizer()
def ids(caption):
    try:
        return bases.tokenize(caption, tok, 77, True).tolist()
    except Exception as exc:
        return "%s: %s" % (type(exc).__name__, exc)
rel = lambda p: p.split("/imgs/", 1)[1]
out = {"stubbed": stubbed, "num_classes": len(ds.train_id_container),
       "train": [[pid, image_id, rel(path), caption] for pid, image_id, path, caption in ds.train],
       "special": {k: tok.encoder[k] for k in ("<|mask|>", "<|startoftext|>", "<|endoftext|>")},
       "noisy": {}}
for split in ("test", "val"):
    d = getattr(ds, split)
    out[split] = {"images": [[p, rel(q)] for p, q in zip(d["image_pids"], d["img_paths"])],
                  "captions": [[p, c] for p, c in zip(d["caption_pids"], d["captions"])]}
out["tokens"] = {"train": [ids(t[3]) for t in ds.train],
                 "test": [ids(c) for c in ds.test["captions"]],
                 "val": [ids(c) for c in ds.val["captions"]]}
inject = getattr(bases, "inject_noisy_correspondence", None)
for name, path in job.get("noise", {}).items():
    if inject is not None:
        noisy, clean = inject(list(ds.train), job["rate"], path)
        out["noisy"][name] = {"captions": [t[3] for t in noisy], "clean": clean.tolist()}
json.dump(out, open(job["result"], "w"))
'''


def run_theirs(code: Path, fmt: str, root: Path, work: Path, noise: dict | None = None) -> dict:
    result = work / f"theirs-{code.name}-{fmt}.json"
    job = {"reader": FORMATS[fmt][3], "root": str(root.parent), "rate": RATE,
           "noise": {k: str(v) for k, v in (noise or {}).items()}, "result": str(result)}
    proc = subprocess.run([sys.executable, "-c", THEIR_SIDE, str(code), json.dumps(job)],
                          cwd=code, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"their code ({code}) failed on the {fmt} fixture:\n{proc.stderr}")
    return json.loads(result.read_text())


def clip_tokenizer_from(vocab_gz: Path, folder: Path) -> CaptionTokenizer:
    """A CLIP BPE tokenizer folder (vocab.json, merges.txt) made from their vocabulary file as
    CLIP's own files are made: byte symbols, the same with </w>, the first 48894 merges, then the
    start and end tokens (49408 in all)."""
    merges = gzip.open(vocab_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return CaptionTokenizer.from_pretrained(folder)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


# -- our side -----------------------------------------------------------------------------------


def shard(fmt: str, root: Path, out: Path, *extra) -> dict[str, list[dict]]:
    """`tbps shard` as a user runs it; the manifest's rows per split in index order."""
    argv = ["shard", "--format", fmt, "--root", str(root), "--out", str(out), "--tokenizer",
            "none", "--quiet", *map(str, extra)]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = tbps_main(argv)
    if code != 0:
        raise RuntimeError(f"tbps {' '.join(argv)} exited {code}: {err.getvalue()}")
    rows = read_manifest(out).to_pylist()
    return {s: sorted((r for r in rows if r["split"] == s), key=lambda r: r["index"])
            for s in ("train", "val", "test")}


def eval_view(rows: list[dict]) -> dict:
    """What the evaluation reads: one image per image id (the first row), every caption."""
    seen, images = set(), []
    for r in rows:
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            images.append([r["pid"], r["image_path"]])
    return {"images": images, "captions": [[r["pid"], r["caption"]] for r in rows]}


# -- comparing ----------------------------------------------------------------------------------


def compare(name: str, theirs: list, ours: list, *, key=lambda x: x) -> dict:
    """Element-wise comparison: counts and the first differences."""
    diffs = [{"at": i, "theirs": t, "ours": o} for i, (t, o) in enumerate(zip(theirs, ours))
             if key(t) != key(o)]
    out = {"what": name, "compared": min(len(theirs), len(ours)), "differences": len(diffs),
           "examples": diffs[:EXAMPLES]}
    if len(theirs) != len(ours):
        out.update(differences=len(diffs) + abs(len(theirs) - len(ours)),
                   lengths={"theirs": len(theirs), "ours": len(ours)})
    return out


def _norm(text: str) -> str:
    return " ".join(text.split())


def stage_splits(theirs: dict, ours: dict) -> list[dict]:
    out = [compare("train pairs (pid, image id, image)",
                   [t[:3] for t in theirs["train"]],
                   [[r["pid"], r["image_id"], r["image_path"]] for r in ours["train"]])]
    for split in ("test", "val"):
        view = eval_view(ours[split])
        out.append(compare(f"{split} images (pid, image)", theirs[split]["images"],
                           view["images"]))
        out.append(compare(f"{split} query pids", [c[0] for c in theirs[split]["captions"]],
                           [c[0] for c in view["captions"]]))
    out.append(compare("train identities", [theirs["num_classes"]],
                       [len({r["pid"] for r in ours["train"]})]))
    return out


def stage_captions(theirs: dict, ours: dict) -> list[dict]:
    t = [x[3] for x in theirs["train"]] + [c for s in ("test", "val")
                                           for _, c in theirs[s]["captions"]]
    o = [r["caption"] for s in ("train", "test", "val") for r in ours[s]]
    return [compare("captions, exactly", t, o),
            compare("captions, whitespace normalised", t, o, key=_norm)]


def stage_tokens(theirs: dict, ours: dict, tok: CaptionTokenizer, ftfy_stubbed: bool) -> dict:
    captions = [r["caption"] for s in ("train", "test", "val") for r in ours[s]]
    their_ids = [i for s in ("train", "test", "val") for i in theirs["tokens"][s]]
    our_ids = tok.encode_batch(captions).tolist()
    counts = {"captions": len(captions), "same_to_end_token": 0, "differ": 0, "their_errors": 0,
              "padding_differs": 0, "not_compared_ftfy": 0, "truncated": 0}
    examples = []
    for caption, t, o in zip(captions, their_ids, our_ids):
        if ftfy_stubbed and any(c in caption for c in FTFY_CHARS):
            counts["not_compared_ftfy"] += 1
            continue
        if isinstance(t, str):
            counts["their_errors"] += 1
            examples.append({"caption": caption, "theirs": t, "ours": _upto_end(o, tok.eot_id)})
            continue
        end = o.index(tok.eot_id) + 1
        counts["truncated"] += end == len(o)
        if t[:end] == o[:end]:
            counts["same_to_end_token"] += 1
        else:
            counts["differ"] += 1
            examples.append({"caption": caption, "theirs": _upto_end(t, 49407),
                             "ours": _upto_end(o, tok.eot_id)})
        counts["padding_differs"] += t[end:] != o[end:]
    unique = list({e["caption"]: e for e in examples}.values())
    return {**counts, "examples": unique[:EXAMPLES + 2],
            "padding": {"theirs": sorted({i for row in their_ids if not isinstance(row, str)
                                          for i in row[row.index(49407) + 1:]}),
                        "ours": tok.pad_id}}


FTFY_CHARS = "\u2018\u2019\u201c\u201d"


def _upto_end(ids: list[int], eot: int) -> list[int]:
    return ids[: ids.index(eot) + 1] if eot in ids else ids


def stage_noise(theirs: dict, ours_by_file: dict[str, dict]) -> list[dict]:
    """Per index file, every train pair's clean flag and caption (whitespace normalised: the
    whitespace a reader keeps is the captions stage's business) after each code applied it."""
    out = []
    for name, rows in ours_by_file.items():
        got = theirs["noisy"][name]
        flags = compare(f"{name}: clean flags", [bool(k) for k in got["clean"]],
                        [not r["noisy"] for r in rows["train"]])
        flags["noisy_pairs"] = {"theirs": len(got["clean"]) - sum(got["clean"]),
                                "ours": sum(r["noisy"] for r in rows["train"])}
        out += [flags, compare(f"{name}: captions", got["captions"],
                               [r["caption"] for r in rows["train"]], key=_norm)]
    return out


# -- the run ------------------------------------------------------------------------------------


def run(rde: Path, irra: Path, work: Path) -> dict:
    tok = clip_tokenizer_from(irra / "data/bpe_simple_vocab_16e6.txt.gz", work / "clip-bpe")
    results, stubbed = {}, {}
    for fmt in FORMATS:
        root = write_fixture(work / "data", fmt)
        clean = shard(fmt, root, work / f"ours-{fmt}")
        seeded_file, their_file = work / f"ours-{fmt}-seeded.npy", work / f"theirs-{fmt}.npy"
        seeded = shard(fmt, root, work / f"ours-{fmt}-seeded", "--noise-rate", RATE,
                       "--noise-seed", SEED, "--write-noise-index", seeded_file)
        for code, label in ((rde, "rde"), (irra, "irra")):
            noise = {"ours_seeded": seeded_file, "theirs_written": their_file}
            theirs = run_theirs(code, fmt, root, work, noise if label == "rde" else None)
            stubbed[label] = theirs["stubbed"]
            res = {"splits": stage_splits(theirs, clean),
                   "captions": stage_captions(theirs, clean),
                   "tokens": stage_tokens(theirs, clean, tok, "ftfy" in theirs["stubbed"]),
                   "special_ids": {"theirs": theirs["special"],
                                   "ours": {"<|mask|>": tok.mask_id,
                                            "<|startoftext|>": tok.sot_id,
                                            "<|endoftext|>": tok.eot_id}}}
            if label == "rde":
                ours_noise = {"ours_seeded": seeded,
                              "ours_seeded_reloaded": shard(fmt, root, work / f"ours-{fmt}-re",
                                                            "--noise-index", seeded_file),
                              "theirs_written": shard(fmt, root, work / f"ours-{fmt}-theirs",
                                                      "--noise-index", their_file)}
                theirs_noise = dict(theirs, noisy={**theirs["noisy"], "ours_seeded_reloaded":
                                                   theirs["noisy"]["ours_seeded"]})
                res["noise"] = stage_noise(theirs_noise, ours_noise)
                res["noise_files"] = {k: {"pairs": len(v["train"]),
                                          "noisy_pairs": sum(r["noisy"] for r in v["train"])}
                                      for k, v in ours_noise.items()}
            results.setdefault(label, {})[fmt] = res
    return {"results": results, "stubbed_modules": stubbed, "shipped_noise_index": shipped(rde)}


def shipped(rde: Path) -> list[dict]:
    rows = []
    for f in sorted(rde.glob("noiseindex/*.npy")):
        n = len(np.load(f, allow_pickle=False))
        src = read_noise_index(f, n)
        rows.append({"file": f.name, "pairs": n, "noisy_pairs": int((src != np.arange(n)).sum()),
                     "realised_rate": round(noisy_fraction(src), 6)})
    return rows


def git_commit(path: Path, given: str | None) -> str:
    if given:
        return given
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (pass --rde-commit/--irra-commit)"


def totals(results: dict) -> dict:
    """Differences per code and stage, summed over the formats (tokens: captions whose ids up to
    the end token differ or that their tokenizer refused)."""
    out = {}
    for label, per_fmt in results.items():
        t = out.setdefault(label, {})
        for res in per_fmt.values():
            for stage in ("splits", "captions", "noise"):
                for item in res.get(stage, []):
                    k = f"{stage}: {item['what']}"
                    t[k] = t.get(k, 0) + item["differences"]
            tk = res["tokens"]
            for k in ("captions", "same_to_end_token", "differ", "their_errors",
                      "not_compared_ftfy", "truncated", "padding_differs"):
                t[f"tokens: {k}"] = t.get(f"tokens: {k}", 0) + tk[k]
    return out


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = ["# The data path against the authors' code", "",
             f"- command: `{env['command']}`",
             f"- this project: {env['commit']}; RDE (QinYang79/RDE): {record['rde_commit']}; "
             f"IRRA (anosorae/IRRA): {record['irra_commit']}",
             f"- machine: {env['cpu']}; python {env['python']}, transformers "
             f"{env['transformers']}; {env['time']}",
             f"- modules their code imports that were missing, stubbed: "
             f"{json.dumps(record['stubbed_modules'])}", "",
             "Fixture per format (CUHK-PEDES, ICFG-PEDES, RSTPReid): 5 train identities (10 "
             "images, 20 pairs), 3 test identities (6 images, 12 queries), 2 val identities "
             "except ICFG-PEDES (2 images, 4 queries); splits interleaved in the file.", "",
             "## Differences, summed over the three formats", "",
             "| stage | RDE | IRRA |", "|---|---:|---:|"]
    tot = record["totals"]
    for k in dict.fromkeys(k for v in tot.values() for k in v):
        lines.append(f"| {k} | {tot.get('rde', {}).get(k, '-')} | "
                     f"{tot.get('irra', {}).get(k, '-')} |")
    lines += ["", "Stages count differing elements; tokens count captions (their ids against "
              "ours up to the end token; `padding_differs`: rows whose padding differs). Noise "
              "files: `ours_seeded` written by `tbps shard --noise-rate 0.5 --noise-seed 0 "
              "--write-noise-index` and applied by their inject_noisy_correspondence; "
              "`ours_seeded_reloaded` the same file applied by `tbps shard --noise-index`; "
              "`theirs_written` written by their inject_noisy_correspondence (its unseeded "
              "shuffle, rate 0.5) and applied by `tbps shard --noise-index`.",
              "", "## Examples", ""]
    seen = set()
    for label, per_fmt in record["results"].items():
        for fmt, res in per_fmt.items():
            items = [i for s in ("splits", "captions", "noise") for i in res.get(s, [])
                     if i["differences"]]
            for i in items:
                lines.append(f"- {label} / {fmt} / {i['what']}: {i['differences']} of "
                             f"{i['compared']}; e.g. `{json.dumps(i['examples'][:1])}`")
            for ex in res["tokens"]["examples"]:
                if (label, ex["caption"]) not in seen:
                    seen.add((label, ex["caption"]))
                    lines.append(f"- {label} / token ids of `{ex['caption']!r}`: theirs "
                                 f"`{ex['theirs']}`, ours `{ex['ours']}`")
    lines += ["", "## Noisy pairs per index file (RDE)", "",
              "| format | file | pairs | noisy pairs, theirs | noisy pairs, ours |",
              "|---|---|---:|---:|---:|"]
    for fmt, res in record["results"].get("rde", {}).items():
        for item in res["noise"]:
            if "noisy_pairs" in item:
                lines.append(f"| {fmt} | {item['what'].split(':')[0]} | {item['compared']} | "
                             f"{item['noisy_pairs']['theirs']} | {item['noisy_pairs']['ours']} |")
    lines += ["", "## RDE's shipped noise index files (read by `read_noise_index`)", "",
              "| file | pairs | noisy pairs | realised rate |", "|---|---:|---:|---:|"]
    for r in record["shipped_noise_index"]:
        lines.append(f"| {r['file']} | {r['pairs']} | {r['noisy_pairs']} | "
                     f"{r['realised_rate']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Captions: this project's reader strips surrounding whitespace; the authors keep the raw "
    "string. Their tokenizer strips it too, so the token ids do not depend on it.",
    "Padding: the authors pad with 0, this project with the end token (49407, CLIP's own "
    "padding). The text encoder is causal and both codes find the end token by position "
    "(theirs by argmax, the end token being the largest id), so no feature up to the end token "
    "depends on it; padding is read only by IRRA's cross-modal encoder, which has no padding "
    "mask in the authors' code and masks padding in this project.",
    "<|mask|>: the authors' vocabulary drops the last BPE merge's token (`jekyll</w>`, id 49405) "
    "and gives its id to <|mask|>; this project keeps CLIP's 49408 tokens and adds <|mask|> as "
    "49408. A caption holding that word makes their tokenizer raise KeyError.",
    "HTML entities: the authors unescape them (html.unescape twice, ftfy); this project's CLIP "
    "tokenizer reads `&amp;` as three tokens.",
    "The noise comparison reads every pair's caption and clean flag after the authors' "
    "inject_noisy_correspondence and in this project's shard manifest. Their shuffle is "
    "unseeded, so `theirs_written` differs from run to run (and leaves some chosen pairs in "
    "place: fewer noisy pairs than the rate's 10); the comparison holds for the file it wrote.",
    "ftfy was missing here and replaced by the identity in their code: captions holding "
    "characters ftfy changes (the curly apostrophe of the fixture) are counted as "
    "`not_compared_ftfy`, not compared. prettytable and easydict (missing too) are used only "
    "for printing statistics and configs, off the compared path; torchvision (missing) is "
    "imported only by their datasets/__init__.py and build.py, which the comparison bypasses.",
    "Not compared here: images and their transforms (the fixture's images are only paths "
    "here), the training order and the samplers.",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rde", required=True, type=Path)
    p.add_argument("--irra", required=True, type=Path)
    p.add_argument("--rde-commit", help="their commit, where the checkout has no .git")
    p.add_argument("--irra-commit", help="their commit, where the checkout has no .git")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    rde = args.rde / "2024-CVPR-RDE" if (args.rde / "2024-CVPR-RDE").is_dir() else args.rde
    for path, what in ((rde / "datasets/bases.py", "--rde"),
                       (args.irra / "datasets/bases.py", "--irra"),
                       (args.irra / "data/bpe_simple_vocab_16e6.txt.gz", "--irra")):
        if not path.is_file():
            print(f"error: {what}: {path} does not exist; give a checkout of their repository",
                  file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="data-path-") as work:
        record = run(rde, args.irra, Path(work))
    record.update(environment=environment("python launch/parity/data_path.py", argv),
                  rde_commit=git_commit(args.rde, args.rde_commit),
                  irra_commit=git_commit(args.irra, args.irra_commit), notes=NOTES)
    record["totals"] = totals(record["results"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_path.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    (args.out / "data_path.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
