"""The loss terms (config recipe.losses) and the losses they are made of; the similarity-matrix
family goes through `kernels`.

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
from tbps.trainer.common import collective
from tbps.trainer.common.config import SIMILARITY_KINDS, TERM_PARAMS
from tbps.trainer.recipe import draws
from tbps.trainer.recipe.caption_masking import mlm_logits

gather_with_grad, gather_nograd = collective.gather_with_grad, collective.gather_nograd


@dataclass
class GatheredKeys:
    """Embeddings of every rank's samples, in rank order (grad flows back to each owner)."""

    img_NE: torch.Tensor
    txt_NE: torch.Tensor


def gather_keys(img_BE: torch.Tensor, txt_BE: torch.Tensor) -> GatheredKeys:
    return GatheredKeys(collective.gather_with_grad(img_BE), collective.gather_with_grad(txt_BE))


def gather_ids(pid_B: torch.Tensor) -> torch.Tensor:
    """The person ids of every rank's samples (once a step: every branch's keys share them)."""
    return collective.gather_nograd(pid_B)


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
    return per_sample_B.sum() * collective.world_size()


# -- the terms: each returns (its value, what is logged: the unweighted mean over this rank) ------

@dataclass
class TermInputs:
    """What the step has computed when the terms run."""

    img: object                      # online ImageFeatures
    txt: object                      # online TextFeatures
    emb: dict                        # branch -> (image_BE, text_BE)
    keys: dict                       # branch -> GatheredKeys (every rank's embeddings)
    pid_B: torch.Tensor
    key_ids_N: torch.Tensor
    tau: float
    draw_keys: tuple                 # (step seed, sample index)
    momentum: object = None          # recipe.momentum.Momentum
    masked_ids_BL: torch.Tensor | None = None
    mlm_labels_BL: torch.Tensor | None = None


def term_names(terms) -> list[str]:
    """Log names: the kind, or kind + position where a kind appears twice."""
    counts = {}
    for t in terms:
        counts[t.kind] = counts.get(t.kind, 0) + 1
    return [t.kind if counts[t.kind] == 1 else f"{t.kind}{i}" for i, t in enumerate(terms)]


def reduce(per_B: torch.Tensor, w_B: torch.Tensor | None, reduction: str) -> torch.Tensor:
    x = per_B if w_B is None else w_B.to(per_B.dtype) * per_B
    return local_mean(x) if reduction == "mean" else local_sum(x)


def term(model, term_cfg, name: str, x: TermInputs, w_B, logged: dict) -> torch.Tensor:
    """One configured term's value (weighted by w_B when given); what it logs goes in `logged`."""
    if term_cfg.kind in SIMILARITY_KINDS:
        return similarity_term(term_cfg, name, x, w_B, logged)
    value, logged[name] = {"id": id_term, "mlm": mlm_term, "itm": itm_term}[term_cfg.kind](
        model, term_cfg, x, w_B)
    return value


def similarity_term(t, name: str, x: TermInputs, w_B, logged: dict) -> torch.Tensor:
    tau = t.tau if t.tau is not None else x.tau
    opts = {p: t.param(p) for p in TERM_PARAMS[t.kind] if p != "tau"}
    per_B = None
    branches = t.branches_or_default()
    for b in branches:
        img_BE, txt_BE = x.emb[b]
        momentum = {}
        if t.needs_momentum():
            m_img, m_txt = x.momentum.embeds[b]
            momentum = dict(momentum_img_nD=m_img, momentum_txt_nD=m_txt,
                            momentum_img_keys_ND=gather_nograd(m_img),
                            momentum_txt_keys_ND=gather_nograd(m_txt))
        i2t, t2i = bidirectional(img_BE, txt_BE, x.pid_B, x.keys[b], x.key_ids_N, kind=t.kind,
                                 tau=tau, **opts, **momentum)
        branch_B = i2t + t2i
        logged[name if len(branches) == 1 else f"{name}_{b}"] = branch_B.detach().mean()
        per_B = branch_B if per_B is None else per_B + branch_B
    return reduce(per_B, w_B, t.reduction)


def id_term(model, t, x: TermInputs, w_B):
    logits_i, logits_t = model.classifier(x.img.embeds_BE), model.classifier(x.txt.embeds_BE)
    if w_B is None and t.reduction == "mean":
        value = id_loss(logits_i, logits_t, x.pid_B)
        return value, value.detach()
    per_B = id_loss(logits_i, logits_t, x.pid_B, reduction="none")
    return reduce(per_B, w_B, t.reduction), per_B.detach().mean()


def mlm_term(model, t, x: TermInputs, w_B):
    logits = mlm_logits(model, x.masked_ids_BL, x.img.tokens_BTE)
    labels = x.mlm_labels_BL
    if w_B is None:
        value = mlm_loss(logits, labels)
        return value, value.detach()
    value = mlm_loss(logits, labels, w_B[:, None].expand_as(labels))
    return value, mlm_loss(logits.detach(), labels)


def itm_term(model, t, x: TermInputs, w_B):
    """ITM on the cross-modal encoder's first token: each pair, one hard negative text per image
    and one hard negative image per text, drawn from the similarity softmax over every rank's
    keys, never of the same identity (itm_negatives)."""
    img, txt = x.img, x.txt
    B, L = txt.input_ids_BL.shape
    img_BE, txt_BE = x.emb["bge"]
    k = x.keys["bge"]
    seed, index = x.draw_keys
    N = x.key_ids_N.shape[0]
    neg_txt, ok_txt = itm_negatives(
        F.normalize(img_BE.detach().float(), dim=-1), F.normalize(k.txt_NE.detach().float(), dim=-1),
        x.pid_B, x.key_ids_N, tau=x.tau,
        noise_BN=draws.exponential(seed, index, N, stream=draws.ITM_TEXT))
    neg_img, ok_img = itm_negatives(
        F.normalize(txt_BE.detach().float(), dim=-1), F.normalize(k.img_NE.detach().float(), dim=-1),
        x.pid_B, x.key_ids_N, tau=x.tau,
        noise_BN=draws.exponential(seed, index, N, stream=draws.ITM_IMAGE))
    txt_tokens = F.pad(txt.tokens_BLE, (0, 0, 0, model.context_length - L))
    all_txt = gather_with_grad(txt_tokens)
    all_eos = gather_nograd(txt.eos_B)
    all_img = gather_with_grad(img.tokens_BTE)
    pos = model.cross_tokens(txt_tokens, txt.eos_B, img.tokens_BTE)[:, 0]
    img_neg = model.cross_tokens(txt_tokens, txt.eos_B, all_img[neg_img])[:, 0]
    txt_neg = model.cross_tokens(all_txt[neg_txt], all_eos[neg_txt], img.tokens_BTE)[:, 0]
    logits = model.itm_head(torch.cat([pos, img_neg, txt_neg])).float()
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(x.pid_B.device)
    ce = F.cross_entropy(logits, labels, reduction="none").view(3, B)
    valid = torch.stack([torch.ones_like(ok_img), ok_img, ok_txt]).float()
    per_B = (ce * valid).sum(0) / valid.sum(0)
    return reduce(per_B, w_B, t.reduction), per_B.detach().mean()
