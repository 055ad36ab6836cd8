"""Parameter groups (per-module learning rates), the warm-up + cosine schedule, the temperature.

Groups follow IRRA/RDE: the encoders at `lr`; the method's new modules at
`lr x new_module_lr_mult`; biases at `lr x bias_lr_mult` with no weight decay. The schedule is a
factor per optimizer step: linear from `warmup_start_factor` to 1 over the warm-up, then cosine to
`min_lr_factor`. The trainer sets each group's lr itself (`set_lr`) rather than handing a
scheduler to accelerate, which steps prepared schedulers once per process.
"""
from __future__ import annotations

import math

import torch


# the cross-modal encoder's LayerNorms IRRA names ln_pre_t, ln_pre_i, ln_post (outside its
# "cross" rule)
CROSS_OUTER_NORMS = ("cross.ln_text.", "cross.ln_image.", "cross.ln_post.")


def lr_mult(name: str, new: set[str], o) -> float:
    """A parameter's learning-rate multiplier under optim.group_rule (`o`: OptimConfig)."""
    is_bias = name.endswith(".bias")
    if o.group_rule == "irra" and name.startswith("cross."):
        # their order: "cross" in the name 5x, then any bias 2x (overriding it)
        if is_bias:
            return o.bias_lr_mult
        return 1.0 if name.startswith(CROSS_OUTER_NORMS) else o.new_module_lr_mult
    return o.new_module_lr_mult if name in new else (o.bias_lr_mult if is_bias else 1.0)


def param_groups(model, cfg) -> list[dict]:
    o = cfg.optim
    new = model.new_parameter_names()
    buckets: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith(".bias")
        mult = lr_mult(name, new, o)
        wd = 0.0 if is_bias else o.weight_decay
        buckets.setdefault((mult, wd), []).append(p)
    return [{"params": ps, "lr": o.lr * mult, "lr_mult": mult, "weight_decay": wd}
            for (mult, wd), ps in sorted(buckets.items())]


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = torch.optim.Adam if o.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups(model, cfg), lr=o.lr, betas=o.betas, eps=o.eps)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, start: float,
              minimum: float) -> float:
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return minimum + (1.0 - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor
    return base_lr * factor


def tau_at(cfg, steps_per_epoch: int, step: int) -> float:
    """The similarity temperature at `step`: loss.tau, or annealed linearly from
    loss.tau_start over loss.tau_anneal_epochs."""
    lc = cfg.loss
    if lc.tau_start is None:
        return lc.tau
    span = lc.tau_anneal_epochs * steps_per_epoch
    frac = 1.0 if span <= 0 else min(1.0, step / span)
    return lc.tau_start + (lc.tau - lc.tau_start) * frac
