"""Text-to-image search with a trained model: embed a gallery once, then query it with sentences.

    tbps search index runs/irra-synth/best photos/ --out photos.idx
    tbps search index runs/irra-synth/best shards/synth --split test --out test.idx
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m tbps.trainer.inference.search index \
        runs/irra-synth/best photos/ --out photos.idx                      # every rank embeds a share
    tbps search query photos.idx "a woman in a red coat" "a man with a black bag"
    tbps search query photos.idx --file queries.txt --top-k 5 --json
    tbps search query photos.idx "a man in blue jeans" --grid hits.png

WEIGHTS is a weights folder of a run (best/, final/) or its transformers export (hf/; it holds the
global branch only). GALLERY is a folder of images, searched recursively (an image's sub-folder is
its id), or a shard folder (one entry per image of `--split`, the person id as its id).

The index folder holds `index.parquet` (one row per image, sorted by key: key, path, id, source,
stamp, and one float32 embedding column `emb_<branch>` per branch the recipe scores with, e.g.
bge and tse) and `index.json` (the model, its weights' sha256, branches and dimensions, count,
the gallery, the files skipped and why). The same gallery and weights give the same bytes.
Re-running `index` on a grown or changed gallery embeds only the new or changed images (a file's
size and modification time, a shard sample's sha1) and drops the removed ones; the weights must
be the same. A missing, unreadable or non-image file is reported and skipped.

`query` ranks the whole gallery exactly by default: the recipe's similarity over gallery chunks
(a matrix product), the top k through `tbps.kernels.topk_select` on the device, ties to the lower key.
`index --approximate` also writes an HNSW graph (faiss, `pip install faiss-cpu`) over the
branches side by side; `query --approximate` searches it (any similarity that is a weighted sum
of per-branch dot products, which the query side applies). `tbps bench search`
measures its recall@10 against exact search.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from tbps.data_pipeline.transforms import prepare_batch
from tbps.kernels.topk_select import topk_select
from tbps.trainer.inference.gallery import Item, Problem, decode, gallery_kind, list_gallery, read_items
from tbps.trainer.running import dist

log = logging.getLogger(__name__)

TABLE, HEADER, APPROX = "index.parquet", "index.json", "approx.faiss"
FORMAT = "tbps-search-index/1"
TEXT_COLUMNS = ("key", "path", "id", "source", "stamp")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
QUERY_CHUNK = 256


# -- the model -------------------------------------------------------------------------------


class _GlobalSimilarity:
    """The similarity of a model with the global branch only (a transformers export)."""

    def similarity(self, text: dict, image: dict) -> dict[str, torch.Tensor]:
        return {"t2i": text["bge"] @ image["bge"].T}


class TransformersModel(nn.Module):
    """An exported transformers CLIP folder behind the trained model's interface."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.recipe = clip, _GlobalSimilarity()

    def forward(self, batch: dict, mode: str):
        if mode == "image":
            out = self.clip.get_image_features(pixel_values=batch["image"],
                                               interpolate_pos_encoding=True)
        else:
            out = self.clip.get_text_features(input_ids=batch["input_ids"])
        out = getattr(out, "pooler_output", out)
        return {"bge": F.normalize(out.float(), dim=-1)}


