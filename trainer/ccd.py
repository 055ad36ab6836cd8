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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def fit_branch(losses: np.ndarray, *, max_iter: int, tol: float, reg_covar: float,
               threshold: float, seed: int = 0) -> BranchFit:
    from sklearn.mixture import GaussianMixture

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
