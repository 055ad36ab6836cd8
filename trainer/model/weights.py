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
from tbps.trainer.common import dist
from tbps.trainer.common.config import Config
from tbps.trainer.common.config_files import load_config, save_config
from tbps.trainer.model.encoder import DualEncoder
from tbps.trainer.model.retrieval import RetrievalModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CLIP_CONFIG = "clip_config.json"
MODEL_INFO = "model.json"
FORMAT = 3
CHECKPOINT_STATE = "trainer_state.json"       # what marks a training checkpoint (running/)
# tensors renamed since: "recipe.lhat" when recipes were composed from parts (format 1), the
# heads' "recipe." prefix when they moved into the model (format 3)
LEGACY_NAMES = {"recipe.lhat": "sample_weight"}


def load_tokenizer(cfg: Config) -> CaptionTokenizer:
    name = cfg.data.tokenizer
    length = cfg.model.context_length
    if name != "auto":
        return CaptionTokenizer.from_pretrained(name, context_length=length)
    if cfg.model.pretrained:
        source = Path(_existing(cfg.model.pretrained))
        if is_weights_folder(source):                 # this project's best/, final/, step-N/
            if is_checkpoint(source):
                _described(source)
            source = source / "tokenizer"
        return CaptionTokenizer.from_pretrained(source, context_length=length)
    folder = read_meta(cfg.data.shards).get("tokenizer")
    if folder is None:
        raise ValueError(f"data.tokenizer is 'auto' but the shards in {cfg.data.shards} carry no "
                         "tokenizer (sharded with --tokenizer none); set data.tokenizer")
    return CaptionTokenizer.from_pretrained(Path(cfg.data.shards) / folder, context_length=length)


def _existing(name: str) -> str:
    """model.pretrained as given; a path that is no hub id (absolute, ./ or ../, ~, or more than
    owner/name) must exist."""
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or len(path.parts) > 2
    if looks_local and not path.exists():
        raise ValueError(f"model.pretrained={name}: no such folder (a weights folder, a "
                         "checkpoint, a transformers folder or a hub id such as "
                         "openai/clip-vit-base-patch16)")
    return str(path) if looks_local else name


def is_weights_folder(path) -> bool:
    """Whether `path` is a weights folder this project wrote (best/, final/) or a training
    checkpoint (checkpoints/step-N/, which describes its model the same way)."""
    path = Path(path)
    if is_checkpoint(path):
        return True
    return all((path / n).is_file() for n in (WEIGHTS, CLIP_CONFIG, "config.yaml"))


def is_checkpoint(path) -> bool:
    return (Path(path) / CHECKPOINT_STATE).is_file()


def build_model(cfg: Config, tokenizer: CaptionTokenizer, num_classes: int,
                num_samples: int) -> RetrievalModel:
    """The model a run trains: from model.pretrained (a hub id, a transformers folder or one of
    this project's weights folders) or random at the configured size; the recipe's heads."""
    if cfg.model.pretrained and is_weights_folder(cfg.model.pretrained):
        return _from_weights_folder(Path(cfg.model.pretrained), cfg, tokenizer, num_classes,
                                    num_samples)
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
    save_description(out_dir, cfg, tokenizer, clip_config, num_classes, num_samples)


def save_description(out_dir: Path, cfg: Config, tokenizer, clip_config, num_classes: int,
                     num_samples: int) -> None:
    """What rebuilding the model takes, beside its weights: the config, the CLIP config, the
    tokenizer and model.json (a weights folder; a training checkpoint holds it too)."""
    out_dir = Path(out_dir)
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
        num_classes = _count(info, "num_classes", info_path, 10**7)
        num_samples = _count(info, "num_samples", info_path, 10**10)
    state = {_current_name(k): v for k, v in state.items()}
    if not info_path.is_file():     # written before model.json: counts from the tensors
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
        num_samples = state["sample_weight"].shape[0] if "sample_weight" in state else 0
        log.info("%s has no %s (written by an older version): %d classes and %d samples read "
                 "off its tensors", folder, MODEL_INFO, num_classes, num_samples)
    encoder = DualEncoder.from_clip_config(_clip_config(folder), cfg.model.image_size,
                                           tokenizer.eot_id)
    model = RetrievalModel(encoder, cfg, num_classes=num_classes, num_samples=num_samples,
                           vocab_size=tokenizer.vocab_size)
    _load_state(model, state, folder / WEIGHTS)
    return cfg, tokenizer, model.eval()


