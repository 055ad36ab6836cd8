"""Build the tokenizer and the model from a config; save and load consolidated weights.

A weights folder (`best/`, `final/` of a run) holds everything `tbps evaluate`
needs: model.safetensors (the whole RetrievalModel), config.yaml (the run's resolved config,
recipe parts included), clip_config.json (the encoder's architecture), tokenizer/, and
model.json, which says what rebuilding the model takes (format, number of training identities
and samples, the recipe's parts) so nothing is guessed from tensor names. Folders written
before model.json existed still load: their counts are read off the tensors they hold and
their old-style config is read as the recipe it meant (trainer/common/config.py upgrade_legacy).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.trainer.common.config import Config
from tbps.trainer.common.config_files import load_config, save_config
from tbps.trainer.model.encoder import DualEncoder
from tbps.trainer.model.retrieval import RetrievalModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CLIP_CONFIG = "clip_config.json"
MODEL_INFO = "model.json"
FORMAT = 3
# tensors renamed since: "recipe.lhat" when recipes were composed from parts (format 1), the
# heads' "recipe." prefix when they moved into the model (format 3)
LEGACY_NAMES = {"recipe.lhat": "sample_weight"}


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
    return RetrievalModel(encoder, cfg, num_classes=num_classes, num_samples=num_samples,
                          vocab_size=tokenizer.vocab_size)


def model_info(cfg: Config, num_classes: int, num_samples: int) -> dict:
    """What rebuilding the model from a weights folder takes (written as model.json)."""
    rc = cfg.recipe
    return {"format": FORMAT, "num_classes": num_classes, "num_samples": num_samples,
            "image_size": list(cfg.model.image_size), "method": cfg.method,
            "branches": list(rc.branches), "terms": [t.kind for t in rc.losses],
            "parts": {"image_tokens": rc.image_tokens.kind, "caption_mask": rc.caption_mask.kind,
                      "enrich": rc.enrich.kind, "weighting": rc.weighting.kind}}


def save_weights(state_dict: dict, out_dir: Path, cfg: Config, tokenizer, clip_config,
                 extra: dict | None = None, *, num_classes: int | None = None,
                 num_samples: int | None = None) -> None:
    """Rank 0 only: a self-contained weights folder. The counts default to the sizes of the
    identity classifier and of the per-sample weights in the state dict (0 without them)."""
    if num_classes is None:
        w = state_dict.get("classifier.weight")
        num_classes = 0 if w is None else int(w.shape[0])
    if num_samples is None:
        w = state_dict.get("sample_weight")
        num_samples = 0 if w is None else int(w.shape[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (extra or {}).items()}
    save_file(tensors, str(out_dir / (WEIGHTS + ".partial")), metadata=meta)
    (out_dir / (WEIGHTS + ".partial")).replace(out_dir / WEIGHTS)
    save_config(cfg, out_dir / "config.yaml")
    clip_config.to_json_file(str(out_dir / CLIP_CONFIG))
    tokenizer.save(out_dir / "tokenizer")
    info = model_info(cfg, num_classes, num_samples)
    (out_dir / MODEL_INFO).write_text(json.dumps(info, indent=1) + "\n")


def load_weights_folder(folder: Path, overrides=()) -> tuple[Config, CaptionTokenizer,
                                                              RetrievalModel]:
    """Config, tokenizer and model (weights loaded, eval mode) from a weights folder."""
    folder = Path(folder)
    for name in (WEIGHTS, "config.yaml", CLIP_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a weights folder: {name} is missing "
                                    "(a run writes best/ and final/ with it)")
    cfg = load_config(folder / "config.yaml", list(overrides))
    tokenizer = CaptionTokenizer.from_pretrained(folder / "tokenizer",
                                                 context_length=cfg.model.context_length)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{folder / WEIGHTS} cannot be read ({exc}): the file is damaged or "
                         "incomplete; use another weights folder or re-export it") from None
    info_path = folder / MODEL_INFO
    if info_path.is_file():
        info = _read_json(info_path)
        if info.get("format", 0) > FORMAT:
            raise ValueError(f"{info_path} has format {info['format']}; this version reads up "
                             f"to {FORMAT}: update the code")
        num_classes, num_samples = info["num_classes"], info["num_samples"]
    state = {_current_name(k): v for k, v in state.items()}
    if not info_path.is_file():     # written before model.json: counts from the tensors
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
        num_samples = state["sample_weight"].shape[0] if "sample_weight" in state else 0
        log.info("%s has no %s (written by an older version): %d classes and %d samples read "
                 "off its tensors", folder, MODEL_INFO, num_classes, num_samples)
    clip_config = CLIPConfig.from_dict(_read_json(folder / CLIP_CONFIG))
    encoder = DualEncoder.from_clip_config(clip_config, cfg.model.image_size, tokenizer.eot_id)
    model = RetrievalModel(encoder, cfg, num_classes=num_classes, num_samples=num_samples,
                           vocab_size=tokenizer.vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not fit the model its config describes: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return cfg, tokenizer, model.eval()


def _current_name(key: str) -> str:
    key = LEGACY_NAMES.get(key, key)
    return key[len("recipe."):] if key.startswith("recipe.") else key


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is damaged ({exc}); use another weights folder or write it "
                         "again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); use another weights folder")
    return data
