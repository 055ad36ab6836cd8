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

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
class LossConfig:
    """The temperature schedule every similarity term shares (a term may fix its own tau)."""

    tau: float = 0.02
    """Temperature of the similarity softmax after annealing."""
    tau_start: float | None = 0.1
    """Temperature at step 0, annealed linearly to tau; None: fixed tau from the start."""
    tau_anneal_epochs: float = 1.0
    """Epochs over which tau_start goes to tau."""

    def __post_init__(self):
        _check(self.tau > 0, "loss.tau", "must be positive")
        _check(self.tau_start is None or self.tau_start > 0, "loss.tau_start", "must be > 0")
        _check(self.tau_anneal_epochs >= 0, "loss.tau_anneal_epochs", "must be >= 0")


# -- the recipe's parts ---------------------------------------------------------------------------

BRANCHES = ("bge", "tse")
SIMILARITY_KINDS = ("sdm", "bsdm", "tal", "waf", "itc")
TERM_KINDS = SIMILARITY_KINDS + ("itm", "id", "mlm")
# the parameters each kind reads, with their defaults (METHODS.md)
TERM_PARAMS = {"sdm": {"tau": None, "eps": 1e-8}, "bsdm": {"tau": None, "eps": 1e-8, "lam": 1.0},
               "tal": {"tau": None, "margin": 0.1}, "waf": {"tau": None, "gamma": 2.0},
               "itc": {"tau": None, "alpha": 0.4}, "itm": {}, "id": {}, "mlm": {}}


@dataclass(kw_only=True)
class LossTerm:
    """One term of the training loss: `weight x reduction over samples of the per-sample loss`.

    kinds (METHODS.md): sdm (IRRA), bsdm and waf (AMNS), tal (RDE), itc with momentum
    distillation, itm (AGA; both need the parts named there), id (IRRA's identity classifier on
    the global embeddings), mlm (masked language modelling through the cross-modal encoder).
    """

    kind: str
    weight: float = 1.0
    branches: tuple[str, ...] | None = None
    """Embedding branches a similarity term (sdm, bsdm, tal, waf, itc) applies to, summed per
    sample; default [bge]. id works on bge only; itm and mlm take none."""
    reduction: str = "mean"
    """"mean" or "sum" of the per-sample loss over this rank's samples (RDE's TAL: sum). mlm is
    always a mean over the masked tokens."""
    weighted: bool = True
    """Multiply each sample's loss by its weight from recipe.weighting (when that is on)."""
    tau: float | None = None
    """Fixed temperature for this term; None: the loss.tau schedule (similarity kinds)."""
    eps: float | None = None
    """sdm, bsdm: inside log(q + eps); default 1e-8."""
    lam: float | None = None
    """bsdm: weight of KL(q || p); default 1."""
    margin: float | None = None
    """tal: the margin m; default 0.1."""
    gamma: float | None = None
    """waf: the focal exponent; default 2."""
    alpha: float | None = None
    """itc: weight of the momentum model's similarity in the targets; default 0.4 (0: identity
    targets only, no momentum model needed)."""

    def param(self, name: str):
        """The parameter's value: as set, else the kind's default (None if the kind has none)."""
        value = getattr(self, name)
        return TERM_PARAMS[self.kind].get(name) if value is None else value

    def check(self, where: str, recipe_branches: tuple[str, ...]) -> None:
        _check(self.kind in TERM_KINDS, f"{where}.kind", f"one of {TERM_KINDS}, got {self.kind!r}")
        _check(self.weight >= 0, f"{where}.weight", "must be >= 0")
        _check(self.reduction in ("mean", "sum"), f"{where}.reduction", "mean or sum")
        _check(not (self.kind == "mlm" and self.reduction == "sum"), f"{where}.reduction",
               "mlm is a mean over the masked tokens")
        for name in ("tau", "eps", "lam", "margin", "gamma", "alpha"):
            _check(getattr(self, name) is None or name in TERM_PARAMS[self.kind], f"{where}.{name}",
                   f"{self.kind} has no parameter {name} (it reads "
                   f"{sorted(TERM_PARAMS[self.kind]) or 'none'})")
        _check(self.tau is None or self.tau > 0, f"{where}.tau", "must be positive")
        _check(self.alpha is None or 0 <= self.alpha <= 1, f"{where}.alpha", "must be in [0, 1]")
        _check(self.gamma is None or self.gamma >= 0, f"{where}.gamma", "must be >= 0")
        _check(self.eps is None or self.eps > 0, f"{where}.eps", "must be > 0")
        if self.kind in ("itm", "mlm"):
            _check(self.branches is None, f"{where}.branches",
                   f"{self.kind} works on the cross-modal encoder, not on embedding branches")
            return
        for b in self.branches_or_default():
            _check(b in BRANCHES, f"{where}.branches", f"{b!r} is not a branch; one of {BRANCHES}")
            _check(b in recipe_branches, f"{where}.branches",
                   f"branch {b!r} is off (recipe.branches={list(recipe_branches)}): add it "
                   "there or take it out of the term")
        if self.kind == "id":
            _check(self.branches_or_default() == ("bge",), f"{where}.branches",
                   "the identity classifier works on the global embeddings: [bge]")

    def branches_or_default(self) -> tuple[str, ...]:
        return ("bge",) if self.branches is None else tuple(self.branches)

    def needs_momentum(self) -> bool:
        return self.kind == "itc" and self.param("alpha") > 0


