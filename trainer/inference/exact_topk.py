"""Exact top k: the recipe's similarity over gallery chunks, the k best through
`tbps.kernels.topk_select` on the device, ties to the lower gallery position."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tbps.kernels.topk_select import topk_select


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
