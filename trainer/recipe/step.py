"""The one training step, composed of the parts a config names (trainer/common/config.py
RecipeConfig). IRRA, RDE, AMNS and AGA are presets of it (trainer/recipe/presets/).

The step is straight-line code in one fixed order (`Recipe.train_losses`); each part's code is
in the file named after it:
  0. augment   RDE's caption augmentation, when on (words masked,
               replaced or deleted; training only)                     caption_augment.py
  1. text      the online text encoder on the captions (EOS rows of every layer for AGM, of the
               last layer for TSE);
  2. masking   the caption mask, when an mlm term or TEM is on        caption_masking.py
  3. momentum  one no-grad forward of the momentum copy, when a part
               needs it (AWM's scores, TEM's captions, itc's targets)  momentum.py
  4. patches   image-token selection: all | random | AWM             token_selection.py
  5. image     the online image encoder on the kept patches
  6. enrich    the online text encoder again on TEM's captions         caption_masking.py
  7. branches  bge (image CLS, text EOS) and tse                       ../model/tse.py
  8. keys      every rank's embeddings (with gradient) and ids, gathered once
  9. terms     the loss terms in the configured order, each sample weighted by the weighting
               part (RDE's consensus division) where the term says so  losses.py,
                                                                       consensus_division.py
The trainer calls it through the model's forward: `model(recipe.train_losses, batch, step)`;
the consensus division scores `recipe.division_batch(batch, epoch)` (its own augmentation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tbps.trainer.common.config import SIMILARITY_KINDS, Config
from tbps.trainer.recipe import draws, losses
from tbps.trainer.recipe.caption_augment import DIVISION, TRAIN, CaptionAugment
from tbps.trainer.recipe.caption_masking import mask_captions
from tbps.trainer.recipe.momentum import MomentumRequest, momentum_forward
from tbps.trainer.recipe.token_selection import keep_patches


@dataclass
class StepInfo:
    epoch: int
    step: int                      # optimizer step
    tau: float
    generator: torch.Generator     # CPU generator seeded by (seed, rank, epoch, batch): IRRA's
    #                                random masking; the other sampled parts use recipe/draws.py
    momentum_model: nn.Module | None = None   # the EMA copy (trainer/running/ema.py), if built


class Recipe:
    """The configured parts, and the step that runs them. Holds no parameters: the model's heads
    are the model's (trainer/model/retrieval.py)."""

    def __init__(self, cfg: Config, tokenizer):
        self.rc = cfg.recipe
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
        self.special_ids = tuple(tokenizer.special_ids)
        self.seed = cfg.train.seed
        self.augment = CaptionAugment.build(self.rc.caption_augment, tokenizer, self.seed)
        self.needs_momentum = bool(self.rc.momentum_parts())
        used = {b for t in self.rc.losses if t.kind in SIMILARITY_KINDS
                for b in t.branches_or_default()}
        if "itm" in self.rc.kinds():
            used.add("bge")
        self.key_branches = [b for b in self.rc.branches if b in used]

    def train_losses(self, model, batch: dict, step: StepInfo) -> dict[str, torch.Tensor]:
        """An entry point of the model: the step's total loss ("loss") and what it logs."""
        rc, kinds, enc = self.rc, self.rc.kinds(), model.encoder
        tem = rc.enrich.kind != "none"
        keys = self.draw_keys(batch, step)
        agm = rc.caption_mask.kind == "attention"
        # 0. augment
        ids = batch["input_ids"]
        if self.augment is not None and model.training:
            ids = self.augment(ids, keys[1], epoch=step.epoch, stage=TRAIN)
        # 1. text (cut to the batch's longest caption, except under the switches for the
        # authors' behaviour, where padding is read: every position, as their code encodes)
        length = batch.get("text_length")
        if length is None and (not rc.cross.padding_mask or rc.tse.filler_in_bn_stats):
            length = ids.shape[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tem):
            txt = enc.encode_text(ids, rows="all" if agm else model.attention_rows,
                                  length=length)
        # 2. masking
        masked_ids = mlm_labels = None
        if "mlm" in kinds or tem:
            masked_ids, mlm_labels = mask_captions(
                rc.caption_mask, txt, generator=step.generator, keys=keys, mask_id=self.mask_id,
                vocab_size=self.vocab_size, special_ids=self.special_ids)
        # 3. momentum
        mom = None
        if self.needs_momentum:
            if step.momentum_model is None:
                raise RuntimeError("this recipe needs the momentum model; the trainer builds it")
            request = MomentumRequest(batch["image"], txt.input_ids_BL, txt.embeds_BE.detach(),
                                      masked_ids, mlm_labels, keys)
            mom = step.momentum_model(momentum_forward, rc, request, self.special_ids)
        # 4. patches, 5. image
        keep_BK = None
        if model.training:
            keep_BK = keep_patches(rc.image_tokens, enc.grid_hw[0] * enc.grid_hw[1],
                                   None if mom is None else mom.patch_scores_BN, keys)
        img = enc.encode_image(batch["image"], keep_BK, rows=model.attention_rows)
        # 6. enrich
        if tem:
            txt = enc.encode_text(mom.caption_ids_BL, rows=model.attention_rows,
                                  length=txt.input_ids_BL.shape[1])
        # 7. branches
        emb = {"bge": (img.embeds_BE, txt.embeds_BE)}
        if model.has_tse:
            emb["tse"] = model.tse(img, txt)
        # 8. keys
        pid = batch["pid"]
        x = losses.TermInputs(img=img, txt=txt, emb=emb, pid_B=pid, tau=step.tau,
                              key_ids_N=losses.gather_ids(pid),
                              keys={b: losses.gather_keys(*emb[b]) for b in self.key_branches},
                              draw_keys=keys, momentum=mom, masked_ids_BL=masked_ids,
                              mlm_labels_BL=mlm_labels)
        # 9. terms
        weight_B = model.sample_weight[batch["index"]] if model.sample_weight is not None else None
        out, total = {}, 0
        for name, term in zip(losses.term_names(rc.losses), rc.losses):
            value = losses.term(model, term, name, x, weight_B if term.weighted else None, out)
            total = total + term.weight * value
        if weight_B is not None:
            out["anchors" if rc.weighting.use == "labels" else "mean_weight"] = weight_B.mean()
        if mom is not None and mom.enriched_B is not None:
            out["enriched"] = mom.enriched_B.float().mean()
        return {"loss": total, **out}

    def division_batch(self, batch: dict, epoch: int) -> dict:
        """The batch as the consensus division scores it: its captions augmented with draws of
        their own when recipe.caption_augment is on for the division (as the authors' division
        pass, which reloads the augmenting dataset); else the batch itself."""
        if self.augment is None or not self.rc.caption_augment.division:
            return batch
        ids = self.augment(batch["input_ids"], sample_index(batch), epoch=epoch, stage=DIVISION)
        return {**batch, "input_ids": ids}

    def draw_keys(self, batch: dict, step: StepInfo) -> tuple[int, torch.Tensor]:
        """(seed, sample index) the sampled parts key their draws by (trainer/recipe/draws.py):
        the step's seed from (training seed, epoch, optimizer step), and sample_index."""
        return draws.step_seed(self.seed, step.epoch, step.step), sample_index(batch)


def sample_index(batch: dict) -> torch.Tensor:
    """Each sample's index in the dataset (its position in the batch where a batch has none)."""
    index = batch.get("index")
    if index is None:
        index = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return index