def _from_weights_folder(folder: Path, cfg: Config, tokenizer, num_classes: int,
                         num_samples: int) -> RetrievalModel:
    """A run's start from one of this project's weights folders: its encoder exactly, and the
    heads of this recipe that it holds with the same shapes (the others start fresh: the
    recipe's new modules; so do the pair weights)."""
    info = _read_json(folder / MODEL_INFO) if (folder / MODEL_INFO).is_file() else {}
    size = info.get("image_size")
    if size is not None and tuple(size) != tuple(cfg.model.image_size):
        raise ValueError(f"model.pretrained={folder} was trained at {tuple(size)}; set "
                         f"model.image_size={list(size)} to start from it")
    encoder = DualEncoder.from_clip_config(_clip_config(folder), cfg.model.image_size,
                                           tokenizer.eot_id)
    model = RetrievalModel(encoder, cfg, num_classes=num_classes, num_samples=num_samples,
                           vocab_size=tokenizer.vocab_size)
    state = {_current_name(k): v for k, v in _start_tensors(folder).items()}
    own = model.state_dict()
    fresh = {k for k in set(own) | set(state) if not k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if k.startswith("encoder.") or
             (k in own and own[k].shape == v.shape and k != "sample_weight")}
    _load_state(model, state, folder / WEIGHTS, allowed=fresh)
    kept = sorted({k.split(".")[0] for k in state if not k.startswith("encoder.")})
    log.info("started from %s: its encoder%s", folder,
             f" and heads {', '.join(kept)}" if kept else "")
    return model


def _start_tensors(folder: Path) -> dict:
    """The tensors of a weights folder, or a checkpoint's model put together from its ranks'
    files (DeepSpeed's partitions read with the restricted loader)."""
    if not is_checkpoint(folder):
        try:
            return load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{folder / WEIGHTS} cannot be read ({exc})") from None
    _described(folder)
    try:
        return dist.checkpoint_model_state(folder)
    except Exception as exc:                        # noqa: BLE001 (any damage, named)
        raise ValueError(f"model.pretrained={folder}: the checkpoint's model cannot be read "
                         f"({type(exc).__name__}: {str(exc)[:300]}); use an older checkpoint "
                         "or the run's best/ or final/") from None


def _described(folder: Path) -> None:
    missing = [n for n in (CLIP_CONFIG, "config.yaml", "tokenizer") if not (folder / n).exists()]
    if missing:
        raise ValueError(f"model.pretrained={folder} is a checkpoint written before checkpoints "
                         f"described their model ({', '.join(missing)} missing): start from "
                         "the run's best/ or final/ instead")


def _load_state(model, state: dict, source: Path, allowed: set[str] = frozenset()) -> None:
    """Load `state` into `model`: a tensor missing, unexpected (outside `allowed`) or of
    another shape is an error naming the tensors (exit 2)."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source} does not fit the model its config describes: tensors of "
                         f"another shape: {'; '.join(wrong[:5])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in unexpected if k not in allowed]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model its config describes: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")


# limits a weights folder's config is checked against before anything is built
CLIP_LIMITS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256,
               "num_attention_heads": 512, "patch_size": 1024, "image_size": 16384,
               "vocab_size": 10**7, "max_position_embeddings": 65536}


def _clip_config(folder: Path) -> CLIPConfig:
    """clip_config.json, its sizes checked (whole, positive, within CLIP_LIMITS) before a model
    of them is built."""
    path = folder / CLIP_CONFIG
    data = _read_json(path)
    for part in ("vision_config", "text_config"):
        sub = data.get(part, {})
        if not isinstance(sub, dict):
            raise ValueError(f"{path}: {part} is not an object; use another weights folder")
        for key, top in CLIP_LIMITS.items():
            if key in sub and not (isinstance(sub[key], int) and not isinstance(sub[key], bool)
                                   and 0 < sub[key] <= top):
                raise ValueError(f"{path}: {part}.{key} is {sub[key]!r}, not a whole number in "
                                 f"1..{top}; the folder is damaged or not this project's")
    try:
        return CLIPConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} does not describe a CLIP ({exc})") from None


def _count(info: dict, key: str, path: Path, top: int) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise ValueError(f"{path}: {key} is {value!r}, not a whole number in 0..{top:,}; the "
                         "folder is damaged or not this project's")
    return value


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
