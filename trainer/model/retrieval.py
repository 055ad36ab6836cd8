"""The retrieval model: the dual encoder and the heads a recipe adds, and what inference asks of it.

Every call goes through `forward(entry, *args)`, which runs `entry(model, *args)`: DDP's reducer
and ZeRO-3's parameter hooks see all work whatever the entry point. Entry points here (inference)
are `embed`, `tokens`, `itm_scores` and `features`; the training recipe has its own
(trainer/recipe/). `similarity` needs no model: it reads which branches the embeddings hold.

    img = model(embed, batch, "image")          # {"bge": B x E[, "tse": B x E]}, normalised
    txt = model(embed, batch, "text")
    sims = similarity(txt, img)                 # {"t2i": Q x G} or {"BGE+TSE", "BGE", "TSE"}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbps.trainer.common.config import Config
from tbps.trainer.model.encoder import DualEncoder, padding_mask
from tbps.trainer.model.heads import CrossModalEncoder, MLMHead, identity_classifier
from tbps.trainer.model.tse import TokenSelectionEmbedding, select_image, select_text, token_counts

HEADS = ("classifier", "cross", "mlm_head", "itm_head", "tse_image", "tse_text")


class RetrievalModel(nn.Module):
    """The heads present follow the recipe's parts (config `recipe:`): an identity classifier
    for an id term, the cross-modal encoder for mlm / itm, the MLM and ITM heads, RDE's TSE for
    the tse branch, and per-training-sample weights when a weighting part is on."""

    def __init__(self, encoder: DualEncoder, cfg: Config, *, num_classes: int, num_samples: int,
                 vocab_size: int):
        super().__init__()
        self.encoder = encoder
        rc, E = cfg.recipe, encoder.embed_dim
        kinds = rc.kinds()
        self.context_length = cfg.model.context_length
        self.cross_padding_mask = rc.cross.padding_mask
        # creation order fixes the random initialisation: classifier, cross, mlm_head, ...
        self.classifier = identity_classifier(E, num_classes) if "id" in kinds else None
        self.cross = (CrossModalEncoder(E, cfg.model.cross_heads, cfg.model.cross_layers,
                                        residual=rc.cross.residual,
                                        attention_init=rc.cross.attention_init)
                      if kinds & {"mlm", "itm"} else None)
        self.mlm_head = MLMHead(E, vocab_size) if "mlm" in kinds else None
        self.itm_head = nn.Linear(E, 2) if "itm" in kinds else None
        self.tse_image = self.tse_text = None
        self.tse_k = (0, 0)
        if "tse" in rc.branches:
            self.tse_k = token_counts(rc.tse.ratio, encoder.grid_hw, cfg.model.context_length)
            self.tse_image = TokenSelectionEmbedding(E, rc.tse.dim, keep_bn_eval=rc.tse.authors_bn_eval)
            self.tse_text = TokenSelectionEmbedding(E, rc.tse.dim, keep_bn_eval=rc.tse.authors_bn_eval,
                                                    filler_in_bn_stats=rc.tse.filler_in_bn_stats)
        if rc.weighting.kind != "none":         # the weighting part's per-pair weights
            self.register_buffer("sample_weight", torch.ones(num_samples))
        else:
            self.sample_weight = None

    def forward(self, entry, *args, **kwargs):
        """entry(self, *args, **kwargs), inside this module's forward."""
        return entry(self, *args, **kwargs)

    @property
    def has_tse(self) -> bool:
        return self.tse_image is not None

    @property
    def attention_rows(self) -> str:
        """The attention rows the encoders must return for this model's branches: the last
        layer's for TSE, none otherwise."""
        return "last" if self.has_tse else "none"

    def tse(self, img, txt) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """TSE embeddings (image, text) of encoder outputs; either input may be None."""
        k_image, k_text = self.tse_k
        return (None if img is None else select_image(self.tse_image, img, k_image),
                None if txt is None else select_text(self.tse_text, txt, k_text))

    def cross_tokens(self, txt_tokens_BLE, eos_B, img_tokens_BTE) -> torch.Tensor:
        """The cross-modal encoder's output tokens (words attending to the image tokens)."""
        pad = padding_mask(eos_B, txt_tokens_BLE.shape[1]) if self.cross_padding_mask else None
        return self.cross(txt_tokens_BLE, img_tokens_BTE, pad)

    def external_parameters(self) -> list[nn.Parameter]:
        return self.encoder.external_parameters() if self.encoder is not None else []

    def new_parameter_names(self) -> set[str]:
        """Parameters of the heads (the optimizer gives them their own learning rate)."""
        names = set()
        for attr in HEADS:
            module = getattr(self, attr, None)
            if module is not None:
                names |= {f"{attr}.{n}" for n, _ in module.named_parameters()}
        return names


# -- inference entry points: model(entry, ...) ----------------------------------------------------

def embed(model: RetrievalModel, batch: dict, modality: str) -> dict[str, torch.Tensor]:
    """Normalised embeddings of each branch: {"bge": B x E[, "tse": B x E]}."""
    enc = model.encoder
    if modality == "image":
        img = enc.encode_image(batch["image"], rows=model.attention_rows)
        out = {"bge": F.normalize(img.embeds_BE.float(), dim=-1)}
        if model.has_tse:
            out["tse"] = F.normalize(model.tse(img, None)[0].float(), dim=-1)
        return out
    txt = enc.encode_text(batch["input_ids"], rows=model.attention_rows,
                          length=batch.get("text_length"))
    out = {"bge": F.normalize(txt.embeds_BE.float(), dim=-1)}
    if model.has_tse:
        out["tse"] = F.normalize(model.tse(None, txt)[1].float(), dim=-1)
    return out


def tokens(model: RetrievalModel, batch: dict, modality: str) -> dict[str, torch.Tensor]:
    """Projected tokens for ITM re-ranking: image {"tokens": B x T x E}; text {"tokens":
    B x context_length x E (zero-padded), "eos": B}."""
    enc = model.encoder
    if modality == "image":
        return {"tokens": enc.encode_image(batch["image"], rows="none").tokens_BTE}
    txt = enc.encode_text(batch["input_ids"], rows="none", length=batch.get("text_length"))
    pad = model.context_length - txt.tokens_BLE.shape[1]
    return {"tokens": F.pad(txt.tokens_BLE, (0, 0, 0, pad)), "eos": txt.eos_B}


def itm_scores(model: RetrievalModel, batch: dict) -> torch.Tensor:
    """ITM match score (positive minus negative logit) of each (caption, image) pair from their
    projected tokens (`tokens`): batch {"text_tokens", "eos", "image_tokens"}."""
    hidden = model.cross_tokens(batch["text_tokens"], batch["eos"], batch["image_tokens"])[:, 0]
    logits = model.itm_head(hidden).float()
    return logits[:, 1] - logits[:, 0]


def features(model: RetrievalModel, batch: dict):
    """The encoder's own outputs (ImageFeatures, TextFeatures) of batch {"image", "input_ids",
    "keep", "rows"}; either may be absent."""
    return model.encoder(batch.get("image"), batch.get("input_ids"), batch.get("keep"),
                         rows=batch.get("rows", "last"))


def similarity(text: dict, image: dict) -> dict[str, torch.Tensor]:
    """Named query x gallery similarities of `embed`'s outputs; the first is the one
    checkpoints are chosen on."""
    s_bge = text["bge"] @ image["bge"].T
    if "tse" not in text:
        return {"t2i": s_bge}
    s_tse = text["tse"] @ image["tse"].T
    return {"BGE+TSE": (s_bge + s_tse) / 2, "BGE": s_bge, "TSE": s_tse}
