"""RDE (CVPR'24): robust dual embedding for noisy correspondence (METHODS.md).

- BGE: the global embeddings (image CLS, text EOS).
- TSE: the top select_ratio of patches (by the last layer's CLS attention row) and of caption
  words (by the EOS row; k = floor(ratio x (context_length - 2)), capped by the caption's length)
  through `kernels.topk_select`, then FC + MLP and max-pooling (heads.TokenSelectionEmbedding).
- TAL on both branches over the keys of all ranks (kernels' similarity_loss, kind "tal"), summed
  over the anchors weighted by the consensus labels: L = sum_i lhat_i (L_BGE(i) + L_TSE(i)).
  Pairs with lhat = 0 are no anchors but remain negatives for the others; a batch with no anchor
  gives a zero loss and zero gradients.
- CCD (trainer/ccd.py) at the start of every epoch after `ccd_warmup_epochs`: per-sample TAL of
  every training pair, both branches, scored by each rank on its share in eval mode with the
  training augmentations, gathered by sample index; the labels live in the `lhat` buffer, so
  they are checkpointed and a resumed run continues with the same ones.
- Evaluation: BGE, TSE and their mean, "BGE+TSE", which picks the best checkpoint.
- The TSE BatchNorms train on each rank's own batch statistics, as BatchNorm does under DDP;
  `rde.authors_bn_eval=true` keeps them in eval mode, as the authors' released code did.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import topk_select
from trainer import ccd, dist, losses
from trainer.heads import TokenSelectionEmbedding
from trainer.masking import word_positions
from trainer.recipes.base import Recipe, StepInfo

log = logging.getLogger(__name__)


class RDE(Recipe):
    new_modules = ("tse_image", "tse_text")
    branches = ("bge", "tse")

    def __init__(self, cfg, *, embed_dim: int, num_samples: int, grid_hw: tuple[int, int]):
        super().__init__()
        self.cfg, r = cfg, cfg.rde
        self.k_image = max(1, math.floor(r.select_ratio * grid_hw[0] * grid_hw[1]))
        self.k_text = max(1, math.floor(r.select_ratio * (cfg.model.context_length - 2)))
        keep = r.authors_bn_eval
        self.tse_image = TokenSelectionEmbedding(embed_dim, r.tse_dim, keep_bn_eval=keep)
        self.tse_text = TokenSelectionEmbedding(embed_dim, r.tse_dim, keep_bn_eval=keep)
        self.register_buffer("lhat", torch.ones(num_samples))

    # -- features ------------------------------------------------------------------------------

    def _tse_image(self, img) -> torch.Tensor:
        patches = img.tokens_BTE[:, 1:]
        valid = torch.ones(img.attn_BK.shape, dtype=torch.bool, device=patches.device)
        sel = topk_select(img.attn_BK.detach(), valid, self.k_image, patches)
        return self.tse_image(sel.features_BkD, sel.valid_Bk)

    def _tse_text(self, txt) -> torch.Tensor:
        valid = word_positions(txt.input_ids_BL, txt.eos_B)
        k = min(self.k_text, txt.attn_BL.shape[1])
        sel = topk_select(txt.attn_BL.detach(), valid, k, txt.tokens_BLE)
        return self.tse_text(sel.features_BkD, sel.valid_Bk)

    def _features(self, encoder, batch):
        img = encoder.encode_image(batch["image"])
        txt = encoder.encode_text(batch["input_ids"])
        return img.embeds_BE, txt.embeds_BE, self._tse_image(img), self._tse_text(txt)

    def _tal(self, bge_i, bge_t, tse_i, tse_t, pid, tau):
        margin = self.cfg.loss.margin
        keys_b = losses.gather_keys(bge_i, bge_t, pid)
        keys_t = losses.gather_keys(tse_i, tse_t, pid)
        l_bge = losses.retrieval_loss("tal", bge_i, bge_t, pid, keys_b, tau=tau, margin=margin)
        l_tse = losses.retrieval_loss("tal", tse_i, tse_t, pid, keys_t, tau=tau, margin=margin)
        return l_bge, l_tse

    # -- training ------------------------------------------------------------------------------

    def train_losses(self, encoder, batch, step: StepInfo):
        l_bge, l_tse = self._tal(*self._features(encoder, batch), batch["pid"], step.tau)
        w = self.lhat[batch["index"]].to(l_bge.dtype)
        return {"loss": losses.local_sum(w * (l_bge + l_tse)),
                "tal_bge": l_bge.detach().mean(), "tal_tse": l_tse.detach().mean(),
                "anchors": w.mean()}

    def per_sample_losses(self, encoder, batch, step: StepInfo):
        l_bge, l_tse = self._tal(*self._features(encoder, batch), batch["pid"], step.tau)
        return {"bge": l_bge, "tse": l_tse}

    def before_epoch(self, ctx) -> dict:
        r, epoch = self.cfg.rde, ctx.state.epoch
        if not r.ccd or epoch < r.ccd_warmup_epochs:
            return {}
        t0 = time.time()
        scores = ctx.score_training_set()
        result = None
        if dist.rank() == 0:
            result = self._divide(scores, epoch, ctx.run_dir)
        labels, logs = dist.broadcast_object(result)
        self.lhat[torch.as_tensor(scores["index"], device=self.lhat.device)] = \
            torch.as_tensor(labels, device=self.lhat.device)
        logs["ccd_seconds"] = round(time.time() - t0, 2)
        return logs

    def _divide(self, scores: dict, epoch: int, run_dir: Path):
        r = self.cfg.rde
        division = ccd.divide({"bge": scores["bge"], "tse": scores["tse"]},
                              seed=self.cfg.train.seed * 100003 + epoch,
                              max_iter=r.gmm_max_iter, tol=r.gmm_tol, reg_covar=r.gmm_reg_covar,
                              threshold=r.clean_threshold)
        logs = {"kept": float(division.labels.mean()), "disagree": division.disagree,
                "scored": int(len(division.labels))}
        noisy = scores.get("noisy")
        if noisy is not None and noisy.any():
            logs.update({f"ccd/{k}": v for k, v in ccd.diagnostics(division, noisy).items()})
            if r.ccd_plots:
                out = Path(run_dir) / "ccd"
                out.mkdir(parents=True, exist_ok=True)
                ccd.plot(division, noisy, out / f"epoch-{epoch:02d}.png",
                         f"epoch {epoch}: consensus precision "
                         f"{logs['ccd/consensus_precision']:.3f}, recall "
                         f"{logs['ccd/consensus_recall']:.3f}")
        return division.labels, logs

    # -- evaluation ----------------------------------------------------------------------------

    def embed(self, encoder, batch, modality: str):
        if modality == "image":
            img = encoder.encode_image(batch["image"])
            return {"bge": F.normalize(img.embeds_BE.float(), dim=-1),
                    "tse": F.normalize(self._tse_image(img).float(), dim=-1)}
        txt = encoder.encode_text(batch["input_ids"])
        return {"bge": F.normalize(txt.embeds_BE.float(), dim=-1),
                "tse": F.normalize(self._tse_text(txt).float(), dim=-1)}

    def similarity(self, text, image):
        s_bge = text["bge"] @ image["bge"].T
        s_tse = text["tse"] @ image["tse"].T
        return {"BGE+TSE": (s_bge + s_tse) / 2, "BGE": s_bge, "TSE": s_tse}