def _default_terms() -> tuple[LossTerm, ...]:
    return (LossTerm(kind="sdm"), LossTerm(kind="id"), LossTerm(kind="mlm"))


@dataclass(kw_only=True)
class ImageTokensConfig:
    """Which patches the online image encoder sees in training (evaluation sees all)."""

    kind: str = "all"
    """"all"; "random": drop `ratio` of the patches uniformly (token-dropping augmentation);
    "attention": AMNS's AWM, drop them with probability proportional to 1 - their normalised
    score from the momentum image encoder (needs the momentum model)."""
    ratio: float = 0.3
    """Share of the patches dropped (floor(ratio x patches))."""
    score: str = "text"
    """AWM's patch score: "text" = cosine of the momentum model's projected patch token with the
    paired caption's embedding; "cls" = the momentum model's last-layer CLS attention row."""

    def __post_init__(self):
        _check(self.kind in ("all", "random", "attention"), "recipe.image_tokens.kind",
               "all, random or attention")
        _check(0 < self.ratio < 1, "recipe.image_tokens.ratio", "must be in (0, 1)")
        _check(self.score in ("text", "cls"), "recipe.image_tokens.score", "text or cls")


@dataclass(kw_only=True)
class CaptionMaskConfig:
    """Which caption words the mlm term (and text enrichment) hide."""

    kind: str = "random"
    """"random": IRRA's, each word with probability `ratio` (at least one); "uniform": k =
    ceil(ratio x words) drawn uniformly without replacement (AGM's ablation); "attention": AGA's
    AGM, k words drawn without replacement with probability proportional to the layer-aggregated
    EOS attention."""
    ratio: float = 0.15
    beta: float = 0.5
    """AGM's layer aggregation: a_bar^l = beta a_bar^(l-1) + (1 - beta) a^l."""

    def __post_init__(self):
        _check(self.kind in ("random", "uniform", "attention"), "recipe.caption_mask.kind",
               "random, uniform or attention")
        _check(0 < self.ratio < 1, "recipe.caption_mask.ratio", "must be in (0, 1)")
        _check(0 <= self.beta < 1, "recipe.caption_mask.beta", "must be in [0, 1)")


@dataclass(kw_only=True)
class CaptionAugmentConfig:
    """RDE's caption augmentation (their --txt_aug; trainer/recipe/caption_augment.py): each
    word token of a training caption is chosen with probability `prob`; a chosen one becomes
    the mask token, a random word token, or is deleted (the words after it and the end token
    move left, padding fills the end). Start token, end token, padding: never touched."""

    kind: str = "none"
    """"none"; "rde": the authors' rule (datasets/bases.py, txt_data_aug), drawn per caption and
    epoch (the same on any number of ranks)."""
    prob: float = 0.2
    """Probability that a word token is chosen (the authors: 0.2)."""
    mask: float = 0.6
    """Share of the chosen tokens replaced by the mask token (the authors: 0.6)."""
    random: float = 0.2
    """Share replaced by a word token drawn uniformly (any non-special id; the authors: 0.2).
    The rest, 1 - mask - random, is deleted (the authors: 0.2)."""
    division: bool = True
    """Also augment the captions the consensus division scores, with draws of their own (the
    authors' division pass reads the augmenting training dataset)."""

    def __post_init__(self):
        _check(self.kind in ("none", "rde"), "recipe.caption_augment.kind", "none or rde")
        _check(0 < self.prob <= 1, "recipe.caption_augment.prob", "must be in (0, 1]")
        _check(0 <= self.mask <= 1, "recipe.caption_augment.mask", "must be in [0, 1]")
        _check(0 <= self.random <= 1 - self.mask + 1e-9, "recipe.caption_augment.random",
               f"must be in [0, 1 - mask = {1 - self.mask:g}] (the rest is deleted)")


