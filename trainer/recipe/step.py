"""The one training recipe, composed of the parts a config names (trainer/common/config.py RecipeConfig).

IRRA, RDE, AMNS and AGA are presets of it (trainer/recipe/presets/); any mix of their parts is a config:

    method: rde                                  # BGE + TSE, TAL, consensus division
    recipe:
      image_tokens: {kind: attention}            # + AMNS's attention-weighted selective mask
      caption_mask: {kind: attention}            # + AGA's attention-guided masking ...
      losses:                                    # ... for an mlm term
        - {kind: tal, branches: [bge, tse], reduction: sum}
        - {kind: mlm, weight: 0.5}

The training step is straight-line code in one fixed order (`train_losses`):
  1. text      the online text encoder on the captions (the EOS attention rows of every layer
               when AGM masks, of the last layer for TSE);
  2. masking   the captions' MLM mask (random | uniform | attention = AGM), when an mlm term or
               text enrichment is on;
  3. momentum  one no-grad forward of the momentum model, when a part needs it: the full image's
               tokens and AWM's patch scores, the enriched captions (TEM), momentum embeddings
               for itc's distillation;
  4. patches   image-token selection: all | random | attention (AWM), sampled through
               tbps.kernels.topk_select;
  5. image     the online image encoder on the kept patches (CLS row of the last layer for TSE);
  6. enrich    the online text encoder again on the enriched captions (TEM only);
  7. branches  the embeddings of each branch: bge (image CLS, text EOS) and tse (RDE's heads);
  8. keys      every rank's embeddings (with gradient) and ids (gathered once), momentum keys
               without gradient;
  9. terms     the loss terms in the configured order: weight x reduction over this rank's
               samples of the per-sample loss, times each sample's weight when weighting is on.
Per-sample weights (RDE's consensus division) live in the `sample_weight` buffer; the trainer
asks the division for scores each epoch (`per_sample_losses`) and writes the result back with
`set_sample_weights`. The momentum model is a pruned copy of this model (trainer/running/ema.py) called
through its own forward (`mode="momentum"`), so DeepSpeed ZeRO-3 gathers its layers as it runs.
`momentum_modules(cfg)` says which modules it copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tbps.kernels.topk_select import topk_select
from tbps.trainer.common.config import SIMILARITY_KINDS, Config
from tbps.trainer.model.heads import CrossModalEncoder, MLMHead, TokenSelectionEmbedding, identity_classifier
from tbps.trainer.recipe import draws, losses
from tbps.trainer.recipe.caption_masking import random_mlm_mask, sampled_mlm_mask, word_positions

IMAGE_ENCODER = ("encoder.clip.vision_model", "encoder.clip.visual_projection")


@dataclass
class StepInfo:
    epoch: int
    step: int                      # optimizer step
    tau: float
    generator: torch.Generator     # CPU generator seeded by (seed, rank, epoch, batch): IRRA's
    #                                random masking; the other sampled parts use tbps.trainer.recipe.draws
    momentum: object = None        # the momentum model (tbps.trainer.running.ema.ShardedEMA), when built


@dataclass
class Momentum:
    """What the momentum model's forward returns (no gradient)."""

    image_tokens_BTE: torch.Tensor | None = None     # projected tokens of the full image
    patch_scores_BN: torch.Tensor | None = None      # AWM's score of every patch
    caption_ids_BL: torch.Tensor | None = None       # captions after enrichment (TEM)
    enriched_B: torch.Tensor | None = None           # which captions were replaced
    embeds: dict = field(default_factory=dict)       # branch -> (image_BE, text_BE), normalised


def momentum_modules(cfg: Config) -> tuple[str, ...]:
    """Module paths of the model that the recipe's parts need a momentum copy of."""
    rc, paths = cfg.recipe, []
    if rc.image_tokens.kind == "attention":
        paths += IMAGE_ENCODER
    for term in rc.losses:
        if term.needs_momentum():
            paths.append("encoder")
            if "tse" in term.branches_or_default():
                paths += ["recipe.tse_image", "recipe.tse_text"]
    if rc.enrich.kind != "none":
        paths += ["encoder", "recipe.cross", "recipe.mlm_head"]
    return tuple(dict.fromkeys(paths))


