"""Every training loss goes through here; the similarity-matrix family through `kernels`.

Local loss: each rank's rows (its own samples) are scored against the keys of all ranks,
gathered with gradient, and the person ids gathered with them; a positive may live on another
rank. Per-sample losses come back per rank; `local_mean` and `local_sum` reduce them so that the
gradient data-parallel training averages over ranks equals that of one process on the whole
global batch: a mean of local means is the global mean (equal local batches), and a global sum
is world_size x the mean of local sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import similarity_loss
from trainer import dist


@dataclass
class GatheredKeys:
    """Embeddings and ids of every rank's samples, in rank order (grad flows to each owner)."""

    img_NE: torch.Tensor
    txt_NE: torch.Tensor
    pid_N: torch.Tensor


def gather_keys(img_BE: torch.Tensor, txt_BE: torch.Tensor, pid_B: torch.Tensor) -> GatheredKeys:
    return GatheredKeys(dist.gather_with_grad(img_BE), dist.gather_with_grad(txt_BE),
                        dist.gather_nograd(pid_B))


def retrieval_loss(kind: str, img_BE, txt_BE, pid_B, keys: GatheredKeys, *, tau: float,
                   **options) -> torch.Tensor:
    """Per-sample image-to-text + text-to-image loss of `kind` (sdm, bsdm, tal, itc, waf)."""
    i2t = similarity_loss(img_BE, keys.txt_NE, pid_B, keys.pid_N, kind=kind, tau=tau, **options)
    t2i = similarity_loss(txt_BE, keys.img_NE, pid_B, keys.pid_N, kind=kind, tau=tau, **options)
    return i2t + t2i


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Low-precision logits to fp32 for the softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def id_loss(logits_img_BC: torch.Tensor, logits_txt_BC: torch.Tensor, pid_B: torch.Tensor
            ) -> torch.Tensor:
    """IRRA's identity loss: one classifier shared by both modalities, mean of the two CEs."""
    return (F.cross_entropy(_upcast(logits_img_BC), pid_B) +
            F.cross_entropy(_upcast(logits_txt_BC), pid_B)) / 2


def mlm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Cross entropy on masked positions only (labels -100 elsewhere)."""
    return F.cross_entropy(_upcast(logits_BLV).flatten(0, 1), labels_BL.flatten(),
                           ignore_index=-100)


def local_mean(per_sample_B: torch.Tensor) -> torch.Tensor:
    return per_sample_B.mean()


def local_sum(per_sample_B: torch.Tensor) -> torch.Tensor:
    return per_sample_B.sum() * dist.world_size()