@dataclass(kw_only=True)
class TSEConfig:
    """RDE's token selection embedding branch (used when recipe.branches holds tse)."""

    ratio: float = 0.3
    """Share of patches / caption tokens kept (top by the last layer's CLS / EOS attention)."""
    dim: int = 1024
    """Output size of the TSE embedding."""
    authors_bn_eval: bool = False
    """True: keep the TSE BatchNorms in eval mode while training, as the authors' released code
    did by accident (their README recommends it for noisy data); False: train mode."""
    filler_in_bn_stats: bool = False
    """True, as the authors: the padding tokens filling a short caption's slots count in the
    train-mode BatchNorm statistics (not the pooling); False: they take part in nothing."""

    def __post_init__(self):
        _check(0 < self.ratio <= 1, "recipe.tse.ratio", "must be in (0, 1]")
        _check(self.dim > 0, "recipe.tse.dim", "must be positive")


@dataclass(kw_only=True)
class EnrichConfig:
    """AGA's TEM: captions rewritten at the masked words by the momentum model's MLM."""

    kind: str = "none"
    """"none"; "argmax" or "sample": the momentum MLM's prediction at each masked word."""
    prob: float = 0.5
    """Probability that a caption is replaced by its enriched version for the other terms."""

    def __post_init__(self):
        _check(self.kind in ("none", "argmax", "sample"), "recipe.enrich.kind",
               "none, argmax or sample")
        _check(0 <= self.prob <= 1, "recipe.enrich.prob", "must be in [0, 1]")


@dataclass(kw_only=True)
class CrossConfig:
    """The cross-modal encoder (MLM, ITM and TEM read it; sized by model.cross_layers/heads)."""

    residual: bool = False
    """False: IRRA's, the words' cross-attention over the image tokens replaces the words (no
    residual), so the text reaches the transformer only through where each word looks. True:
    the words plus that cross-attention (a fusion encoder as ALBEF's), which AGA's ITM needs:
    without it the ITM loss of aga_synth stayed at the label prior (0.636 = the entropy of one
    positive in three) for every step of a 5-epoch run."""

    attention_init: str = "clip"
    """How the cross-attention (the words' queries over the image tokens) starts. "clip": random,
    as every other layer. "identity": its query, key, value and output maps start as the
    identity (zero biases), so from the first step each word gathers the image tokens nearest
    to it in the joint space the contrastive loss aligns, and the blocks above compare the two.
    A fusion encoder trained from scratch learns ITM slowly (launch/itm_probe.py measures it on
    a run's frozen tokens)."""

    padding_mask: bool = True
    """False: padding tokens are keys of the encoder's self-attention, as in IRRA's authors'
    code (model/build.py passes no mask)."""


@dataclass(kw_only=True)
class WeightingConfig:
    """Per-sample weights of the training pairs (RDE's consensus division,
    trainer/recipe/consensus_division.py)."""

    kind: str = "none"
    """"none" or "consensus": each epoch after warmup_epochs, every training pair is scored and
    divided into clean and noisy by a Gaussian mixture per branch and their consensus."""
    use: str = "labels"
    """"labels": weight 1 / 0 (RDE; a disagreement is a coin flip); "probability": the mean
    over branches of the clean posterior (for AMNS's WAF)."""
    warmup_epochs: int = 0
    """Epochs trained on every pair before the first division (the authors: 0)."""
    score: str = "tal"
    """The per-sample loss the division scores, over in-batch keys of all ranks (RDE: tal)."""
    margin: float = 0.1
    """Margin of the scoring loss when it is tal."""
    gmm: str = "auto"
    """The GaussianMixture settings (max_iter / tol / reg_covar): "low" 10 / 1e-2 / 5e-4,
    "high" 100 / 1e-4 / 1e-6, "auto" as RDE's authors choose (processor/processor.py): high when
    the shards' noise rate is above 0.4 or the dataset is RSTPReid, low otherwise. The rate is
    the one the shards record (options.noise_rate); a run on data of unknown noise says which
    it used in its log."""
    gmm_max_iter: int | None = None
    gmm_tol: float | None = None
    gmm_reg_covar: float | None = None
    """Each, when set, overrides the value `gmm` gives."""
    threshold: float = 0.5
    """A pair is clean for a branch when its clean posterior exceeds this."""
    plots: bool = True
    """Write <output_dir>/ccd/epoch-NN.png (loss histograms by true label, fitted mixture) when
    the shards carry ground-truth noise flags."""

    def __post_init__(self):
        _check(self.kind in ("none", "consensus"), "recipe.weighting.kind", "none or consensus")
        _check(self.use in ("labels", "probability"), "recipe.weighting.use",
               "labels or probability")
        _check(self.warmup_epochs >= 0, "recipe.weighting.warmup_epochs", "must be >= 0")
        _check(self.score in SIMILARITY_KINDS, "recipe.weighting.score",
               f"one of {SIMILARITY_KINDS}")
        _check(0 < self.threshold < 1, "recipe.weighting.threshold", "must be in (0, 1)")
        _check(self.gmm in ("auto", "low", "high"), "recipe.weighting.gmm",
               "auto, low or high")
        _check(self.gmm_max_iter is None or self.gmm_max_iter >= 1,
               "recipe.weighting.gmm_max_iter", "must be >= 1")
        _check(self.gmm_tol is None or self.gmm_tol > 0, "recipe.weighting.gmm_tol",
               "must be > 0")
        _check(self.gmm_reg_covar is None or self.gmm_reg_covar >= 0,
               "recipe.weighting.gmm_reg_covar", "must be >= 0")