@dataclass
class Embedder:
    """A trained model ready to embed gallery images and query sentences."""

    model: nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    device: torch.device
    kind: str                       # "weights" or "transformers"
    path: str
    sha256: str
    dims: dict | None = None        # {branch: dimension}
    similarities: dict | None = None  # {name: {branch: weight} or None when not linear}

    @torch.no_grad()
    def images(self, images_BHWC: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 B x H x W x 3 at image_size -> {branch: B x D}, L2-normalised."""
        B = images_BHWC.shape[0]
        ids = np.stack([self.tokenizer.encode("")] * B)
        return self.model(prepare_batch(loader_batch(ids, images_BHWC), self.device),
                          mode="image")

    @torch.no_grad()
    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer.encode_batch(list(texts))
        return self.model(prepare_batch(loader_batch(ids), self.device), mode="text")

    def similarity(self, text: dict, image: dict) -> dict[str, torch.Tensor]:
        return self.model.recipe.similarity(text, image)


def loader_batch(ids: np.ndarray, images: torch.Tensor | None = None) -> dict:
    """A batch shaped as the evaluation loader makes it."""
    n = ids.shape[0]
    batch = {"input_ids": torch.from_numpy(ids), "pid": torch.zeros(n, dtype=torch.long),
             "index": torch.arange(n), "image_id": torch.arange(n),
             "noisy": torch.zeros(n, dtype=torch.bool)}
    if images is not None:
        batch["image"] = images
    return batch


def load_embedder(path: Path, device=None) -> Embedder:
    """A weights folder or an exported transformers folder; ValueError / FileNotFoundError
    naming the folder when it is neither or cannot be read."""
    from tbps.trainer.model.weights import WEIGHTS

    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not path.is_dir():
        raise FileNotFoundError(f"weights {path} is not a folder: pass a weights folder of a run "
                                "(best/ or final/) or its transformers export (hf/)")
    if (path / "tbps_export.json").is_file():
        kind, files = "transformers", sorted(path.glob("*.safetensors"))
    elif (path / WEIGHTS).is_file():
        kind, files = "weights", [path / WEIGHTS]
    else:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS} (a weights folder of a run) nor "
                                "tbps_export.json (a transformers export): pass best/, final/ or "
                                "hf/ of a run")
    try:
        model, tokenizer, image_size = (_load_weights(path) if kind == "weights"
                                        else _load_transformers(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"cannot load the model in {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as any library's error
        raise ValueError(f"cannot load the model in {path} ({type(exc).__name__}: {exc}); is the "
                         "folder complete? Copy it again or export it again") from None
    emb = Embedder(model.to(device).eval(), tokenizer, image_size, device, kind,
                   str(path.resolve()), sha256_of(files))
    probe_t = emb.texts(["a person"])
    probe_i = emb.images(torch.zeros(1, *image_size, 3, dtype=torch.uint8))
    emb.dims = {b: int(v.shape[-1]) for b, v in sorted(probe_i.items())}
    if {b: int(v.shape[-1]) for b, v in sorted(probe_t.items())} != emb.dims:
        raise ValueError(f"{path}: text and image branches differ")
    emb.similarities = linear_forms(emb.similarity, emb.dims, device)
    return emb


def _load_weights(path: Path):
    from tbps.trainer.model.weights import load_weights_folder

    cfg, tokenizer, model = load_weights_folder(path)
    return model, tokenizer, tuple(cfg.model.image_size)


def _load_transformers(path: Path):
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    from tbps.data_pipeline.tokenizer import CaptionTokenizer

    hf_logging.disable_progress_bar()

    info = json.loads((path / "tbps_export.json").read_text())
    tokenizer = CaptionTokenizer.from_pretrained(path, context_length=info["context_length"])
    clip = CLIPModel.from_pretrained(str(path))
    return TransformersModel(clip), tokenizer, tuple(info["image_size"])


def sha256_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def linear_forms(similarity, dims: dict[str, int], device) -> dict[str, dict | None]:
    """{similarity name: {branch: w}} where the similarity is sum_b w_b <t_b, i_b> (checked on
    random embeddings), None where it is not: what an approximate index can serve."""
    def unit(b):
        out = {c: torch.zeros(1, d, device=device) for c, d in dims.items()}
        out[b][0, 0] = 1.0
        return out

    weights = {}
    for b in dims:
        for name, s in similarity(unit(b), unit(b)).items():
            weights.setdefault(name, {})[b] = float(s[0, 0])
    g = torch.Generator().manual_seed(0)
    t = {b: torch.randn(3, d, generator=g).to(device) for b, d in dims.items()}
    i = {b: torch.randn(5, d, generator=g).to(device) for b, d in dims.items()}
    out = {}
    for name, s in similarity(t, i).items():
        want = sum(w * (t[b] @ i[b].T) for b, w in weights[name].items())
        out[name] = weights[name] if torch.allclose(s, want, rtol=1e-4, atol=1e-4) else None
    return out


# -- the index -------------------------------------------------------------------------------


@dataclass
class Index:
    header: dict
    rows: dict[str, list[str]]               # TEXT_COLUMNS
    emb: dict[str, torch.Tensor]             # {branch: N x D float32}

    def __len__(self) -> int:
        return len(self.rows["key"])


def load_index(folder: Path) -> Index:
    folder = Path(folder)
    if not (folder / HEADER).is_file() or not (folder / TABLE).is_file():
        raise FileNotFoundError(f"{folder} is no search index (no {HEADER} / {TABLE}): build one "
                                "with `tbps search index WEIGHTS GALLERY --out "
                                f"{folder}`")
    try:
        header = json.loads((folder / HEADER).read_text())
        table = pq.read_table(folder / TABLE)
        rows = {c: table[c].to_pylist() for c in TEXT_COLUMNS}
        emb = {}
        for b, d in header["branches"].items():
            flat = table[f"emb_{b}"].combine_chunks().flatten().to_numpy()
            emb[b] = torch.from_numpy(flat.reshape(len(table), d).copy())
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as any library's error
        raise ValueError(f"the index in {folder} is damaged ({type(exc).__name__}: {exc}); build "
                         "it again with `tbps search index`") from None
    if header.get("format") != FORMAT or header.get("count") != len(table):
        raise ValueError(f"the index in {folder} is of another format or incomplete (format "
                         f"{header.get('format')!r}, {header.get('count')} rows announced, "
                         f"{len(table)} found); build it again")
    return Index(header, rows, emb)


def _write_index(folder: Path, header: dict, rows: dict[str, list], emb: dict[str, np.ndarray]
                 ) -> None:
    """Table, then header, each atomically (a header always describes a complete table)."""
    folder.mkdir(parents=True, exist_ok=True)
    cols = {c: pa.array(rows[c], type=pa.string()) for c in TEXT_COLUMNS}
    for b, e in sorted(emb.items()):
        cols[f"emb_{b}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(e.astype(np.float32).reshape(-1)), e.shape[1])
    tmp = folder / (TABLE + ".partial")
    pq.write_table(pa.table(cols), tmp, compression="zstd")
    os.replace(tmp, folder / TABLE)
    tmp = folder / (HEADER + ".partial")
    tmp.write_text(json.dumps(header, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / HEADER)


def _reusable(out: Path, embedder: Embedder, gallery: dict) -> Index | None:
    """The index already in `out` when it can grow, None when there is none; refuses one built
    with other weights or over another gallery."""
    if not (out / HEADER).exists():
        return None
    old = load_index(out)
    h = old.header
    if h["model"]["sha256"] != embedder.sha256:
        raise ValueError(f"the index in {out} was built with other weights (sha256 "
                         f"{h['model']['sha256'][:12]}..., from {h['model']['path']}); this model's "
                         f"are {embedder.sha256[:12]}...: pass a new --out, or delete {out}")
    if h["gallery"] != gallery:
        raise ValueError(f"the index in {out} covers another gallery ({h['gallery']}, not "
                         f"{gallery}): pass a new --out, or delete {out}")
    return old


def build_index(embedder: Embedder, gallery: Path, out: Path, *, split: str = "test",
                batch_size: int = 64, workers: int = 2, approximate: bool = False,
                progress: bool = True) -> dict:
    """Embed the new and changed images of `gallery` into the index in `out`; every rank takes a
    share, rank 0 writes. Returns a summary (on every rank)."""
    gallery, out = Path(gallery), Path(out)
    kind = gallery_kind(gallery)
    where = {"path": str(gallery.resolve()), "kind": kind,
             "split": split if kind == "shards" else None}
    items, problems = list_gallery(gallery, split, exclude=out)
    old = _reusable(out, embedder, where)
    have = {} if old is None else dict(zip(old.rows["key"], old.rows["stamp"]))
    pending = [it for it in items if have.get(it.key) != it.stamp]
    counts = _balanced(len(pending), dist.world_size())
    start = sum(counts[:dist.rank()])
    mine = pending[start:start + counts[dist.rank()]]
    done, emb, bad = _embed_items(embedder, gallery, mine, batch_size, workers,
                                  progress and dist.rank() == 0)
    positions = dist.gather_varlen(torch.tensor([start + j for j in done], dtype=torch.long,
                                                device=embedder.device))
    new = {b: dist.gather_varlen(e).cpu().numpy() for b, e in sorted(emb.items())}
    problems = problems + [p for part in dist.all_gather_object(bad) for p in part]
    summary = {"images": len(items), "embedded": int(positions.numel()),
               "kept": len(items) - len(pending), "skipped": len(problems),
               "removed": 0 if old is None else len(set(have) - {it.key for it in items})}
    if dist.rank() == 0:
        rows, vecs = _merge(items, pending, positions.tolist(), new, old, embedder.dims)
        header = {"format": FORMAT, "count": len(rows["key"]), "gallery": where,
                  "model": {"path": embedder.path, "kind": embedder.kind,
                            "sha256": embedder.sha256, "image_size": list(embedder.image_size)},
                  "branches": embedder.dims, "similarities": embedder.similarities,
                  "skipped": sorted((p.as_dict() for p in problems), key=lambda d: d["path"]),
                  "approximate": _write_approximate(out, vecs) if approximate else None}
        if not approximate and (out / APPROX).exists():
            (out / APPROX).unlink()            # it would describe the old rows
        _write_index(out, header, rows, vecs)
    dist.barrier()
    return summary


def _merge(items: list[Item], pending: list[Item], positions: list[int],
           new: dict[str, np.ndarray], old: Index | None, dims: dict[str, int]):
    """Rows and embeddings of the new index, sorted by key: the embedded pending items (row r of
    `new` is pending[positions[r]]) and the old rows of unchanged items."""
    fresh = {pending[p].key: r for r, p in enumerate(positions)}
    current = {it.key: it for it in items}
    unchanged = {} if old is None else {
        k: j for j, (k, s) in enumerate(zip(old.rows["key"], old.rows["stamp"]))
        if k in current and current[k].stamp == s}
    keys = sorted(k for k in current if k in fresh or k in unchanged)
    rows = {c: [getattr(current[k], c) for k in keys] for c in TEXT_COLUMNS}
    vecs = {}
    for b, d in dims.items():
        vecs[b] = np.zeros((len(keys), d), np.float32)
        for n, k in enumerate(keys):
            vecs[b][n] = new[b][fresh[k]] if k in fresh else old.emb[b][unchanged[k]].numpy()
    return rows, vecs


def _balanced(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _embed_items(embedder: Embedder, gallery: Path, items: list[Item], batch_size: int,
                 workers: int, progress: bool):
    """(positions of the embedded items, {branch: n x D} on the device, [Problem])."""
    from tbps.data_pipeline.progress import progress_bar

    done, feats, bad = [], {b: [] for b in embedder.dims}, []
    size = embedder.image_size

    def load(pair):
        it, data = pair
        if isinstance(data, Problem):
            return data
        try:
            return decode(data, size)
        except UnidentifiedImageError:
            return Problem(it.path, "not a readable image (no format that PIL knows)")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return Problem(it.path, f"not a readable image ({re.sub(' at 0x[0-9a-f]+', '', str(exc))})")

    stream = read_items(gallery, items)
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            progress_bar("embedding gallery", total=len(items), unit="images",
                         enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = [next(stream) for _ in range(min(batch_size, len(items) - start))]
            images, pos = [], []
            for j, got in enumerate(pool.map(load, chunk)):
                if isinstance(got, Problem):
                    bad.append(got)
                else:
                    images.append(got)
                    pos.append(start + j)
            if images:
                out = embedder.images(torch.from_numpy(np.stack(images)))
                for b in feats:
                    feats[b].append(out[b].float())
                done.extend(pos)
            bar.advance(len(chunk))
    dev = embedder.device
    return done, {b: torch.cat(v) if v else torch.zeros(0, embedder.dims[b], device=dev)
                  for b, v in feats.items()}, bad


# -- approximate search (faiss) -------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("approximate search needs faiss: `pip install faiss-cpu` (or install this "
                         "package with its `search` extra); exact search needs nothing") from None
    return faiss


def _side_by_side(vecs: dict[str, np.ndarray], weights: dict[str, float] | None = None
                  ) -> np.ndarray:
    """Branches concatenated in name order, each scaled by its weight (the query side)."""
    parts = [v * (1.0 if weights is None else weights[b]) for b, v in sorted(vecs.items())]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _write_approximate(out: Path, vecs: dict[str, np.ndarray]) -> dict:
    faiss = _faiss()
    x = _side_by_side(vecs)
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(x)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / (APPROX + ".partial")))
    os.replace(out / (APPROX + ".partial"), out / APPROX)
    return {"library": "faiss", "kind": f"HNSW{HNSW_M},Flat inner product",
            "ef_construction": HNSW_EF_CONSTRUCTION, "file": APPROX}


def approximate_topk(folder: Path, text: dict[str, torch.Tensor], weights: dict[str, float],
                     k: int, ef_search: int = HNSW_EF_SEARCH) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = _faiss()
    index = faiss.read_index(str(Path(folder) / APPROX))
    index.hnsw.efSearch = max(ef_search, k)
    q = _side_by_side({b: t.float().cpu().numpy() for b, t in text.items()}, weights)
    scores, ids = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(ids)


# -- exact search ----------------------------------------------------------------------------


def topk_rows(scores_QN: torch.Tensor, k: int, block: int = 1024, impl: str = "auto"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row (values, column indices), ties to the lower index, through
    `tbps.kernels.topk_select` on blocks of `block` columns and then on the blocks' winners (the
    kernel keeps a row in registers, so rows are cut to a size it holds)."""
    Q, N = scores_QN.shape
    k = min(k, N)
    block = max(block, 4 * k)
    scores, valid, cols = scores_QN, None, None      # cols: original column of each position
    while scores.shape[1] > block:
        n = scores.shape[1]
        nb = -(-n // block)
        pad = nb * block - n
        s = F.pad(scores, (0, pad), value=float("-inf")).reshape(Q * nb, block)
        v = torch.ones(Q, n, dtype=torch.bool, device=scores.device) if valid is None else valid
        v = F.pad(v, (0, pad), value=False).reshape(Q * nb, block)
        sel = topk_select(s, v, k, impl=impl)
        offset = torch.arange(nb, device=scores.device).repeat(Q) * block
        pos = (sel.indices_Bk + offset[:, None]).reshape(Q, nb * k)
        scores = F.pad(scores, (0, pad)).gather(1, pos)
        valid = sel.valid_Bk.reshape(Q, nb * k)
        cols = pos if cols is None else cols.gather(1, pos)
    sel = topk_select(scores, valid, k, impl=impl)
    values = scores.gather(1, sel.indices_Bk)
    idx = sel.indices_Bk if cols is None else cols.gather(1, sel.indices_Bk)
    return values, idx


@torch.no_grad()
def exact_topk(similarity, text: dict[str, torch.Tensor], gallery: dict[str, torch.Tensor],
               name: str, k: int, chunk: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of similarity(text, gallery)[name] over the whole gallery, a chunk at a time."""
    G = next(iter(gallery.values())).shape[0]
    best_v = best_i = None
    for g0 in range(0, G, chunk):
        part = {b: e[g0:g0 + chunk] for b, e in gallery.items()}
        v, i = topk_rows(similarity(text, part)[name], k)
        i = i + g0
        if best_v is not None:                 # the earlier chunk first: ties keep the lower index
            v, j = topk_rows(torch.cat([best_v, v], 1), k)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_v, best_i = v, i
    return best_v, best_i


@dataclass
class Hit:
    rank: int
    score: float
    position: int
    key: str
    path: str
    id: str


def search(index: Index, embedder: Embedder, queries: list[str], *, top_k: int = 10,
           similarity: str | None = None, approximate: bool = False,
           folder: Path | None = None) -> tuple[str, list[list[Hit]]]:
    """(similarity used, hits per query)."""
    names = list(embedder.similarities)
    name = similarity or names[0]
    if name not in names:
        raise ValueError(f"--similarity {name!r}: this model scores with {names}")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if len(index) == 0:
        raise ValueError("the index holds no image (every gallery file was skipped?)")
    if approximate:
        weights = embedder.similarities[name]
        if index.header.get("approximate") is None:
            raise ValueError("this index has no approximate part: build it with `index "
                             "--approximate` (or search exactly, without --approximate)")
        if weights is None:
            linear = [n for n, w in embedder.similarities.items() if w is not None]
            raise ValueError(f"similarity {name!r} is not a weighted sum of branch dot products, "
                             f"which an approximate index needs; use one of {linear} or exact "
                             "search")
    gallery = {b: e.to(embedder.device) for b, e in index.emb.items()}
    parts = []
    for q0 in range(0, len(queries), QUERY_CHUNK):
        text = embedder.texts(queries[q0:q0 + QUERY_CHUNK])
        if approximate:
            parts.append(approximate_topk(folder, text, weights, min(top_k, len(index))))
        else:
            parts.append(exact_topk(embedder.similarity, text, gallery, name, top_k))
    values, idx = (torch.cat([p[i].cpu() for p in parts]) for i in (0, 1))
    results = []
    for q in range(len(queries)):
        hits = []
        for r, (s, p) in enumerate(zip(values[q].tolist(), idx[q].tolist())):
            if p < 0:                           # faiss found fewer than k
                continue
            hits.append(Hit(r + 1, float(s), p, index.rows["key"][p], index.rows["path"][p],
                            index.rows["id"][p]))
        results.append(hits)
    return name, results


# -- command line ----------------------------------------------------------------------------


def _read_queries(args) -> list[str]:
    queries = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"query file {path} does not exist (one query a line)")
        queries += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not queries:
        raise ValueError("no query: give sentences after the index, or --file with one a line")
    return queries


def _cmd_index(args) -> int:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    gallery_kind(Path(args.gallery))          # a missing gallery fails before the model loads
    embedder = load_embedder(Path(args.weights), acc.device)
    summary = build_index(embedder, Path(args.gallery), Path(args.out), split=args.split,
                          batch_size=args.batch_size, workers=args.workers,
                          approximate=args.approximate, progress=not args.no_progress)
    if acc.is_main_process:
        header = json.loads((Path(args.out) / HEADER).read_text())
        for p in header["skipped"][:20]:
            print(f"skipped {p['path']}: {p['reason']}", file=sys.stderr)
        if len(header["skipped"]) > 20:
            print(f"... and {len(header['skipped']) - 20} more (index.json lists them all)",
                  file=sys.stderr)
        print(json.dumps({"index": str(args.out), **summary, "count": header["count"],
                          "branches": header["branches"]}))
    return 0


def _cmd_query(args) -> int:
    queries = _read_queries(args)
    index = load_index(Path(args.index))
    weights = Path(args.weights or index.header["model"]["path"])
    embedder = load_embedder(weights)
    if embedder.sha256 != index.header["model"]["sha256"]:
        raise ValueError(f"the model in {weights} is not the one the index {args.index} was built "
                         "with (their sha256 differ): pass the right one with --weights, or "
                         "build the index again")
    name, results = search(index, embedder, queries, top_k=args.top_k, similarity=args.similarity,
                           approximate=args.approximate, folder=Path(args.index))
    if args.grid:
        from tbps.trainer.inference.report import draw_search_grid

        draw_search_grid(Path(index.header["gallery"]["path"]), index, queries, results,
                         Path(args.grid))
    if args.json:
        print(json.dumps({"similarity": name, "approximate": args.approximate, "results": [
            {"query": q, "hits": [h.__dict__ for h in hits]} for q, hits in zip(queries, results)]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for q, hits in zip(queries, results):
        table = Table(title=f"{q!r} ({name}{', approximate' if args.approximate else ''})")
        for col, justify in (("rank", "right"), ("score", "right"), ("path", "left"),
                             ("id", "left")):
            table.add_column(col, justify=justify)
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.4f}", h.path, h.id)
        console.print(table)
    if args.grid:
        console.print(f"grid: {args.grid}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed a gallery (only what is new since the last run)")
    ix.add_argument("weights", help="weights folder (best/, final/) or transformers export (hf/)")
    ix.add_argument("gallery", help="folder of images (recursive) or shard folder")
    ix.add_argument("--out", required=True, help="index folder (grown when it exists)")
    ix.add_argument("--split", default="test", help="split of a shard gallery (default test)")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument("--workers", type=int, default=2, help="image-decoding threads per rank")
    ix.add_argument("--approximate", action="store_true",
                    help="also write an HNSW graph (faiss) for `query --approximate`")
    ix.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("query", help="rank the gallery for sentences")
    q.add_argument("index", help="index folder written by `index`")
    q.add_argument("text", nargs="*", help="one or more queries")
    q.add_argument("--file", help="a text file of queries, one a line")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--similarity", help="which of the model's similarities (default its first)")
    q.add_argument("--approximate", action="store_true", help="search the HNSW graph")
    q.add_argument("--weights", help="the model, where it moved since the index was built")
    q.add_argument("--json", action="store_true", help="print JSON instead of tables")
    q.add_argument("--grid", help="also draw each query with its top-k images into this PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tbps.trainer.running import dist, errors

    dist.quiet_third_party()
    if args.command == "index":
        def run():
            errors.check_output(args.out, {"gallery": args.gallery, "weights": args.weights},
                                own_marker=HEADER)
            return _cmd_index(args)

        return errors.guard(run, on_stop="run the same command again")
    return errors.guard(lambda: _cmd_query(args))


if __name__ == "__main__":
    sys.exit(main())
