"""The CLIP sizes the project names (README tables, dry-run estimates, benchmarks): one table.

    overrides("ViT-B/16")        # the `model.*` config overrides for that size
    clip_config("ViT-L/14")      # a transformers CLIPConfig of it (meta-device counting)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSize:
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    hub_id: str


CLIP_SIZES = {
    "ViT-B/16": ClipSize(768, 12, 12, 16, 512, 12, 8, 512, "openai/clip-vit-base-patch16"),
    "ViT-L/14": ClipSize(1024, 24, 16, 14, 768, 12, 12, 768, "openai/clip-vit-large-patch14"),
}
# person retrieval's image size (IRRA, RDE): 384 x 128, 77 caption tokens
PERSON_IMAGE_SIZE = (384, 128)
CONTEXT_LENGTH = 77


def size_of_hub_id(name: str) -> str | None:
    """The table's name of a hub id ("openai/clip-vit-base-patch16" -> "ViT-B/16"), else None."""
    return next((k for k, s in CLIP_SIZES.items() if s.hub_id == name), None)


def overrides(name: str, *, image_size=PERSON_IMAGE_SIZE, context_length: int | None = None
              ) -> list[str]:
    """`model.*` overrides that build a randomly initialised CLIP of this size."""
    s = CLIP_SIZES[name]
    out = [f"model.vision_width={s.vision_width}", f"model.vision_layers={s.vision_layers}",
           f"model.vision_heads={s.vision_heads}", f"model.text_width={s.text_width}",
           f"model.text_layers={s.text_layers}", f"model.text_heads={s.text_heads}",
           f"model.embed_dim={s.embed_dim}", f"model.patch_size={s.patch_size}",
           f"model.image_size=[{image_size[0]},{image_size[1]}]"]
    if context_length is not None:
        out.append(f"model.context_length={context_length}")
    return out


def clip_config(name: str, image_size: int = 224):
    """A transformers CLIPConfig of this size (square images, as the hub's)."""
    from transformers import CLIPConfig  # kept off the import of this table

    s = CLIP_SIZES[name]
    return CLIPConfig(
        vision_config=dict(hidden_size=s.vision_width, intermediate_size=4 * s.vision_width,
                           num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                           patch_size=s.patch_size, image_size=image_size),
        text_config=dict(hidden_size=s.text_width, intermediate_size=4 * s.text_width,
                         num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads),
        projection_dim=s.embed_dim)