class Recipe(nn.Module):
    def __init__(self, cfg: Config, *, embed_dim: int, num_classes: int, num_samples: int,
                 tokenizer, grid_hw: tuple[int, int]):
        super().__init__()
        rc = self.rc = cfg.recipe
        self.branches = rc.branches
        self.context_length = cfg.model.context_length
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
        self.special_ids = tuple(tokenizer.special_ids)
        self.num_patches = grid_hw[0] * grid_hw[1]
        kinds = rc.kinds()
        # creation order fixes the random initialisation: classifier, cross, mlm_head, ...
        self.classifier = identity_classifier(embed_dim, num_classes) if "id" in kinds else None
        self.cross = (CrossModalEncoder(embed_dim, cfg.model.cross_heads, cfg.model.cross_layers,
                                        residual=rc.cross.residual,
                                        attention_init=rc.cross.attention_init)
                      if kinds & {"mlm", "itm"} else None)
        self.mlm_head = MLMHead(embed_dim, tokenizer.vocab_size) if "mlm" in kinds else None
        self.itm_head = nn.Linear(embed_dim, 2) if "itm" in kinds else None
        self.tse_image = self.tse_text = None
        if "tse" in rc.branches:
            t = rc.tse
            self.k_image = max(1, math.floor(t.ratio * self.num_patches))
            self.k_text = max(1, math.floor(t.ratio * (cfg.model.context_length - 2)))
            self.tse_image = TokenSelectionEmbedding(embed_dim, t.dim, keep_bn_eval=t.authors_bn_eval)
            self.tse_text = TokenSelectionEmbedding(embed_dim, t.dim, keep_bn_eval=t.authors_bn_eval)
        self.weighting = rc.weighting.kind != "none"
        if self.weighting:
            self.register_buffer("sample_weight", torch.ones(num_samples))
        self.needs_momentum = bool(cfg.recipe.momentum_parts())
        self.seed = cfg.train.seed

    new_modules = ("classifier", "cross", "mlm_head", "itm_head", "tse_image", "tse_text")

    # -- the training step ------------------------------------------------------------------------

    def train_losses(self, encoder, batch: dict, step: StepInfo) -> dict[str, torch.Tensor]:
        rc, kinds = self.rc, self.rc.kinds()
        length = batch.get("text_length")
        enrich = rc.enrich.kind != "none"
        keys = self._draw_keys(batch, step)
        # 1. text
        with torch.set_grad_enabled(torch.is_grad_enabled() and not enrich):
            txt = encoder.encode_text(batch["input_ids"], rows=self._text_rows(), length=length)
        # 2. masking
        masked_ids = mlm_labels = None
        if "mlm" in kinds or enrich:
            masked_ids, mlm_labels = self._mask_captions(txt, step, keys)
        # 3. momentum
        mom = None
        if self.needs_momentum:
            if step.momentum is None:
                raise RuntimeError("this recipe needs the momentum model; the trainer builds it")
            request = {"image": batch["image"], "input_ids": txt.input_ids_BL,
                       "caption_embeds": txt.embeds_BE.detach(), "masked_ids": masked_ids,
                       "mlm_labels": mlm_labels, "draw_seed": keys[0], "draw_index": keys[1]}
            mom = step.momentum(request, mode="momentum", step=step)
        # 4. patches, 5. image
        keep_BK = self._keep_patches(mom, keys)
        img = encoder.encode_image(batch["image"], keep_BK,
                                   rows="last" if "tse" in self.branches else "none")
        # 6. enrich
        if enrich:
            txt = encoder.encode_text(mom.caption_ids_BL, rows=self._text_rows(with_agm=False),
                                      length=txt.input_ids_BL.shape[1])
        # 7. branches
        emb = {"bge": (img.embeds_BE, txt.embeds_BE)}
        if "tse" in self.branches:
            emb["tse"] = (self._tse_image(img), self._tse_text(txt))
        # 8. keys
        pid = batch["pid"]
        draw_keys = keys
        key_ids = losses.gather_ids(pid)
        keys = {b: losses.gather_keys(*emb[b]) for b in self._key_branches()}
        # 9. terms
        weight_B = self.sample_weight[batch["index"]] if self.weighting else None
        out, total = {}, 0
        names = _term_names(rc.losses)
        for name, term in zip(names, rc.losses):
            w = weight_B if term.weighted else None
            if term.kind in SIMILARITY_KINDS:
                value = self._similarity_term(term, name, emb, keys, pid, key_ids, mom, step, w,
                                              out)
            elif term.kind == "id":
                value, out[name] = self._id_term(term, img, txt, pid, w)
            elif term.kind == "mlm":
                value, out[name] = self._mlm_term(encoder, masked_ids, mlm_labels, img, w)
            else:
                value, out[name] = self._itm_term(term, img, txt, emb, keys, pid, key_ids, step,
                                                  w, draw_keys)
            total = total + term.weight * value
        if weight_B is not None:
            out["anchors" if rc.weighting.use == "labels" else "mean_weight"] = weight_B.mean()
        if mom is not None and mom.enriched_B is not None:
            out["enriched"] = mom.enriched_B.float().mean()
        return {"loss": total, **out}

    def _draw_keys(self, batch: dict, step: StepInfo) -> tuple[int, torch.Tensor]:
        """(seed, sample index) the sampled parts key their draws by (trainer/recipe/draws.py): the
        step's seed from (training seed, epoch, optimizer step), and each sample's index in the
        dataset (its position in the batch where a batch has no index)."""
        index = batch.get("index")
        if index is None:
            index = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        return draws.step_seed(self.seed, step.epoch, step.step), index

    def _text_rows(self, with_agm: bool = True) -> str:
        if with_agm and self.rc.caption_mask.kind == "attention":
            return "all"
        return "last" if "tse" in self.branches else "none"

    def _key_branches(self) -> list[str]:
        used = {b for t in self.rc.losses if t.kind in SIMILARITY_KINDS
                for b in t.branches_or_default()}
        if "itm" in self.rc.kinds():
            used.add("bge")
        return [b for b in self.branches if b in used]

    # -- 2. caption masking ------------------------------------------------------------------------

    def _mask_captions(self, txt, step: StepInfo, keys):
        cm, ids = self.rc.caption_mask, txt.input_ids_BL
        opts = dict(mask_id=self.mask_id, vocab_size=self.vocab_size,
                    special_ids=self.special_ids, generator=step.generator)
        if cm.kind == "random":
            return random_mlm_mask(ids, txt.eos_B, prob=cm.ratio, **opts)
        score = None
        if cm.kind == "attention":
            score = aggregate_layers(txt.attn_rows_BlL, cm.beta)
        L = ids.shape[1]
        noise = draws.exponential(*keys, L, stream=draws.AGM)
        uniforms = (draws.uniform(*keys, L, stream=draws.MASK_KIND),
                    draws.uniform(*keys, L, stream=draws.MASK_WORD))
        opts.pop("generator")
        return sampled_mlm_mask(ids, txt.eos_B, score, ratio=cm.ratio, noise_BL=noise,
                                uniforms=uniforms, **opts)

    # -- 3. the momentum model's forward (runs on the momentum copy) ------------------------------

    @torch.no_grad()
    def momentum_forward(self, encoder, batch: dict, step: StepInfo) -> Momentum:
        rc, out = self.rc, Momentum()
        awm = rc.image_tokens.kind == "attention"
        enrich = rc.enrich.kind != "none"
        distil = [t for t in rc.losses if t.needs_momentum()]
        img = None
        if awm or enrich or distil:
            cls_rows = awm and rc.image_tokens.score == "cls"
            tse = any("tse" in t.branches_or_default() for t in distil)
            img = encoder.encode_image(batch["image"],
                                       rows="last" if (cls_rows or tse) else "none")
            out.image_tokens_BTE = img.tokens_BTE
        if awm:
            out.patch_scores_BN = (img.attn_BK if rc.image_tokens.score == "cls" else
                                   F.cosine_similarity(img.tokens_BTE[:, 1:].float(),
                                                       batch["caption_embeds"].float()[:, None],
                                                       dim=-1))
        ids = batch["input_ids"]
        if enrich:
            ids, out.enriched_B = self._enrich(encoder, img, batch, step)
            out.caption_ids_BL = ids
        if distil:
            tse = any("tse" in t.branches_or_default() for t in distil)
            txt = encoder.encode_text(ids, rows="last" if tse else "none", length=ids.shape[1])
            out.embeds["bge"] = (img.embeds_BE, txt.embeds_BE)
            if tse:
                out.embeds["tse"] = (self._tse_image(img), self._tse_text(txt))
        return out

    def _enrich(self, encoder, img, batch, step: StepInfo):
        """TEM: the momentum MLM's words at the masked positions; each caption replaced by its
        enriched version with probability recipe.enrich.prob."""
        ids, masked = batch["input_ids"], batch["masked_ids"]
        seed, index = batch["draw_seed"], batch["draw_index"]
        chosen = batch["mlm_labels"] != -100
        mtxt = encoder.encode_text(masked, rows="none", length=masked.shape[1])
        pad = torch.arange(masked.shape[1], device=masked.device)[None] > mtxt.eos_B[:, None]
        logits = self.mlm_head(self.cross(mtxt.tokens_BLE, img.tokens_BTE, pad)).float()
        logits[..., list(self.special_ids)] = float("-inf")      # never a special token
        if self.rc.enrich.kind == "sample":                     # inverse CDF, one uniform a word
            u = draws.uniform(seed, index, ids.shape[1], stream=draws.TEM_WORD).float()
            cdf = logits.softmax(-1).cumsum(-1)
            pred = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
            pred = pred.clamp(max=logits.shape[-1] - 1)
        else:
            pred = logits.argmax(-1)
        enriched = torch.where(chosen, pred, ids)
        u = draws.uniform(seed, index, 1, stream=draws.TEM_CAPTION)[:, 0]
        use_B = u < self.rc.enrich.prob
        return torch.where(use_B[:, None], enriched, ids), use_B

    # -- 4. image-token selection ------------------------------------------------------------------

    def _keep_patches(self, mom: Momentum | None, keys):
        """Indices (B x K, ascending) of the patches the online encoder sees; None: all.

        floor(ratio x N) patches are dropped, drawn without replacement with probability
        proportional to a weight: 1 (random) or 1 - the min-max normalised momentum score (AWM;
        the best-scored patch is never dropped). The draw is the exponential race: the top
        n_drop of weight / E, E ~ Exp(1) keyed by sample (trainer/recipe/draws.py), through
        tbps.kernels.topk_select."""
        it = self.rc.image_tokens
        if it.kind == "all" or not self.training:
            return None
        seed, index = keys
        N = self.num_patches
        n_drop = math.floor(it.ratio * N)
        if it.kind == "random":
            weights = torch.ones(index.shape[0], N, device=index.device)
        else:
            weights = awm_weights(mom.patch_scores_BN)
        return drop_patches(weights, n_drop, seed, index)

    # -- 7. branches ---------------------------------------------------------------------------------

    def _tse_image(self, img) -> torch.Tensor:
        patches = img.tokens_BTE[:, 1:]
        valid = torch.ones(img.attn_BK.shape, dtype=torch.bool, device=patches.device)
        sel = topk_select(img.attn_BK.detach(), valid, min(self.k_image, patches.shape[1]), patches)
        return self.tse_image(sel.features_BkD, sel.valid_Bk)

    def _tse_text(self, txt) -> torch.Tensor:
        valid = word_positions(txt.input_ids_BL, txt.eos_B)
        k = min(self.k_text, txt.attn_BL.shape[1])
        sel = topk_select(txt.attn_BL.detach(), valid, k, txt.tokens_BLE)
        return self.tse_text(sel.features_BkD, sel.valid_Bk)

    # -- 9. terms -------------------------------------------------------------------------------------

    def _similarity_term(self, term, name, emb, keys, pid, key_ids, mom, step, w, out):
        tau = term.tau if term.tau is not None else step.tau
        opts = {p: term.param(p) for p in ("eps", "lam", "margin", "gamma", "alpha")
                if p in _KIND_OPTIONS[term.kind]}
        per_B = None
        branches = term.branches_or_default()
        for b in branches:
            img_BE, txt_BE = emb[b]
            k = keys[b]
            momentum = {}
            if term.needs_momentum():
                m_img, m_txt = mom.embeds[b]
                momentum = dict(momentum_img_nD=m_img, momentum_txt_nD=m_txt,
                                momentum_img_keys_ND=losses.gather_nograd(m_img),
                                momentum_txt_keys_ND=losses.gather_nograd(m_txt))
            i2t, t2i = losses.bidirectional(img_BE, txt_BE, pid, k, key_ids, kind=term.kind,
                                            tau=tau, **opts, **momentum)
            branch_B = i2t + t2i
            out[name if len(branches) == 1 else f"{name}_{b}"] = branch_B.detach().mean()
            per_B = branch_B if per_B is None else per_B + branch_B
        return _reduce(per_B, w, term.reduction)

    # Each term returns (its value, what is logged: the unweighted mean over this rank).

    def _id_term(self, term, img, txt, pid, w):
        logits_i, logits_t = self.classifier(img.embeds_BE), self.classifier(txt.embeds_BE)
        if w is None and term.reduction == "mean":
            value = losses.id_loss(logits_i, logits_t, pid)
            return value, value.detach()
        per_B = losses.id_loss(logits_i, logits_t, pid, reduction="none")
        return _reduce(per_B, w, term.reduction), per_B.detach().mean()

    def _mlm_term(self, encoder, masked_ids, labels, img, w):
        masked_txt = encoder.encode_text(masked_ids, rows="none", length=masked_ids.shape[1])
        pad = torch.arange(masked_ids.shape[1], device=masked_ids.device)[None] > \
            masked_txt.eos_B[:, None]
        logits = self.mlm_head(self.cross(masked_txt.tokens_BLE, img.tokens_BTE, pad))
        if w is None:
            value = losses.mlm_loss(logits, labels)
            return value, value.detach()
        value = losses.mlm_loss(logits, labels, w[:, None].expand_as(labels))
        return value, losses.mlm_loss(logits.detach(), labels)

    def _itm_term(self, term, img, txt, emb, keys, pid, key_ids, step, w, draw_keys):
        """ITM on the cross-modal encoder's first token: each pair, one hard negative text per
        image and one hard negative image per text, drawn from the similarity softmax over every
        rank's keys, never of the same identity (trainer/recipe/losses.py itm_negatives)."""
        B, L = txt.input_ids_BL.shape
        img_BE, txt_BE = emb["bge"]
        k = keys["bge"]
        seed, index = draw_keys
        N = key_ids.shape[0]
        neg_txt, ok_txt = losses.itm_negatives(
            F.normalize(img_BE.detach().float(), dim=-1),
            F.normalize(k.txt_NE.detach().float(), dim=-1), pid, key_ids, tau=step.tau,
            noise_BN=draws.exponential(seed, index, N, stream=draws.ITM_TEXT))
        neg_img, ok_img = losses.itm_negatives(
            F.normalize(txt_BE.detach().float(), dim=-1),
            F.normalize(k.img_NE.detach().float(), dim=-1), pid, key_ids, tau=step.tau,
            noise_BN=draws.exponential(seed, index, N, stream=draws.ITM_IMAGE))
        pad_L = self.context_length
        txt_tokens = F.pad(txt.tokens_BLE, (0, 0, 0, pad_L - L))
        all_txt = losses.gather_with_grad(txt_tokens)
        all_eos = losses.gather_nograd(txt.eos_B)
        all_img = losses.gather_with_grad(img.tokens_BTE)
        pad_local = torch.arange(pad_L, device=pid.device)[None] > txt.eos_B[:, None]
        pad_neg = torch.arange(pad_L, device=pid.device)[None] > all_eos[neg_txt][:, None]
        pos = self.cross(txt_tokens, img.tokens_BTE, pad_local)[:, 0]
        img_neg = self.cross(txt_tokens, all_img[neg_img], pad_local)[:, 0]
        txt_neg = self.cross(all_txt[neg_txt], img.tokens_BTE, pad_neg)[:, 0]
        logits = self.itm_head(torch.cat([pos, img_neg, txt_neg])).float()
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(pid.device)
        ce = F.cross_entropy(logits, labels, reduction="none").view(3, B)
        valid = torch.stack([torch.ones_like(ok_img), ok_img, ok_txt]).float()
        per_B = (ce * valid).sum(0) / valid.sum(0)
        return _reduce(per_B, w, term.reduction), per_B.detach().mean()

    # -- scoring for the weighting part ------------------------------------------------------------

    @torch.no_grad()
    def per_sample_losses(self, encoder, batch: dict, step: StepInfo) -> dict[str, torch.Tensor]:
        """{branch: per-sample loss of recipe.weighting.score}, in-batch keys of all ranks."""
        wc = self.rc.weighting
        img = encoder.encode_image(batch["image"],
                                   rows="last" if "tse" in self.branches else "none")
        txt = encoder.encode_text(batch["input_ids"], rows=self._text_rows(with_agm=False),
                                  length=batch.get("text_length"))
        emb = {"bge": (img.embeds_BE, txt.embeds_BE)}
        if "tse" in self.branches:
            emb["tse"] = (self._tse_image(img), self._tse_text(txt))
        pid = batch["pid"]
        key_ids = losses.gather_ids(pid)
        opts = {"margin": wc.margin} if wc.score == "tal" else {}
        out = {}
        for b in self.branches:
            k = losses.gather_keys(*emb[b])
            i2t, t2i = losses.bidirectional(*emb[b], pid, k, key_ids, kind=wc.score,
                                            tau=step.tau, **opts)
            out[b] = i2t + t2i
        return out

    @torch.no_grad()
    def set_sample_weights(self, index, weights) -> None:
        """Write the weighting part's weights for these training samples (every rank)."""
        buf = self.sample_weight
        buf[torch.as_tensor(index, device=buf.device)] = torch.as_tensor(weights, device=buf.device,
                                                                          dtype=buf.dtype)

    # -- evaluation ------------------------------------------------------------------------------------

    def embed(self, encoder, batch: dict, modality: str) -> dict[str, torch.Tensor]:
        tse = "tse" in self.branches
        if modality == "image":
            img = encoder.encode_image(batch["image"], rows="last" if tse else "none")
            out = {"bge": F.normalize(img.embeds_BE.float(), dim=-1)}
            if tse:
                out["tse"] = F.normalize(self._tse_image(img).float(), dim=-1)
            return out
        txt = encoder.encode_text(batch["input_ids"], rows="last" if tse else "none",
                                  length=batch.get("text_length"))
        out = {"bge": F.normalize(txt.embeds_BE.float(), dim=-1)}
        if tse:
            out["tse"] = F.normalize(self._tse_text(txt).float(), dim=-1)
        return out

    def tokens(self, encoder, batch: dict, modality: str) -> dict[str, torch.Tensor]:
        """Projected tokens for ITM re-ranking: image {"tokens": B x T x E}; text {"tokens":
        B x context_length x E (zero-padded), "eos": B}."""
        if modality == "image":
            return {"tokens": encoder.encode_image(batch["image"], rows="none").tokens_BTE}
        txt = encoder.encode_text(batch["input_ids"], rows="none", length=batch.get("text_length"))
        pad = self.context_length - txt.tokens_BLE.shape[1]
        return {"tokens": F.pad(txt.tokens_BLE, (0, 0, 0, pad)), "eos": txt.eos_B}

    def itm_scores(self, batch: dict) -> torch.Tensor:
        """ITM match score (positive minus negative logit) of each (caption, image) pair from
        their projected tokens (`tokens`)."""
        L = batch["text_tokens"].shape[1]
        pad = torch.arange(L, device=batch["eos"].device)[None] > batch["eos"][:, None]
        hidden = self.cross(batch["text_tokens"], batch["image_tokens"], pad)[:, 0]
        logits = self.itm_head(hidden).float()
        return logits[:, 1] - logits[:, 0]

    def similarity(self, text: dict, image: dict) -> dict[str, torch.Tensor]:
        """Named query x gallery similarities; the first is the one checkpoints are chosen on."""
        s_bge = text["bge"] @ image["bge"].T
        if "tse" not in self.branches:
            return {"t2i": s_bge}
        s_tse = text["tse"] @ image["tse"].T
        return {"BGE+TSE": (s_bge + s_tse) / 2, "BGE": s_bge, "TSE": s_tse}


