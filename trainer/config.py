"""Typed configuration: one dataclass per concern, a YAML recipe per method, dotted overrides.

    cfg = load_config("launch/configs/irra_synth.yaml", ["optim.lr=3e-4", "train.epochs=2"])

A recipe YAML mirrors the tree below (`model:`, `data:`, `loss:`, `optim:`, `train:`,
`eval:`). An override is `section.field=value` (or `--section.field value` on the command line);
the value is read as YAML and converted to the field's type. An unknown field or a bad value
raises ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("irra", "rde")
PRECISIONS = ("fp32", "bf16", "fp16")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config field '{name}': {msg}")


@dataclass(kw_only=True)
class ModelConfig:
    pretrained: str | None = None
    """Hugging Face hub id or local folder of a CLIP model; None: random initialisation from
    the sizes below (the small CPU default)."""
    image_size: tuple[int, int] = (96, 32)
    """(height, width) of input images; the patch grid is image_size / patch_size."""
    patch_size: int = 8
    """ViT patch size (random init only; a pretrained model brings its own)."""
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128
    """Joint embedding size (CLIP's projection_dim)."""
    context_length: int = 77
    """Caption length in tokens, start and end tokens included."""
    cross_layers: int = 1
    """Transformer layers of the cross-modal encoder (IRRA uses 4)."""
    cross_heads: int = 4
    """Heads of the cross-modal encoder (IRRA: 8 at width 512)."""

    def __post_init__(self):
        h, w = self.image_size
        _check(h % self.patch_size == 0 and w % self.patch_size == 0, "model.image_size",
               f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_width", "text_width", "embed_dim"):
            heads = self.vision_heads if name == "vision_width" else self.text_heads
            _check(getattr(self, name) > 0 and (name == "embed_dim" or
                                                getattr(self, name) % heads == 0),
                   f"model.{name}", "must be positive and a multiple of the head count")
        _check(self.embed_dim % self.cross_heads == 0, "model.cross_heads",
               "embed_dim must be a multiple of cross_heads")
        _check(self.context_length >= 8, "model.context_length", "must be at least 8")


@dataclass(kw_only=True)
class DataConfig:
    shards: str = "data/synth-shards"
    """Folder written by `python -m data_pipeline shard` (manifest.parquet inside)."""
    tokenizer: str = "auto"
    """"auto": the shards' own tokenizer folder for a random model, the model's own tokenizer
    for a pretrained one; else a tokenizer folder or hub id."""
    batch_size: int = 64
    """Samples per rank per step (the global batch is batch_size x ranks x grad_accum)."""
    eval_batch_size: int = 256
    num_workers: int = 1
    """Loader worker processes per rank."""
    shuffle_buffer: int = 500
    augment: bool = True
    """Training augmentations (IRRA's): flip, pad-and-crop, random erasing."""
    crop_pad: int = 10
    """Zero padding before the random crop back to the image size (0: no crop)."""
    erase_prob: float = 0.5
    """Probability of random erasing (2-40 % of the image)."""

    def __post_init__(self):
        _check(self.batch_size >= 2, "data.batch_size", "must be at least 2")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", "must be positive")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.crop_pad >= 0, "data.crop_pad", "must be >= 0")
        _check(0 <= self.erase_prob <= 1, "data.erase_prob", "must be in [0, 1]")


@dataclass(kw_only=True)
class LossConfig:
    sdm: float = 1.0
    """Weight of similarity distribution matching (0 disables)."""
    id: float = 1.0
    """Weight of the identity classification loss."""
    mlm: float = 1.0
    """Weight of the masked-language-modelling (IRR) loss."""
    tau: float = 0.02
    """Temperature of the similarity softmax after annealing."""
    tau_start: float | None = 0.1
    """Temperature at step 0, annealed linearly to tau; None: fixed tau from the start."""
    tau_anneal_epochs: float = 1.0
    """Epochs over which tau_start goes to tau."""
    mlm_prob: float = 0.15
    """Fraction of word tokens masked for MLM (80 % mask, 10 % random, 10 % kept)."""
    margin: float = 0.1
    """TAL's margin m (RDE)."""

    def __post_init__(self):
        _check(self.tau > 0, "loss.tau", "must be positive")
        _check(self.tau_start is None or self.tau_start > 0, "loss.tau_start", "must be > 0")
        _check(0 < self.mlm_prob < 1, "loss.mlm_prob", "must be in (0, 1)")
        for name in ("sdm", "id", "mlm"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "weights must be >= 0")


@dataclass(kw_only=True)
class RDEConfig:
    """RDE (CVPR'24): token selection embedding, TAL, consensus division (METHODS.md)."""

    select_ratio: float = 0.3
    """Share of patches / caption tokens the TSE branch keeps (top by CLS / EOS attention)."""
    tse_dim: int = 1024
    """Output size of the TSE embedding."""
    ccd: bool = True
    """Consensus division of clean and noisy pairs each epoch; False: TAL on every pair (the
    control that separates TAL's gain from the division's)."""
    ccd_warmup_epochs: int = 0
    """Epochs trained on every pair before the first division (the authors: 0)."""
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    """GaussianMixture settings; the authors use 100 / 1e-4 / 1e-6 above 40 % noise (and on
    RSTPReid), a choice that knows the noise rate."""
    clean_threshold: float = 0.5
    """A pair is clean for a branch when its clean posterior exceeds this."""
    authors_bn_eval: bool = False
    """True: keep the TSE BatchNorms in eval mode while training, as the authors' released code
    did by accident (their README recommends it for noisy data); False: train mode."""
    ccd_plots: bool = True
    """Write <output_dir>/ccd/epoch-NN.png (loss histograms by true label, fitted mixture) when
    the shards carry ground-truth noise flags."""

    def __post_init__(self):
        _check(0 < self.select_ratio <= 1, "rde.select_ratio", "must be in (0, 1]")
        _check(self.tse_dim > 0, "rde.tse_dim", "must be positive")
        _check(self.ccd_warmup_epochs >= 0, "rde.ccd_warmup_epochs", "must be >= 0")
        _check(0 < self.clean_threshold < 1, "rde.clean_threshold", "must be in (0, 1)")


@dataclass(kw_only=True)
class EMAConfig:
    """A ZeRO-sharded EMA (momentum) copy of chosen modules (trainer/ema.py)."""

    modules: tuple[str, ...] = ()
    """Module paths inside the model to keep an EMA of, e.g. ["encoder"] or
    ["encoder.clip.vision_model", "encoder.clip.visual_projection"]; empty: no EMA."""
    momentum: float = 0.995
    momentum_end: float = 1.0
    """Momentum rises from `momentum` to this on a cosine over training (equal: constant)."""
    refresh_every: int = 1
    """Steps between refreshes of the EMA's compute copy (DDP / ZeRO-1/2: an all-gather)."""

    def __post_init__(self):
        _check(0 <= self.momentum < 1, "ema.momentum", "must be in [0, 1)")
        _check(self.momentum <= self.momentum_end <= 1, "ema.momentum_end",
               "must be in [momentum, 1]")
        _check(self.refresh_every >= 1, "ema.refresh_every", "must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: str = "adam"
    """"adam" (L2 weight decay, as the authors) or "adamw"."""
    lr: float = 3e-4
    """Learning rate of the encoders."""
    new_module_lr_mult: float = 5.0
    """LR multiplier of modules created for the method (classifier, cross-modal encoder)."""
    bias_lr_mult: float = 2.0
    """LR multiplier of biases (they get no weight decay)."""
    weight_decay: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    warmup_epochs: float = 0.5
    warmup_start_factor: float = 0.1
    """LR factor at step 0, rising linearly to 1 over warmup_epochs; then cosine to min_lr_factor."""
    min_lr_factor: float = 0.0
    grad_clip: float | None = 1.0
    """Max gradient norm; None: no clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    def __post_init__(self):
        _check(self.optimizer in ("adam", "adamw"), "optim.optimizer", "adam or adamw")
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        _check(0 < self.warmup_start_factor <= 1, "optim.warmup_start_factor", "in (0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0")
        _check(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 6
    max_steps: int | None = None
    """Stop after this many optimizer steps (tests, smoke runs); None: run all epochs."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (mixed precision through accelerate / DeepSpeed)."""
    seed: int = 0
    output_dir: str = "runs/irra-synth"
    resume: str | None = None
    """"latest", a checkpoint folder, or None to start afresh (an existing run is refused)."""
    ckpt_every_steps: int = 0
    """Also checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    """Log (and check for a SIGTERM / SIGUSR1 stop request) every this many optimizer steps."""
    tensorboard: bool = True

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    every_epochs: int = 1
    """Evaluate on the selection split every this many epochs (0: only at the end)."""
    select_split: str = "auto"
    """Split that picks the best checkpoint: "auto" = val when the shards have one, else no
    selection (the last epoch is reported). "test" is allowed but logged as test-set selection."""
    final_split: str = "test"

    def __post_init__(self):
        _check(self.select_split in ("auto", "val", "test", "none"), "eval.select_split",
               "auto, val, test or none")


@dataclass(kw_only=True)
class Config:
    method: str = "irra"
    """Training recipe: irra (SDM + ID + MLM) or rde (BGE + TSE, TAL, consensus division)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rde: RDEConfig = field(default_factory=RDEConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        _check(self.method in METHODS, "method", f"one of {METHODS}")
        if self.method == "rde":
            _check(self.loss.id == 0 and self.loss.mlm == 0 and self.loss.sdm == 0, "loss",
                   "RDE trains with TAL alone: set loss.sdm, loss.id and loss.mlm to 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- loading --------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        _set_dotted(tree, key.strip().lstrip("-"), yaml.safe_load(value))
    return from_dict(Config, tree)


def parse_overrides(args: list[str]) -> list[str]:
    """['--optim.lr', '1e-4', 'train.epochs=3', '--x.y=1'] -> ['optim.lr=1e-4', ...]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if "=" in a:
            out.append(a.lstrip("-"))
            i += 1
        elif a.startswith("--") and i + 1 < len(args):
            out.append(f"{a[2:]}={args[i + 1]}")
            i += 2
        else:
            raise ValueError(f"cannot read argument {a!r}: use --section.field value")
    return out


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"invalid config field '{prefix.rstrip('.') or cls.__name__}': "
                         f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config field '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value, name: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"invalid config field '{name}': expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, name) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"invalid config field '{name}': expected {len(args)} values, "
                             f"got {value!r}")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value))
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        if tp is str and not isinstance(value, str):
            raise TypeError
        if tp in (int, float) and isinstance(value, bool):
            raise TypeError
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid config field '{name}': expected {tp.__name__}, "
                         f"got {value!r}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