@dataclass(kw_only=True)
class RecipeConfig:
    """The training recipe as named parts (trainer/recipe/step.py runs them in one fixed order).

    Presets: `method: irra | rde | amns | aga` fills these from trainer/recipe/presets/<method>.yaml;
    what a config sets under `recipe:` overrides the preset (lists replace)."""

    branches: tuple[str, ...] = ("bge",)
    """Embedding branches: bge (global: image CLS, text EOS) and tse (RDE's token selection).
    Evaluation scores every branch and, with two, their mean (which picks checkpoints)."""
    losses: tuple[LossTerm, ...] = field(default_factory=_default_terms)
    """The loss terms, summed with their weights in this order."""
    image_tokens: ImageTokensConfig = field(default_factory=ImageTokensConfig)
    caption_mask: CaptionMaskConfig = field(default_factory=CaptionMaskConfig)
    caption_augment: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    tse: TSEConfig = field(default_factory=TSEConfig)
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)

    def __post_init__(self):
        _check(len(self.branches) > 0 and len(set(self.branches)) == len(self.branches),
               "recipe.branches", "a non-empty list without repeats")
        for b in self.branches:
            _check(b in BRANCHES, "recipe.branches", f"{b!r} is not one of {BRANCHES}")
        _check(self.branches[0] == "bge", "recipe.branches", "must start with bge")
        _check(len(self.losses) > 0, "recipe.losses", "needs at least one term")
        for i, term in enumerate(self.losses):
            term.check(f"recipe.losses[{i}]", self.branches)
        kinds = self.kinds()
        if self.enrich.kind != "none":
            _check("mlm" in kinds, "recipe.enrich.kind",
                   "text enrichment predicts words with the MLM head: add an mlm term to "
                   "recipe.losses")
        if self.caption_mask.kind != "random":
            _check("mlm" in kinds or self.enrich.kind != "none", "recipe.caption_mask.kind",
                   f"{self.caption_mask.kind} masking has no use without an mlm term in "
                   "recipe.losses or recipe.enrich")
        _check(self.cross.attention_init in ("clip", "identity"), "recipe.cross.attention_init",
               f"{self.cross.attention_init!r}: use clip or identity")
        for name, on in (("residual", self.cross.residual),
                         ("attention_init", self.cross.attention_init != "clip")):
            if on:
                _check(bool(kinds & {"mlm", "itm"}), f"recipe.cross.{name}",
                       "there is no cross-modal encoder without an mlm or itm term in "
                       "recipe.losses")
        if self.weighting.kind != "none":
            _check(any(t.weighted for t in self.losses), "recipe.weighting.kind",
                   "no term in recipe.losses is weighted (weighted: true)")

    def kinds(self) -> set[str]:
        return {t.kind for t in self.losses}

    def momentum_parts(self) -> list[str]:
        """The config fields of the parts that need the momentum model."""
        parts = [f"recipe.losses[{i}] (itc, alpha {t.param('alpha')})"
                 for i, t in enumerate(self.losses) if t.needs_momentum()]
        if self.image_tokens.kind == "attention":
            parts.append("recipe.image_tokens.kind=attention")
        if self.enrich.kind != "none":
            parts.append(f"recipe.enrich.kind={self.enrich.kind}")
        return parts


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