_KIND_OPTIONS = {"sdm": ("eps",), "bsdm": ("eps", "lam"), "tal": ("margin",), "waf": ("gamma",),
                 "itc": ("alpha",)}


def _term_names(terms) -> list[str]:
    """Log names: the kind, or kind + position where a kind appears twice."""
    counts = {}
    for t in terms:
        counts[t.kind] = counts.get(t.kind, 0) + 1
    return [t.kind if counts[t.kind] == 1 else f"{t.kind}{i}" for i, t in enumerate(terms)]


def _reduce(per_B: torch.Tensor, w_B: torch.Tensor | None, reduction: str) -> torch.Tensor:
    x = per_B if w_B is None else w_B.to(per_B.dtype) * per_B
    return losses.local_mean(x) if reduction == "mean" else losses.local_sum(x)


def drop_patches(weights_BN: torch.Tensor, n_drop: int, seed: int, index_B: torch.Tensor
                 ) -> torch.Tensor:
    """Kept patch indices (B x (N - n_drop), ascending) after dropping n_drop patches drawn
    without replacement with probability proportional to weights_BN (an exponential race keyed
    by sample, through tbps.kernels.topk_select)."""
    N = weights_BN.shape[1]
    noise = draws.exponential(seed, index_B, N, stream=draws.AWM)
    drop = topk_select(weights_BN / noise, weights_BN > 0, n_drop)
    return kept_indices(drop.indices_Bk, drop.valid_Bk, N)


