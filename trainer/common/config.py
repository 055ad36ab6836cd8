"""Typed configuration: one dataclass per concern, each field's checks; the presets' folder.
Reading and writing YAML experiments and dotted overrides: trainer/common/config_files.py.

An experiment YAML mirrors the tree below (`method:`, `model:`, `data:`, `recipe:`, `loss:`,
`optim:`, `train:`, `eval:`, `ema:`). `recipe:` names the method's parts (RecipeConfig);
`method: irra|rde|...` is a preset of them (trainer/recipe/presets/), and what `recipe:` sets goes on
top. An override is `section.field=value` (or `--section.field value` on the command line; a
list element is `recipe.losses[0].weight=2`); the value is read as YAML and converted to the
field's type. An unknown field, a bad value or a combination of parts that cannot work raises
ValueError naming the fields.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tbps.trainer.common.recipe_config import (  # noqa: F401 (re-exported: one config)
    _check,
    LossConfig,
    BRANCHES,
    SIMILARITY_KINDS,
    TERM_KINDS,
    TERM_PARAMS,
    LossTerm,
    ImageTokensConfig,
    CaptionMaskConfig,
    CaptionAugmentConfig,
    TSEConfig,
    EnrichConfig,
    CrossConfig,
    WeightingConfig,
    RecipeConfig,
    _default_terms,
)

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    """Folder written by `tbps shard` (manifest.parquet inside)."""
    tokenizer: str = "auto"
    """"auto": the shards' own tokenizer folder for a random model, the model's own tokenizer
    for a pretrained one; else a tokenizer folder or hub id."""
    batch_size: int = 64
    """The global batch: training pairs per optimizer step over all ranks, whatever their
    number (64 on one process is 64 on 8 ranks: 8 each). A rank's micro-batch is batch_size /
    (ranks x optim.grad_accum), which must be whole and at least 2 (`micro_batch`); the losses
    are reduced so that W ranks give the gradient of one process on the same batch."""
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
class EMAConfig:
    """A ZeRO-sharded EMA (momentum) copy of chosen modules (trainer/running/ema.py)."""

    enabled: bool = True
    """Build the momentum model when a part needs one (recipe.image_tokens.kind=attention, an
    itc term with alpha > 0, recipe.enrich) or `modules` names some; False: never (a part that
    needs it is then an error)."""
    modules: tuple[str, ...] = ()
    """Module paths inside the model to keep an EMA of besides what the parts need, e.g.
    ["encoder"] or ["encoder.clip.vision_model", "encoder.clip.visual_projection"]."""
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
    group_rule: str = "project"
    """"project": every parameter of a new module at new_module_lr_mult; "irra": IRRA's
    authors' rule order (solver/build.py): the cross-modal encoder's biases at bias_lr_mult
    and its three outer LayerNorms' weights at 1x, the classifier and MLM head wholly at
    new_module_lr_mult."""
    weight_decay: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    warmup_epochs: float = 0.5
    warmup_start_factor: float = 0.1
    """LR factor at step 0, rising linearly to 1 over warmup_epochs; then cosine to min_lr_factor."""
    min_lr_factor: float = 0.0
    schedule: str = "step"
    """"step": the factor changes every optimizer step; "epoch": once an epoch, as the IRRA and
    RDE authors' scheduler (a warm-up staircase 0.1, 0.28, ... then a cosine staircase)."""
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
        _check(self.schedule in ("step", "epoch"), "optim.schedule", "step or epoch")
        _check(self.group_rule in ("project", "irra"), "optim.group_rule", "project or irra")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 6
    max_steps: int | None = None
    """Stop after this many optimizer steps (tests, smoke runs); None: run all epochs."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16 (mixed precision through accelerate / DeepSpeed). auto: bf16
    where the device computes it natively (a GPU with bf16, a CPU with AVX512_BF16 / AMX /
    Arm BF16), fp32 elsewhere; chosen once at start and logged (trainer/running/precision.py)."""
    seed: int = 0
    output_dir: str = "runs/irra-synth"
    resume: str | None = None
    """"latest" (the newest complete checkpoint), a checkpoint folder, "auto" (latest when the
    output folder holds a checkpoint, else start: for job scripts that requeue themselves), or
    None to start afresh (an existing run is refused)."""
    ckpt_every_steps: int = 0
    """Also checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    """Log every this many optimizer steps (a SIGTERM / SIGUSR1 stop request is agreed on
    every step, whatever this is)."""
    tensorboard: bool = True
    collective_timeout_s: float = 600.0
    """Seconds a collective (all-reduce, gather, barrier) may wait for the other ranks before
    the run stops with an error naming it: a rank that died or hangs ends the run instead of
    blocking it forever. Every rank must reach each collective within this, so it must exceed
    the longest step any single rank takes alone (a checkpoint write, the division, the export)."""
    max_nonfinite_steps: int = 5
    """A step whose loss is not finite on some rank is skipped (no update; logged); this many
    in a row stop the run with an error."""

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0")
        _check(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        _check(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    every_epochs: int = 1
    """Evaluate on the selection split every this many epochs (0: only at the end)."""
    select_split: str = "auto"
    """Split that picks the best checkpoint: "auto" = val when the shards have one, else no
    selection (the last epoch is reported). "test" is allowed but logged as test-set selection."""
    final_split: str = "test"
    itm_rerank: int = 0
    """Re-score each query's top K images by the ITM head (a recipe with an itm term; AGA uses
    128), reported as an extra similarity with its cost; 0: off."""

    def __post_init__(self):
        _check(self.select_split in ("auto", "val", "test", "none"), "eval.select_split",
               "auto, val, test or none")
        _check(self.itm_rerank >= 0, "eval.itm_rerank", "must be >= 0")


@dataclass(kw_only=True)
class Config:
    method: str | None = "irra"
    """Preset the recipe starts from (trainer/recipe/presets/<method>.yaml: irra, rde, ...); what
    `recipe:` sets overrides it. None: the recipe's own defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        _check(self.method is None or self.method in presets(), "method",
               f"one of {presets()} or null")
        needs = self.recipe.momentum_parts()
        _check(self.ema.enabled or not needs, "ema.enabled",
               f"{', '.join(needs)} need(s) the momentum model, which ema.enabled=false switches "
               "off")

    def needs_momentum(self) -> bool:
        return self.ema.enabled and bool(self.recipe.momentum_parts() or self.ema.modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- presets --------------------------------------------------------------------------------------

PRESET_DIR = Path(__file__).parents[1] / "recipe" / "presets"


def presets() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
