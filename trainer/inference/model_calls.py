"""Every call this package makes into a trained model, one function per kind of call.

evaluate.py, embedder.py and export.py reach the model only through these. `model` may be wrapped
(DDP, DeepSpeed): each call runs through its forward (trainer/model/retrieval.py: entry points),
so ZeRO-3 gathers the parameters there.
"""
from __future__ import annotations

import torch

from tbps.trainer.common.dist import unwrap
from tbps.trainer.model import retrieval


def embed_batch(model, batch: dict, mode: str) -> dict[str, torch.Tensor]:
    """The embeddings of a prepared batch; mode "image", "text", "image_tokens" or "text_tokens"."""
    if mode.endswith("_tokens"):
        return model(retrieval.tokens, batch, mode.split("_")[0])
    return model(retrieval.embed, batch, mode)


def itm_scores(model, batch: dict) -> torch.Tensor:
    """ITM scores of pairs: batch holds "text_tokens", "eos" and "image_tokens"."""
    return model(retrieval.itm_scores, batch)


def similarity(model, text: dict, image: dict) -> dict[str, torch.Tensor]:
    """{similarity name: Q x G} of the embeddings' branches, its first the one checkpoints are
    chosen on (the same for every model: `model` is not needed)."""
    return retrieval.similarity(text, image)


def has_itm_head(model) -> bool:
    return getattr(unwrap(model), "itm_head", None) is not None
