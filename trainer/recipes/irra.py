"""IRRA (CVPR'23): SDM + ID + IRR (masked language modelling through a cross-modal encoder).

    L = w_sdm * SDM + w_id * ID + w_mlm * MLM     (METHODS.md; weights 1 in the paper)

SDM is KL(p || q) in both retrieval directions over the keys of all ranks (kernels'
similarity_loss, kind "sdm"); ID is one classifier shared by both modalities on the unnormalised
global embeddings; MLM masks 15 % of the caption's words, encodes the masked caption with the same
text encoder and predicts the words from the cross-modal encoder (text attending all image tokens).
"""
from __future__ import annotations

import torch

from trainer import losses
from trainer.heads import CrossModalEncoder, MLMHead, identity_classifier
from trainer.masking import random_mlm_mask
from trainer.recipes.base import Recipe, StepInfo


class IRRA(Recipe):
    new_modules = ("classifier", "cross", "mlm_head")

    def __init__(self, cfg, *, embed_dim: int, num_classes: int, tokenizer):
        super().__init__()
        self.w = cfg.loss
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
        self.special_ids = tokenizer.special_ids
        self.pad_id = tokenizer.pad_id
        self.classifier = identity_classifier(embed_dim, num_classes) if self.w.id > 0 else None
        if self.w.mlm > 0:
            self.cross = CrossModalEncoder(embed_dim, cfg.model.cross_heads, cfg.model.cross_layers)
            self.mlm_head = MLMHead(embed_dim, tokenizer.vocab_size)

    def train_losses(self, encoder, batch, step: StepInfo):
        img = encoder.encode_image(batch["image"])
        txt = encoder.encode_text(batch["input_ids"])
        pid = batch["pid"]
        parts = {}
        if self.w.sdm > 0:
            keys = losses.gather_keys(img.embeds_BE, txt.embeds_BE, pid)
            per_sample = losses.retrieval_loss("sdm", img.embeds_BE, txt.embeds_BE, pid, keys,
                                               tau=step.tau)
            parts["sdm"] = losses.local_mean(per_sample)
        if self.classifier is not None:
            parts["id"] = losses.id_loss(self.classifier(img.embeds_BE),
                                         self.classifier(txt.embeds_BE), pid)
        if self.w.mlm > 0:
            parts["mlm"] = self._mlm(encoder, img.tokens_BTE, txt, step)
        weights = {"sdm": self.w.sdm, "id": self.w.id, "mlm": self.w.mlm}
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    def _mlm(self, encoder, image_tokens, txt, step: StepInfo) -> torch.Tensor:
        masked, labels = random_mlm_mask(txt.input_ids_BL, txt.eos_B, prob=self.w.mlm_prob,
                                         mask_id=self.mask_id, vocab_size=self.vocab_size,
                                         special_ids=self.special_ids, generator=step.generator)
        masked_txt = encoder.encode_text(masked)
        pad = torch.arange(masked.shape[1], device=masked.device)[None] > masked_txt.eos_B[:, None]
        hidden = self.cross(masked_txt.tokens_BLE, image_tokens, pad)
        return losses.mlm_loss(self.mlm_head(hidden), labels)
