"""Text-to-image retrieval metrics, as METHODS.md defines them (and IRRA/RDE compute them).

Every query ranks the whole gallery by similarity (descending; ties keep gallery order). A
gallery item is correct when its person id equals the query's.
- R@k: percentage of queries with a correct item in the top k.
- mAP: mean over queries of AP = (1/|G_q|) sum over correct ranks r of precision@r.
- mINP: mean over queries of |G_q| / (rank of the last correct item).
All in percent. A query with no correct item in the gallery is an error (the benchmarks have none).
`Evaluation` holds what `tbps.trainer.inference.evaluate` computed, for the report to draw from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Evaluation:
    """One evaluation of a split: the metrics on every rank; on rank 0 also the Q x G matrix
    behind each metrics row (the ITM re-ranked one included) and the person ids."""

    split: str
    shards: str                                   # the shard folder embedded
    itm_rerank: int                               # the K asked for (0: none)
    metrics: dict[str, dict[str, float]]          # {similarity: {R1, ..., mINP[, cost]}}
    similarities: dict[str, torch.Tensor] | None = None   # {similarity: Q x G}, rank 0
    query_pids: torch.Tensor | None = None        # Q, rank 0
    gallery_pids: torch.Tensor | None = None      # G, rank 0


def retrieval_metrics(similarity, query_pids, gallery_pids, ks=(1, 5, 10),
                      chunk: int = 4096) -> dict[str, float]:
    """similarity: Q x G (rows are queries); pids: Q and G integer tensors (or sequences)."""
    sim_QG = torch.as_tensor(similarity)
    q_pids = torch.as_tensor(query_pids).to(sim_QG.device)
    g_pids = torch.as_tensor(gallery_pids).to(sim_QG.device)
    Q, G = sim_QG.shape
    if q_pids.shape != (Q,) or g_pids.shape != (G,):
        raise ValueError(f"similarity {tuple(sim_QG.shape)} does not match {tuple(q_pids.shape)}"
                         f" query and {tuple(g_pids.shape)} gallery ids")
    hits = {k: 0.0 for k in ks}
    ap_sum = inp_sum = 0.0
    for start in range(0, Q, chunk):
        sim = sim_QG[start:start + chunk].float()
        order = torch.argsort(sim, dim=1, descending=True, stable=True)
        match = (g_pids[order] == q_pids[start:start + chunk, None]).float()   # q x G, ranked
        n_pos = match.sum(dim=1)
        if bool((n_pos == 0).any()):
            bad = int((n_pos == 0).nonzero()[0]) + start
            raise ValueError(f"query {bad} (pid {int(q_pids[bad])}) has no match in the gallery")
        cum = match.cumsum(dim=1)
        ranks = torch.arange(1, G + 1, device=sim.device, dtype=torch.float32)
        for k in ks:
            hits[k] += float((cum[:, min(k, G) - 1] > 0).sum())
        ap_sum += float(((cum / ranks) * match).sum(dim=1).div(n_pos).sum())
        last = G - torch.argmax(match.flip(dims=[1]), dim=1)                    # 1-indexed
        inp_sum += float((n_pos / last).sum())
    out = {f"R{k}": 100.0 * hits[k] / Q for k in ks}
    out["mAP"] = 100.0 * ap_sum / Q
    out["mINP"] = 100.0 * inp_sum / Q
    return out
