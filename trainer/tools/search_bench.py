"""Search throughput: images embedded per second, and queries per second over galleries of 1k to
100k images, exact and approximate (with the approximate index's recall@10 against exact).

    tbps bench search                                   # the full run (CPU: minutes)
    tbps bench search --models synth --sizes 1000 --queries 100 --images 64   # quick
    tbps bench search --out launch/results/search_bench.json

1. Embedding: `build_index` over a folder of synthetic JPEGs (read, decode, resize, forward), for
   untrained models of two sizes: `synth` (the CPU default recipe, 96 x 32) and `vit-b16` (CLIP
   ViT-B/16's sizes at 384 x 128; random weights embed as fast as trained ones). Also the text side:
   captions embedded per second.
2. Search, with synthetic embeddings (no images needed): `--dim`-wide unit vectors of persons
   built from shared attributes (as the synthetic dataset's: sex, colours, bag, hair) plus a part
   of their own, 4 images a person with view noise, queries of random persons with more noise
   (`person_like`); `--embeddings unrelated` shares nothing between persons (the hard case for a
   graph index). Exact:
   `exact_topk` as `query` runs it (chunks of 256 queries, matrix product, `topk_rows`). Approximate:
   faiss HNSW (M 32, efConstruction 80, efSearch 128), its build time, queries/s and recall@10 =
   the share of exact top-10 it returns.
Prints a table and writes JSON with the machine, versions and command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tbps.data_pipeline.tokenizer import train_word_level
from tbps.kernels.environment import environment
from tbps.trainer.common.config_files import load_config
from tbps.trainer.inference.approximate import approximate_topk, load_faiss, write_approximate
from tbps.trainer.inference.embedder import load_embedder
from tbps.trainer.inference.exact_topk import exact_topk
from tbps.trainer.inference.search import QUERY_CHUNK
from tbps.trainer.inference.search_index import build_index
from tbps.trainer.model.sizes import overrides
from tbps.trainer.model.weights import build_model, save_weights

CAPTIONS = ["a woman in a red coat carrying a black backpack", "a man in blue jeans and white shoes",
            "a girl with long black hair wearing a yellow dress", "an old man with a grey hat"]
MODELS = {"synth": [], "vit-b16": overrides("ViT-B/16")}


def _weights(name: str, root: Path) -> Path:
    tok = train_word_level(CAPTIONS * 4, root / "tok")
    cfg = load_config(Path(__file__).parents[2] / "launch/configs/irra_synth.yaml",
                      ["train.precision=fp32", *MODELS[name]])
    torch.manual_seed(0)
    model = build_model(cfg, tok, num_classes=10, num_samples=10).eval()
    save_weights(model.state_dict(), root / name, cfg, tok, model.encoder.clip.config)
    return root / name


def bench_embedding(name: str, n_images: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embedder = load_embedder(_weights(name, root))
        h, w = embedder.image_size
        rng = np.random.default_rng(0)
        (root / "photos").mkdir()
        for i in range(n_images):                     # smooth noise: JPEG sizes like photos'
            small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
                root / "photos" / f"{i:06d}.jpg", quality=90)
        build_index(embedder, root / "photos", root / "warm", batch_size=batch_size,
                    progress=False)                 # warm-up (allocations, one-time set-up)
        t0 = time.perf_counter()
        build_index(embedder, root / "photos", root / "idx", batch_size=batch_size,
                    progress=False)
        images_s = n_images / (time.perf_counter() - t0)
        texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(256)]
        embedder.texts(texts[:32])
        t0 = time.perf_counter()
        for i in range(0, len(texts), 64):
            embedder.texts(texts[i:i + 64])
        texts_s = len(texts) / (time.perf_counter() - t0)
        params = sum(p.numel() for p in embedder.model.parameters())
    return {"model": name, "image_size": [h, w], "parameters": params, "images": n_images,
            "batch_size": batch_size, "images_per_s": images_s, "captions_per_s": texts_s}


def person_like(pids: np.ndarray, dim: int, rng: np.random.Generator, people: dict,
                spread: float) -> np.ndarray:
    """Unit vectors for the given person ids: each person is a sum of attribute vectors (six
    attributes of 2-10 values, as the synthetic persons' sex, colours, bag, hair) plus a vector of
    its own; `spread` adds view (image) or wording (caption) noise."""
    if "attrs" not in people:
        people["attrs"] = [rng.standard_normal((v, dim)).astype(np.float32)
                           for v in (2, 10, 10, 6, 4, 8)]
    for pid in np.unique(pids):
        if pid not in people:
            parts = [a[rng.integers(len(a))] for a in people["attrs"]]
            own = rng.standard_normal(dim).astype(np.float32) * 1.2
            people[pid] = np.sum(parts, axis=0) + own
    x = np.stack([people[p] for p in pids])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x + spread * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def unrelated(pids: np.ndarray, dim: int, rng: np.random.Generator, people: dict,
              spread: float) -> np.ndarray:
    """As person_like, but persons share nothing (independent random directions): past a
    person's own images every neighbour is about as far as any other, the hard case for a graph
    index (recall@10 counts those near-ties too)."""
    for pid in np.unique(pids):
        if pid not in people:
            people[pid] = rng.standard_normal(dim).astype(np.float32)
    x = np.stack([people[p] for p in pids])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x + spread * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


EMBEDDINGS = {"person": person_like, "unrelated": unrelated}


def bench_search(size: int, dim: int, n_queries: int, approximate: bool, kind: str = "person",
                 seed: int = 0) -> dict:
    rng, people, make = np.random.default_rng(seed), {}, EMBEDDINGS[kind]
    ids = max(1, size // 4)
    gallery = make(np.arange(size) % ids, dim, rng, people, spread=0.6)
    queries = make(rng.integers(0, ids, n_queries), dim, rng, people, spread=1.0)
    g = {"bge": torch.from_numpy(gallery)}

    def similarity(t, i):
        return {"t2i": t["bge"] @ i["bge"].T}

    def exact():
        parts = [exact_topk(similarity, {"bge": torch.from_numpy(queries[q:q + QUERY_CHUNK])}, g,
                            "t2i", 10)[1] for q in range(0, n_queries, QUERY_CHUNK)]
        return torch.cat(parts)

    exact()                                            # warm-up
    t0 = time.perf_counter()
    top = exact()
    row = {"gallery": size, "dim": dim, "queries": n_queries, "embeddings": kind,
           "exact_queries_per_s": n_queries / (time.perf_counter() - t0)}
    if approximate:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_approximate(Path(tmp), {"bge": gallery})
            row["approx_build_s"] = time.perf_counter() - t0
            q = {"bge": torch.from_numpy(queries)}
            approximate_topk(Path(tmp), q, {"bge": 1.0}, 10)
            t0 = time.perf_counter()
            _, got = approximate_topk(Path(tmp), q, {"bge": 1.0}, 10)
            row["approx_queries_per_s"] = n_queries / (time.perf_counter() - t0)
        hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, top)]
        row["approx_recall_at_10"] = float(np.mean(hits)) / 10
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps bench search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="synth,vit-b16", help=f"of {sorted(MODELS)}")
    p.add_argument("--images", type=int, default=256, help="images embedded (vit-b16: a quarter)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes of the search part")
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/16 CLIP: 512)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--embeddings", default="person", choices=sorted(EMBEDDINGS),
                   help="synthetic embeddings of the search part (default person: attributes "
                        "shared between persons; unrelated: nothing shared, the hard case)")
    p.add_argument("--no-approximate", action="store_true", help="skip faiss")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if min(sizes + [args.images, args.queries, args.dim, args.batch_size]) < 1:
            raise ValueError("--sizes, --images, --queries, --dim and --batch-size must be >= 1")
        if not args.no_approximate:
            load_faiss()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment("tbps bench search", argv)
    result = {**env, "load_average": list(os.getloadavg()),
              "device": torch.cuda.get_device_name() if device == "cuda" else env["cpu"],
              "embedding": [], "search": []}
    if not args.no_approximate:
        import faiss  # optional (the search extra): only for the approximate index

        result["faiss"] = faiss.__version__
    for name in models:
        n = args.images if name == "synth" else max(8, args.images // 4)
        row = bench_embedding(name, n, args.batch_size)
        result["embedding"].append(row)
        print(f"embed {name:8s} {row['image_size'][0]}x{row['image_size'][1]} "
              f"{row['parameters'] / 1e6:6.1f}M params: {row['images_per_s']:8.1f} images/s, "
              f"{row['captions_per_s']:8.1f} captions/s", flush=True)
    for size in sizes:
        row = bench_search(size, args.dim, args.queries, not args.no_approximate,
                           args.embeddings)
        result["search"].append(row)
        line = (f"search {args.embeddings} {size:>7,} x {args.dim}: exact "
                f"{row['exact_queries_per_s']:9.1f} queries/s")
        if "approx_queries_per_s" in row:
            line += (f"; HNSW {row['approx_queries_per_s']:9.1f} queries/s, recall@10 "
                     f"{row['approx_recall_at_10']:.3f}, build {row['approx_build_s']:.1f} s")
        print(line, flush=True)
    print(f"device: {result['device']}, {result['threads']} torch threads, load average "
          f"{result['load_average'][0]:.1f} at the start")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
