"""Confident consensus division (RDE): which training pairs to trust this epoch.

For each branch (BGE, TSE) the per-sample TAL of every training pair is min-max normalised and
a 2-component 1-D Gaussian mixture is fitted to it; a pair's clean probability is the posterior
of the lower-mean component, and it is clean for that branch when that exceeds the threshold
(if every pair does, the threshold drops to the 1st percentile, so a division always happens).
Consensus: clean for both -> 1, noisy for both -> 0, disagreement -> a coin flip drawn anew each
epoch. The labels weight each pair's loss as an anchor; every pair stays a negative for others.

Runs on one process (the trainer broadcasts the labels); seeded, so a rerun gives the same labels.
Where the shards carry ground-truth noise flags, `diagnostics` scores the division (precision and
recall of "clean") and `plot` draws the normalised losses by true label with the fitted mixture.

`ConsensusWeighting` is the recipe's weighting part (recipe.weighting.kind=consensus): at each
epoch boundary the loop asks whether it wants to divide (`wants_scores`) and, if so, hands it the
epoch's batches (`update`): it scores every pair (`per_sample_losses`, on every rank), divides on
rank 0, and writes each pair's weight into the model's `sample_weight` on every rank: the
consensus label (RDE) or the mean clean posterior of the branches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tbps.trainer.common import collective
from tbps.trainer.common.dist import unwrap
from tbps.trainer.recipe import losses


@dataclass
class BranchFit:
    normalized: np.ndarray      # the min-max normalised losses
    clean_prob: np.ndarray
    clean: np.ndarray           # bool
    means: np.ndarray           # the mixture, for plots: (2,), (2,), (2,)
    stds: np.ndarray
    weights: np.ndarray
    clean_component: int


@dataclass
class Division:
    labels: np.ndarray                         # 0/1 per scored pair (consensus)
    branches: dict[str, BranchFit] = field(default_factory=dict)
    disagree: int = 0

    @property
    def clean_probability(self) -> np.ndarray:
        """Mean over the branches of each pair's clean posterior."""
        return np.mean([f.clean_prob for f in self.branches.values()], axis=0).astype(np.float32)


GMM_SETTINGS = {"low": (10, 1e-2, 5e-4), "high": (100, 1e-4, 1e-6)}
"""max_iter, tol, reg_covar of RDE's two settings (their processor/processor.py)."""


def gmm_settings(cfg, noise_rate: float, dataset: str) -> tuple[tuple, str]:
    """(max_iter, tol, reg_covar) for config.WeightingConfig `cfg` on shards of `noise_rate`
    and format `dataset`, and a line saying where they came from."""
    which = cfg.gmm
    if which == "auto":
        which = "high" if noise_rate > 0.4 or dataset == "rstpreid" else "low"
    base = GMM_SETTINGS[which]
    values = tuple(b if v is None else v
                   for v, b in zip((cfg.gmm_max_iter, cfg.gmm_tol, cfg.gmm_reg_covar), base))
    why = (f"{which} (noise rate {noise_rate:g}, {dataset or 'dataset unknown'})"
           if cfg.gmm == "auto" else which)
    set_by_hand = values != base
    return values, (f"GMM max_iter/tol/reg_covar {values[0]}/{values[1]:g}/{values[2]:g}: "
                    f"{why}{', overridden by hand' if set_by_hand else ''}")


