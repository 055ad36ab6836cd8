"""What every method recipe provides, and the module that holds encoder + recipe.

A recipe is an nn.Module owning the method's own modules (classifier, cross-modal encoder, TSE
heads, ...) and its losses. `RetrievalModel` holds the dual encoder and the recipe and routes
every call through one `forward`, so DDP's reducer and ZeRO-3's parameter hooks see all work.

Seams for the methods (METHODS.md): `train_losses` gets per-step state (temperature, a seeded
generator, per-sample weights via the recipe's own buffers); `per_sample_losses` scores pairs
without training (RDE's consensus division); `embed` returns one normalised embedding per branch
and `similarity` combines branches (RDE reports BGE, TSE and their mean); `before_epoch` is
called by the trainer with a context that can run passes over the training set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepInfo:
    epoch: int
    step: int                      # optimizer step
    tau: float
    generator: torch.Generator     # CPU generator seeded by (seed, rank, step)
    extra: dict = field(default_factory=dict)


class Recipe(nn.Module):
    """Base: global embeddings only (one branch, "bge")."""

    new_modules: tuple[str, ...] = ()   # attribute names trained at the higher learning rate
    branches: tuple[str, ...] = ("bge",)

    def train_losses(self, encoder, batch: dict, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def per_sample_losses(self, encoder, batch: dict, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} scores no per-sample losses")

    def embed(self, encoder, batch: dict, modality: str) -> dict[str, torch.Tensor]:
        if modality == "image":
            return {"bge": F.normalize(encoder.encode_image(batch["image"]).embeds_BE.float(), dim=-1)}
        return {"bge": F.normalize(encoder.encode_text(batch["input_ids"]).embeds_BE.float(), dim=-1)}

    def similarity(self, text: dict, image: dict) -> dict[str, torch.Tensor]:
        """Named query x gallery similarities; the first is the one checkpoints are chosen on."""
        return {"t2i": text["bge"] @ image["bge"].T}

    def before_epoch(self, ctx) -> dict:
        """Work at the start of an epoch (RDE: consensus division); returns values to log."""
        return {}


class RetrievalModel(nn.Module):
    def __init__(self, encoder: nn.Module, recipe: Recipe):
        super().__init__()
        self.encoder, self.recipe = encoder, recipe

    def forward(self, batch: dict, mode: str = "train", step: StepInfo | None = None):
        if mode == "train":
            return self.recipe.train_losses(self.encoder, batch, step)
        if mode == "per_sample":
            return self.recipe.per_sample_losses(self.encoder, batch, step)
        if mode in ("image", "text"):
            return self.recipe.embed(self.encoder, batch, mode)
        if mode == "features":                  # the encoder's own outputs (EMA copies use this)
            return self.encoder(batch.get("image"), batch.get("input_ids"), batch.get("keep"))
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
