"""Build the tokenizer and the model from a config; save and load consolidated weights.

A weights folder (`best/`, `final/` of a run) holds model.safetensors (the whole
RetrievalModel), config.yaml and tokenizer/: everything `python -m trainer.evaluate` needs.
"""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from data_pipeline.manifest import read_meta
from data_pipeline.tokenizer import CaptionTokenizer
from trainer.config import Config, load_config, save_config
from trainer.model import DualEncoder
from trainer.recipes import RetrievalModel, build_recipe

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CLIP_CONFIG = "clip_config.json"


def load_tokenizer(cfg: Config) -> CaptionTokenizer:
    name = cfg.data.tokenizer
    length = cfg.model.context_length
    if name != "auto":
        return CaptionTokenizer.from_pretrained(name, context_length=length)
    if cfg.model.pretrained:
        return CaptionTokenizer.from_pretrained(cfg.model.pretrained, context_length=length)
    folder = read_meta(cfg.data.shards).get("tokenizer")
    if folder is None:
        raise ValueError(f"data.tokenizer is 'auto' but the shards in {cfg.data.shards} carry no "
                         "tokenizer (sharded with --tokenizer none); set data.tokenizer")
    return CaptionTokenizer.from_pretrained(Path(cfg.data.shards) / folder, context_length=length)


def build_model(cfg: Config, tokenizer: CaptionTokenizer, num_classes: int,
                num_samples: int) -> RetrievalModel:
    if cfg.model.pretrained:
        encoder = DualEncoder.from_pretrained(cfg.model.pretrained, cfg.model,
                                              vocab_size=tokenizer.vocab_size,
                                              eot_id=tokenizer.eot_id)
    else:
        encoder = DualEncoder.from_config(cfg.model, vocab_size=tokenizer.vocab_size,
                                          sot_id=tokenizer.sot_id, eot_id=tokenizer.eot_id,
                                          pad_id=tokenizer.pad_id)
    recipe = build_recipe(cfg, embed_dim=encoder.embed_dim, num_classes=num_classes,
                          num_samples=num_samples, tokenizer=tokenizer, grid_hw=encoder.grid_hw)
    return RetrievalModel(encoder, recipe)


def save_weights(state_dict: dict, out_dir: Path, cfg: Config, tokenizer, clip_config,
                 extra: dict | None = None) -> None:
    """Rank 0 only: a self-contained weights folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (extra or {}).items()}
    save_file(tensors, str(out_dir / (WEIGHTS + ".partial")), metadata=meta)
    (out_dir / (WEIGHTS + ".partial")).replace(out_dir / WEIGHTS)
    save_config(cfg, out_dir / "config.yaml")
    clip_config.to_json_file(str(out_dir / CLIP_CONFIG))
    tokenizer.save(out_dir / "tokenizer")


def load_weights_folder(folder: Path, overrides=()) -> tuple[Config, CaptionTokenizer,
                                                              RetrievalModel]:
    """Config, tokenizer and model (weights loaded, eval mode) from a weights folder."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS} does not exist")
    cfg = load_config(folder / "config.yaml", list(overrides))
    tokenizer = CaptionTokenizer.from_pretrained(folder / "tokenizer",
                                                 context_length=cfg.model.context_length)
    state = load_file(str(folder / WEIGHTS))
    num_classes = state["recipe.classifier.weight"].shape[0] \
        if "recipe.classifier.weight" in state else 0
    num_samples = state["recipe.lhat"].shape[0] if "recipe.lhat" in state else 0
    encoder = DualEncoder.from_clip_config(CLIPConfig.from_json_file(str(folder / CLIP_CONFIG)),
                                           cfg.model.image_size, tokenizer.eot_id)
    recipe = build_recipe(cfg, embed_dim=encoder.embed_dim, num_classes=num_classes,
                          num_samples=num_samples, tokenizer=tokenizer, grid_hw=encoder.grid_hw)
    model = RetrievalModel(encoder, recipe)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return cfg, tokenizer, model.eval()
