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

Here: `search` and the command line. The model is embedder.py, the index on disk
search_index.py, exact top k exact_topk.py, the HNSW graph approximate.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tbps.trainer.common import dist, errors
from tbps.trainer.inference.approximate import approximate_topk
from tbps.trainer.inference.drawing import draw_search_grid
from tbps.trainer.inference.embedder import Embedder, load_embedder
from tbps.trainer.inference.exact_topk import exact_topk
from tbps.trainer.inference.gallery import gallery_kind
from tbps.trainer.inference.search_index import HEADER, Index, build_index, load_index

QUERY_CHUNK = 256


# -- search ----------------------------------------------------------------------------------


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
    blank = [i + 1 for i, q in enumerate(queries) if not q.strip()]
    if blank:
        raise ValueError(f"query {blank[0]} is empty: a query is a sentence describing a person")
    return queries


def _cmd_index(args) -> int:
    acc = dist.local_accelerator()
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
        draw_search_grid(Path(index.header["gallery"]["path"]), index, queries, results,
                         Path(args.grid))
    if args.json:
        print(json.dumps({"similarity": name, "approximate": args.approximate, "results": [
            {"query": q, "hits": [h.__dict__ for h in hits]} for q, hits in zip(queries, results)]}))
        return 0
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