class ConsensusWeighting:
    """The weighting part: per-pair weights from the consensus division, once an epoch."""

    def __init__(self, cfg, seed: int, noise_rate: float = 0.0, dataset: str = ""):
        self.cfg, self.seed = cfg, seed          # cfg: config.WeightingConfig
        self.gmm, self.gmm_reason = gmm_settings(cfg, noise_rate, dataset)

    def wants_scores(self, epoch: int) -> bool:
        return epoch >= self.cfg.warmup_epochs

    def update(self, model, batches, *, epoch: int, tau: float, plot_dir: Path | None) -> dict:
        """Score this epoch's training pairs (`batches`: the epoch's device batches), divide on
        rank 0, write the weights into the model on every rank; the values to log."""
        t0 = time.time()
        scores = score_pairs(model, batches, self.cfg, tau)
        result = self.divide(scores, epoch, plot_dir) if collective.rank() == 0 else None
        weights, logs = collective.broadcast_object(result)
        set_weights(unwrap(model), scores["index"], weights)
        logs["ccd_seconds"] = round(time.time() - t0, 2)
        return logs

    def divide(self, scores: dict, epoch: int, plot_dir: Path | None = None
               ) -> tuple[np.ndarray, dict]:
        """scores: {"index", "noisy", <branch>: per-pair loss} (numpy, every scored pair);
        returns (weight per pair, values to log)."""
        c = self.cfg
        branches = {k: v for k, v in scores.items() if k not in ("index", "noisy")}
        max_iter, tol, reg_covar = self.gmm
        division = divide(branches, seed=self.seed * 100003 + epoch, max_iter=max_iter,
                          tol=tol, reg_covar=reg_covar, threshold=c.threshold)
        logs = {"kept": float(division.labels.mean()), "disagree": division.disagree,
                "scored": int(len(division.labels))}
        noisy = scores.get("noisy")
        if noisy is not None and noisy.any():
            logs.update({f"ccd/{k}": v for k, v in diagnostics(division, noisy).items()})
            if c.plots and plot_dir is not None:
                Path(plot_dir).mkdir(parents=True, exist_ok=True)
                plot(division, noisy, Path(plot_dir) / f"epoch-{epoch:02d}.png",
                     f"epoch {epoch}: consensus precision {logs['ccd/consensus_precision']:.3f}, "
                     f"recall {logs['ccd/consensus_recall']:.3f}")
        weights = division.labels if c.use == "labels" else division.clean_probability
        return weights, logs


@torch.no_grad()
def per_sample_losses(model, wc, batch: dict, tau: float) -> dict[str, torch.Tensor]:
    """An entry point of the model: {branch: per-sample loss of wc.score (config
    WeightingConfig)} of the batch, against the in-batch keys of every rank."""
    enc = model.encoder
    img = enc.encode_image(batch["image"], rows=model.attention_rows)
    txt = enc.encode_text(batch["input_ids"], rows=model.attention_rows,
                          length=batch.get("text_length"))
    emb = {"bge": (img.embeds_BE, txt.embeds_BE)}
    if model.has_tse:
        emb["tse"] = model.tse(img, txt)
    pid = batch["pid"]
    key_ids = losses.gather_ids(pid)
    opts = {"margin": wc.margin} if wc.score == "tal" else {}
    out = {}
    for b, (img_BE, txt_BE) in emb.items():
        i2t, t2i = losses.bidirectional(img_BE, txt_BE, pid, losses.gather_keys(img_BE, txt_BE),
                                        key_ids, kind=wc.score, tau=tau, **opts)
        out[b] = i2t + t2i
    return out


@torch.no_grad()
def score_pairs(model, batches, wc, tau: float) -> dict:
    """Per-sample losses of the batches in eval mode (the training augmentations kept),
    gathered once from every rank: {"index": N, "noisy": N, <branch>: N} numpy arrays on every
    rank, in the order (batch, rank, sample). Samples the epoch leaves out are absent."""
    was_training = model.training
    model.eval()
    parts = {}
    for batch in batches:
        out = model(per_sample_losses, wc, batch, tau)
        out = {**out, "index": batch["index"], "noisy": batch["noisy"]}
        for k, v in out.items():
            parts.setdefault(k, []).append(v.detach())
    model.train(was_training)
    world, result = collective.world_size(), {}
    for k, v in parts.items():
        local = torch.stack(v)                                   # batches x B
        dtype = torch.float32 if local.is_floating_point() else local.dtype
        every = collective.gather_nograd(local.to(dtype)[None])   # ranks x batches x B
        result[k] = every.view(world, *local.shape).transpose(0, 1).reshape(-1).cpu().numpy()
    return result