def awm_weights(scores_BN: torch.Tensor) -> torch.Tensor:
    """AWM's drop weight of each patch: 1 - its min-max normalised score (per image)."""
    s = scores_BN.float()
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    return 1.0 - (s - lo) / (hi - lo).clamp(min=1e-12)


def aggregate_layers(rows_BlL: torch.Tensor, beta: float) -> torch.Tensor:
    """AGM's layer aggregation: a_bar^1 = a^1, a_bar^l = beta a_bar^(l-1) + (1 - beta) a^l."""
    agg = rows_BlL[:, 0]
    for layer in range(1, rows_BlL.shape[1]):
        agg = beta * agg + (1.0 - beta) * rows_BlL[:, layer]
    return agg


def kept_indices(drop_Bk: torch.Tensor, drop_valid_Bk: torch.Tensor, N: int) -> torch.Tensor:
    """Ascending indices of the N - k patches not dropped (no host sync: a sort, not nonzero)."""
    dropped = torch.zeros(drop_Bk.shape[0], N, dtype=torch.long, device=drop_Bk.device)
    dropped.scatter_add_(1, drop_Bk, drop_valid_Bk.long())
    order = torch.arange(N, device=drop_Bk.device)[None] + N * (dropped > 0).long()
    return order.sort(dim=1).values[:, : N - drop_Bk.shape[1]]


