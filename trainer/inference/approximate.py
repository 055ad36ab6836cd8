"""Approximate search: an HNSW graph (faiss, `pip install faiss-cpu`) over the branches side by
side, for any similarity that is a weighted sum of per-branch dot products (the query side
applies the weights).

    write_approximate(index_folder, {branch: N x D})    # approx.faiss beside the index
    scores, positions = approximate_topk(index_folder, text, {branch: weight}, k)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

APPROX = "approx.faiss"
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


def load_faiss():
    """The faiss module; ValueError saying how to install it when it is missing."""
    try:
        import faiss  # here: faiss is optional and stays off start-up
    except ImportError:
        raise ValueError("approximate search needs faiss: `pip install faiss-cpu` (or install this "
                         "package with its `search` extra); exact search needs nothing") from None
    return faiss


def _side_by_side(vecs: dict[str, np.ndarray], weights: dict[str, float] | None = None
                  ) -> np.ndarray:
    """Branches concatenated in name order, each scaled by its weight (the query side)."""
    parts = [v * (1.0 if weights is None else weights[b]) for b, v in sorted(vecs.items())]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def write_approximate(out: Path, vecs: dict[str, np.ndarray]) -> dict:
    """Write `out`/approx.faiss over {branch: N x D} (atomically); what index.json records."""
    faiss = load_faiss()
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
    """(scores, positions), Q x k, of the graph in `folder`; position -1 where it found fewer."""
    faiss = load_faiss()
    index = faiss.read_index(str(Path(folder) / APPROX))
    index.hnsw.efSearch = max(ef_search, k)
    q = _side_by_side({b: t.float().cpu().numpy() for b, t in text.items()}, weights)
    scores, ids = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(ids)