@torch.no_grad()
def set_weights(model, index, weights) -> None:
    """Write the weights of these training pairs into the model's per-pair weights."""
    buf = model.sample_weight
    buf[torch.as_tensor(index, device=buf.device)] = torch.as_tensor(weights, device=buf.device,
                                                                      dtype=buf.dtype)


def fit_branch(losses: np.ndarray, *, max_iter: int, tol: float, reg_covar: float,
               threshold: float, seed: int = 0) -> BranchFit:
    from sklearn.mixture import GaussianMixture  # heavy: only when dividing

    losses = np.asarray(losses, dtype=np.float64)
    span = losses.max() - losses.min()
    x = (losses - losses.min()) / (span if span > 0 else 1.0)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
                          random_state=seed).fit(x[:, None])
    means = gmm.means_.ravel()
    clean_component = int(np.argmin(means))
    prob = gmm.predict_proba(x[:, None])[:, clean_component]
    if (prob > threshold).all():
        threshold = float(np.percentile(prob, 1))
    return BranchFit(normalized=x, clean_prob=prob, clean=prob > threshold, means=means,
                     stds=np.sqrt(gmm.covariances_.ravel()), weights=gmm.weights_.ravel(),
                     clean_component=clean_component)


def divide(losses: dict[str, np.ndarray], *, seed: int, **fit_options) -> Division:
    """Consensus of the branches' divisions (two branches: RDE's BGE and TSE)."""
    fits = {name: fit_branch(v, seed=seed, **fit_options) for name, v in losses.items()}
    votes = sum(f.clean.astype(np.int64) for f in fits.values())
    n_branches = len(fits)
    disagree = (votes > 0) & (votes < n_branches)
    coin = np.random.default_rng(seed).integers(0, 2, size=votes.shape)
    labels = np.where(disagree, coin, votes == n_branches).astype(np.float32)
    return Division(labels=labels, branches=fits, disagree=int(disagree.sum()))


def diagnostics(division: Division, noisy: np.ndarray) -> dict[str, float]:
    """Precision / recall of the pairs judged clean, per branch and for the consensus."""
    truly_clean = ~np.asarray(noisy, dtype=bool)
    out = {"kept": float(division.labels.mean()), "disagree": division.disagree,
           "true_clean": float(truly_clean.mean())}
    preds = {name: f.clean for name, f in division.branches.items()}
    preds["consensus"] = division.labels > 0.5
    for name, pred in preds.items():
        hit = (pred & truly_clean).sum()
        out[f"{name}_precision"] = float(hit / max(pred.sum(), 1))
        out[f"{name}_recall"] = float(hit / max(truly_clean.sum(), 1))
    return out


def plot(division: Division, noisy: np.ndarray, path, title: str) -> None:
    import matplotlib  # plots only: kept off start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')

    noisy = np.asarray(noisy, dtype=bool)
    fig, axes = plt.subplots(1, len(division.branches), figsize=(5 * len(division.branches), 3.6))
    axes = np.atleast_1d(axes)
    grid = np.linspace(0, 1, 400)
    for ax, (name, fit) in zip(axes, division.branches.items()):
        bins = np.linspace(0, 1, 51)
        ax.hist(fit.normalized[~noisy], bins=bins, density=True, alpha=0.55, color="tab:green",
                label=f"truly clean ({(~noisy).sum()})")
        ax.hist(fit.normalized[noisy], bins=bins, density=True, alpha=0.55, color="tab:red",
                label=f"truly noisy ({noisy.sum()})")
        for c in range(2):
            pdf = fit.weights[c] * np.exp(-0.5 * ((grid - fit.means[c]) / fit.stds[c]) ** 2) \
                / (fit.stds[c] * np.sqrt(2 * np.pi))
            style = "-" if c == fit.clean_component else "--"
            ax.plot(grid, pdf, "k" + style, lw=1.2,
                    label="clean component" if c == fit.clean_component else "noisy component")
        ax.set_title(f"{name.upper()}: kept {fit.clean.mean():.1%}")
        ax.set_xlabel("min-max normalised TAL")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