class RetrievalModel(nn.Module):
    """The dual encoder and the recipe; every call goes through `forward`, so DDP's reducer and
    ZeRO-3's parameter hooks see all work (the momentum copy is one of these, pruned)."""

    def __init__(self, encoder: nn.Module, recipe: Recipe):
        super().__init__()
        self.encoder, self.recipe = encoder, recipe

    def forward(self, batch: dict, mode: str = "train", step: StepInfo | None = None):
        if mode == "train":
            return self.recipe.train_losses(self.encoder, batch, step)
        if mode == "momentum":
            return self.recipe.momentum_forward(self.encoder, batch, step)
        if mode == "per_sample":
            return self.recipe.per_sample_losses(self.encoder, batch, step)
        if mode in ("image", "text"):
            return self.recipe.embed(self.encoder, batch, mode)
        if mode in ("image_tokens", "text_tokens"):
            return self.recipe.tokens(self.encoder, batch, mode.split("_")[0])
        if mode == "itm":
            return self.recipe.itm_scores(batch)
        if mode == "features":                  # the encoder's own outputs
            return self.encoder(batch.get("image"), batch.get("input_ids"), batch.get("keep"),
                                rows=batch.get("rows", "last"))
        raise ValueError(f"unknown forward mode {mode!r}")

    def external_parameters(self) -> list[nn.Parameter]:
        return self.encoder.external_parameters() if self.encoder is not None else []

    def new_parameter_names(self) -> set[str]:
        names = set()
        for attr in self.recipe.new_modules:
            module = getattr(self.recipe, attr, None)
            if module is not None:
                names |= {f"recipe.{attr}.{n}" for n, _ in module.named_parameters()}
        return names
