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

from tbps.kernels.similarity_loss import bidirectional_similarity_loss
from tbps.trainer.running import dist

gather_with_grad, gather_nograd = dist.gather_with_grad, dist.gather_nograd


@dataclass
class GatheredKeys:
    """Embeddings of every rank's samples, in rank order (grad flows back to each owner)."""

    img_NE: torch.Tensor
    txt_NE: torch.Tensor


def gather_keys(img_BE: torch.Tensor, txt_BE: torch.Tensor) -> GatheredKeys:
    return GatheredKeys(dist.gather_with_grad(img_BE), dist.gather_with_grad(txt_BE))


def gather_ids(pid_B: torch.Tensor) -> torch.Tensor:
    """The person ids of every rank's samples (once a step: every branch's keys share them)."""
    return dist.gather_nograd(pid_B)


def bidirectional(img_BE, txt_BE, pid_B, keys: GatheredKeys, key_ids_N, *, kind: str,
                  tau: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-to-text, text-to-image) per-sample losses of `kind` (sdm, bsdm, tal, waf, itc):
    this rank's rows against every rank's keys, through the fused kernels; itc's momentum
    features (`momentum_img_nD`, ..., no gradient) go in `options`."""
    return bidirectional_similarity_loss(img_BE, txt_BE, pid_B, keys.img_NE, keys.txt_NE,
                                         key_ids_N, kind=kind, tau=tau, **options)


@torch.no_grad()
def itm_negatives(query_BE: torch.Tensor, keys_NE: torch.Tensor, pid_B: torch.Tensor,
                  key_ids_N: torch.Tensor, *, tau: float, noise_BN: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative key per query, drawn with probability softmax(S / tau) over the keys of
    every rank that are not of the query's identity (and not padding): (index_B, found_B); a
    query whose keys are all of its identity gets found False. Normalised inputs; the draw is
    an exponential race, argmax_j p_j / E_j with noise_BN the E ~ Exp(1) (no host sync)."""
    logits = (query_BE @ keys_NE.T) / tau
    allowed = (pid_B[:, None] != key_ids_N[None]) & (key_ids_N[None] >= 0)
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = (logits - logits.amax(1, keepdim=True).clamp(min=-1e30)).exp()
    race = torch.where(allowed, p / noise_BN.to(p.device, p.dtype), -1.0)
    return race.argmax(dim=1), allowed.any(dim=1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Low-precision logits to fp32 for the softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def id_loss(logits_img_BC: torch.Tensor, logits_txt_BC: torch.Tensor, pid_B: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
    """IRRA's identity loss: one classifier shared by both modalities, mean of the two CEs
    (reduction "none": per sample)."""
    return (F.cross_entropy(_upcast(logits_img_BC), pid_B, reduction=reduction) +
            F.cross_entropy(_upcast(logits_txt_BC), pid_B, reduction=reduction)) / 2


def mlm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor,
             weights_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy on masked positions only (labels -100 elsewhere); with weights, the
    weighted sum over the masked tokens divided by their count."""
    if weights_BL is None:
        return F.cross_entropy(_upcast(logits_BLV).flatten(0, 1), labels_BL.flatten(),
                               ignore_index=-100)
    ce = F.cross_entropy(_upcast(logits_BLV).flatten(0, 1), labels_BL.flatten(),
                         ignore_index=-100, reduction="none")
    masked = (labels_BL.flatten() != -100).to(ce.dtype)
    return (ce * weights_BL.flatten().to(ce.dtype)).sum() / masked.sum().clamp(min=1.0)


def local_mean(per_sample_B: torch.Tensor) -> torch.Tensor:
    return per_sample_B.mean()


def local_sum(per_sample_B: torch.Tensor) -> torch.Tensor:
    return per_sample_B.sum() * dist.world_size()
