"""Stage e of the parity harness: optimizer steps from the same start, every loss per step.

Both models start from the same weights (their model and its conversion), see the same batches in
the same order (fixed seeds) and step in fp32 on the CPU (deterministic):
- theirs with their solver: `solver.build_optimizer` (their per-parameter rule: Adam, eps 1e-3,
  their learning-rate factors and no decay on biases) and `solver.build_lr_scheduler` (warm-up
  staircase, then cosine), stepped once an epoch as their processor does;
- ours with trainer/running/optim.py `build_optimizer` on the config the converter writes, the
  `optim:` section of launch/configs/<method>.yaml on top (the authors' settings as this project
  ships them, `optim.schedule=epoch` included), and the factor `lr_at` gives each step.
A second run of ours takes the authors' per-parameter learning rates and decays instead (their
groups mapped onto this project's names by the converter): where the first parts from theirs
and the second does not, the parameter groups are the cause.

The losses are this project's loss functions on this project's model, composed as the recipe
composes them (launch/parity/compare.py `irra_ours`, `rde_ours`); the step's wiring
(trainer/recipe/step.py: draws, gathering, sample weights) is not what is compared here.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tbps.trainer.running.optim import build_optimizer, param_groups, set_lr
from tbps.trainer.running.resume import lr_at

STEPS, PER_EPOCH, EPOCHS, WARMUP = 20, 2, 10, 5
"""20 steps of 2 an epoch over 10 epochs: the 5 warm-up epochs' staircase, then 5 of cosine."""
CONFIGS = Path(__file__).parents[1] / "configs"


def project_overrides(method: str) -> list[str]:
    """The `optim:` section of launch/configs/<method>.yaml as overrides, and this run's length."""
    optim = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())["optim"]
    out = [f"optim.{k}={'null' if v is None else v}" for k, v in optim.items()]
    return out + [f"optim.warmup_epochs={WARMUP}", f"train.epochs={EPOCHS}"]


def their_rates(theirs, optimizer) -> dict[str, tuple[float, float]]:
    """{their parameter name: (lr, weight decay)} from their optimizer's groups."""
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
             for p in g["params"]}
    return {n: by_id[id(p)] for n, p in theirs.named_parameters() if id(p) in by_id}


def mapped_rates(theirs, rates: dict, to_ours) -> dict[str, tuple[float, float]]:
    """Their (lr, decay) under this project's names: constant tensors through the converter."""
    params = dict(theirs.named_parameters())
    lrs = to_ours(theirs, {n: torch.full_like(params[n], r[0], dtype=torch.float64)
                           for n, r in rates.items()})
    wds = to_ours(theirs, {n: torch.full_like(params[n], r[1], dtype=torch.float64)
                           for n, r in rates.items()})
    return {n: (float(lrs[n].flatten()[0]), float(wds[n].flatten()[0])) for n in lrs}


def our_rates(ours, cfg) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in ours.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(ours, cfg)
            for p in g["params"]}


def group_differences(ours_r: dict, theirs_r: dict, base_lr: float) -> list[str]:
    """Where this project's groups differ from theirs: 'N tensors: lr x a here, x b there'."""
    found: dict[tuple, list[str]] = {}
    for name, (lr, wd) in ours_r.items():
        if name not in theirs_r:
            continue
        t_lr, t_wd = theirs_r[name]
        if abs(lr - t_lr) > 1e-6 * t_lr or abs(wd - t_wd) > 1e-12:
            key = (round(lr / base_lr, 4), wd, round(t_lr / base_lr, 4), t_wd)
            found.setdefault(key, []).append(name)
    return [f"{len(v)} tensors (e.g. {v[0]}): lr x{k[0]:g}, decay {k[1]:g} here; x{k[2]:g}, "
            f"decay {k[3]:g} there" for k, v in sorted(found.items(), key=lambda kv: -len(kv[1]))]


