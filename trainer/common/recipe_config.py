"""The recipe's part of the configuration: the loss section, the loss terms and the parts a
`recipe:` names (RecipeConfig), with each field's checks. trainer/common/config.py holds the
whole tree and re-exports these names."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config field '{name}': {msg}")


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