def authors_groups_optimizer(ours, cfg, theirs_r: dict) -> torch.optim.Optimizer:
    """build_optimizer's Adam with the authors' per-parameter lr and decay (ours where a
    parameter has no counterpart)."""
    o, own = cfg.optim, our_rates(ours, cfg)
    groups = []
    for name, p in ours.named_parameters():
        if name in own:
            lr, wd = theirs_r.get(name, own[name])
            groups.append({"params": [p], "lr": lr, "lr_mult": lr / o.lr, "weight_decay": wd})
    return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def trajectory(model, optimizer, loss, batches, lr_factor) -> dict:
    """Per step, before its update: every loss term, their sum, and the schedule's factor
    (`lr_factor(step)` sets the step's learning rates and returns it)."""
    out = {"losses": [], "lr_factor": []}
    for step, x in enumerate(batches):
        out["lr_factor"].append(lr_factor(step))
        terms = loss(model, x)
        total = sum(terms.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        out["losses"].append({**{k: float(v.detach()) for k, v in terms.items()},
                              "total": float(total.detach())})
    return out


def theirs_trajectory(theirs, solver, args, loss, batches) -> dict:
    """Their solver's optimizer and scheduler, stepped once an epoch as their processor does."""
    optimizer = solver.build_optimizer(args, theirs)
    scheduler = solver.build_lr_scheduler(args, optimizer)

    def factor(step: int) -> float:
        if step and step % PER_EPOCH == 0:
            scheduler.step()
        return optimizer.param_groups[0]["lr"] / scheduler.base_lrs[0]

    return trajectory(theirs, optimizer, loss, batches, factor)


def ours_trajectory(ours, optimizer, cfg, loss, batches) -> dict:
    layout = {"steps_per_epoch": PER_EPOCH, "total_steps": len(batches), "warmup_epochs": WARMUP}

    def factor(step: int) -> float:
        f = lr_at(cfg, layout, step)
        set_lr(optimizer, cfg.optim.lr, f)
        return f

    return trajectory(ours, optimizer, loss, batches, factor)


def parted_at(ours: dict, theirs: dict, target: float) -> int | None:
    """The first step (1-based) where a loss differs by more than `target` relative."""
    for i, (o, t) in enumerate(zip(ours["losses"], theirs["losses"])):
        if any(abs(o[k] - t[k]) > target * max(abs(t[k]), 1e-12) for k in t):
            return i + 1
    return None



def compare(table, method: str, *, theirs, start: Path, folder: Path, switch: str, build_ours,
            to_ours, solver, args, their_loss, our_loss, batches) -> dict:
    """Stage e for one method, with the authors' switch on: their trajectory against ours with
    this project's parameter groups and with theirs. Adds the rows; returns the per-step record."""
    theirs.load_state_dict(torch.load(start, weights_only=True)["model"])
    theirs.train()
    theirs_r = mapped_rates(theirs, their_rates(theirs, solver.build_optimizer(args, theirs)),
                            to_ours)
    t = theirs_trajectory(theirs, solver, args, their_loss, batches)
    record = {"steps": len(batches), "steps_per_epoch": PER_EPOCH, "epochs": EPOCHS,
              "theirs": t}
    keys = list(t["losses"][0])
    theirs_L = torch.tensor([[s[k] for k in keys] for s in t["losses"]])
    moved = float((theirs_L[-1] - theirs_L[0]).abs().max() / theirs_L[0].abs().max())
    stage = f"e. {method.upper()}, {len(batches)} optimizer steps, authors' switches on ({switch})"
    # this project's groups (its default rule, and IRRA's rule order where it has a switch for
    # it), then the authors' per-parameter rates mapped by the converter (extra None)
    variants = [("this project's parameter groups", [])]
    if method == "irra":
        variants.append(("this project's groups with optim.group_rule=irra",
                         ["optim.group_rule=irra"]))
    variants.append(("the authors' parameter groups", None))
    for groups, extra in variants:
        cfg, ours = build_ours(folder, [switch, *project_overrides(method), *(extra or [])])
        diffs = group_differences(our_rates(ours, cfg), theirs_r, cfg.optim.lr)
        optimizer = (build_optimizer(ours, cfg) if extra is not None
                     else authors_groups_optimizer(ours, cfg, theirs_r))
        o = ours_trajectory(ours, optimizer, cfg, our_loss, batches)
        record[f"ours, {groups}"] = {**o, "group_differences": diffs}
        ours_L = torch.tensor([[s[k] for k in keys] for s in o["losses"]])
        parted = parted_at(o, t, 1e-4)
        note = (f"parts at step {parted}: " if parted else "") + (
            "; ".join(diffs) if extra is not None and diffs else
            "their learning rates and decays per parameter, mapped by the converter"
            if extra is None else "the same groups")
        # each loss relative to its own size (max over the steps of |theirs|): the ID and MLM
        # terms are small beside the total
        scale = theirs_L.abs().max(dim=0).values.clamp(min=1e-12)
        row = table.add(stage, f"every loss per step ({', '.join(keys)}), {groups} (their "
                        f"losses move {moved:.1%} over the run)", ours_L / scale,
                        theirs_L / scale, "steps", note)
        row["max_abs"] = float((ours_L - theirs_L).abs().max())
        table.add(stage, f"learning-rate factor per step, {groups} (optim.schedule=epoch)",
                  torch.tensor(o["lr_factor"]), torch.tensor(t["lr_factor"]), "loss")
    return record
