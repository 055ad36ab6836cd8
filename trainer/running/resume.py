"""Where a run starts: a fresh folder, or a checkpoint continued on this run's layout.

A checkpoint records the layout it was written with (ranks, batch, accumulation, steps, ZeRO
stage); a resume on another layout moves the position to the same share of the epoch and counts
the optimizer step in this run's steps, so the learning-rate schedule continues at the same
point; DeepSpeed partitions cut for another number of ranks go through its universal checkpoint.
Every such change comes back as a line for the log.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tbps.trainer.common import collective, dist
from tbps.trainer.common.config import Config
from tbps.trainer.common.global_batch import micro_batch
from tbps.trainer.running import checkpoint
from tbps.trainer.running.checkpoint import TrainState
from tbps.trainer.running.optim import lr_factor

log = logging.getLogger(__name__)


def resume_choice(cfg: Config, run_dir: Path) -> str | None:
    """train.resume, with "auto" turned into "latest" or None by what the folder holds."""
    resume = cfg.train.resume
    if resume == "auto":
        has = checkpoint.has_checkpoint(run_dir)
        log.info("train.resume=auto: %s", "a checkpoint is there, continuing it" if has
                 else "no checkpoint yet, starting")
        return "latest" if has else None
    return resume


def check_run_dir(cfg: Config, run_dir: Path, resume: str | None, is_main: bool) -> None:
    """The output folder neither overlaps the input nor holds another run (unless resumed);
    created by rank 0."""
    run, shards = run_dir.resolve(), Path(cfg.data.shards).resolve()
    if run == shards or shards in run.parents or run in shards.parents:
        raise ValueError(f"train.output_dir={run_dir} and data.shards={cfg.data.shards} overlap:"
                         " a run must not write into its input; choose another train.output_dir")
    if (run_dir / checkpoint.CKPT_DIR).exists() and not resume:
        raise ValueError(f"{run_dir} already holds a run; pass train.resume=latest to continue it "
                         "or choose another train.output_dir")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)


def run_layout(cfg: Config, acc, *, batches_per_epoch: int, steps_per_epoch: int,
               total_steps: int) -> dict:
    """What a checkpoint records of how this run trains (compared on resume)."""
    return {"world_size": acc.num_processes, "batch_size": micro_batch(cfg, acc.num_processes),
            "grad_accum": cfg.optim.grad_accum, "batches_per_epoch": batches_per_epoch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "epochs": cfg.train.epochs, "zero_stage": dist.zero_stage(acc),
            "warmup_epochs": cfg.optim.warmup_epochs}


def lr_at(cfg: Config, layout: dict, step: int) -> float:
    """The schedule's learning-rate factor at `step` for a run of this layout."""
    o = cfg.optim
    warmup = layout.get("warmup_epochs", o.warmup_epochs)
    if o.schedule == "epoch":       # one factor an epoch, counted in epochs
        per = max(1, layout["steps_per_epoch"])
        return lr_factor(step // per, warmup_steps=int(warmup),
                         total_steps=-(-layout["total_steps"] // per),
                         start=o.warmup_start_factor, minimum=o.min_lr_factor)
    return lr_factor(step, warmup_steps=int(warmup * layout["steps_per_epoch"]),
                     total_steps=layout["total_steps"], start=o.warmup_start_factor,
                     minimum=o.min_lr_factor)


def resume(acc, cfg: Config, run_dir: Path, found: tuple[Path, list[str]], ema, new: dict
           ) -> tuple[TrainState, list[str]]:
    """Load the checkpoint `found` (checkpoint.find's answer) onto this run's layout `new`:
    the state, and what was done as lines for the log."""
    path, skipped = found
    if skipped and acc.is_main_process:
        checkpoint.set_aside(run_dir, path)
    collective.barrier()
    saved = checkpoint.read_state(path).layout
    converted = _check_kind(acc, path, saved)
    if converted:
        path = converted
    state, loaded = checkpoint.load(acc, path, ema)
    if converted:
        loaded.insert(0, f"DeepSpeed's optimizer partitions were cut for {saved['world_size']} "
                         f"rank(s): converted to a universal checkpoint ({path}) and re-cut for "
                         f"{acc.num_processes}")
    old, old_step = state.layout, state.step
    notes = [f"resumed from {path} at epoch {state.epoch}, batch {state.batch_in_epoch}, step "
             f"{state.step}", *skipped, *loaded]
    if old and (old["world_size"], old["batch_size"], old["grad_accum"]) != \
            (new["world_size"], new["batch_size"], new["grad_accum"]):
        notes += _move_position(cfg, state, old, new)
    if old:
        notes += _schedule_change(cfg, state, old, new, old_step)
    return state, notes


def _check_kind(acc, path: Path, saved: dict) -> Path | None:
    """A checkpoint of another kind of launch: DDP and DeepSpeed write different files (a clear
    error); DeepSpeed's optimizer partitions on another number of ranks or ZeRO stage go through
    its universal checkpoint (the converted folder, else None)."""
    if not saved:
        return None
    old_zero, new_zero = saved.get("zero_stage", 0), dist.zero_stage(acc)
    if bool(old_zero) != bool(new_zero):
        kinds = {False: "DDP", True: "DeepSpeed"}
        raise checkpoint.CheckpointError(
            f"{path} was written under {kinds[bool(old_zero)]}"
            f"{f' ZeRO-{old_zero}' if old_zero else ''}; this run is "
            f"{kinds[bool(new_zero)]}{f' ZeRO-{new_zero}' if new_zero else ''}: resume with "
            "the same kind of launch (the best/ and final/ weights load anywhere)")
    if new_zero and (saved["world_size"], old_zero) != (acc.num_processes, new_zero):
        return checkpoint.universal(acc, path)
    return None


def _move_position(cfg: Config, s: TrainState, old: dict, new: dict) -> list[str]:
    """The checkpoint's position on this run's layout (other ranks, batch or accumulation): the
    same share of the epoch, the optimizer step counted in this run's steps."""
    frac = s.batch_in_epoch / max(1, old["batches_per_epoch"])
    accum = new["grad_accum"]
    batch = min(new["batches_per_epoch"], int(frac * new["batches_per_epoch"]) // accum * accum)
    step = s.epoch * new["steps_per_epoch"] + batch // accum
    old_lr = cfg.optim.lr * lr_at(cfg, old, s.step)
    new_lr = cfg.optim.lr * lr_at(cfg, new, step)
    glob = lambda d: d["world_size"] * d["batch_size"] * d["grad_accum"]   # noqa: E731
    lines = [
        f"the checkpoint was written by {old['world_size']} rank(s) x batch "
        f"{old['batch_size']} x accumulation {old['grad_accum']} (global batch {glob(old)}); "
        f"this run has {new['world_size']} x {new['batch_size']} x {new['grad_accum']} "
        f"(global batch {glob(new)}): the learning rate is not rescaled for it",
        f"position moved to the same share of epoch {s.epoch} ({frac:.0%}): batch "
        f"{s.batch_in_epoch} of {old['batches_per_epoch']} a rank -> {batch} of "
        f"{new['batches_per_epoch']}, step {s.step} -> {step}; the learning rate continues "
        f"at {new_lr:.3g} (it was {old_lr:.3g})"]
    if 0 < frac < 1:
        lines.append(f"the rest of epoch {s.epoch} is dealt to the ranks anew: some of its "
                     "samples are seen twice this epoch and as many not at all")
    if new["world_size"] > old["world_size"]:
        lines.append(f"ranks {old['world_size']}-{new['world_size'] - 1} have no random state in "
                     "the checkpoint and start fresh ones")
    s.batch_in_epoch, s.step = batch, step
    return lines


def _schedule_change(cfg: Config, s: TrainState, old: dict, new: dict, old_step: int
                     ) -> list[str]:
    """What a changed schedule (epochs, max_steps, warm-up) does to the learning rate."""
    length = lambda d: d["total_steps"] / max(1, d["steps_per_epoch"])   # noqa: E731
    if (length(old), old.get("warmup_epochs")) == (length(new), new["warmup_epochs"]):
        return []
    lr = cfg.optim.lr
    was, now = lr * lr_at(cfg, old, old_step), lr * lr_at(cfg, new, s.step)
    line = (f"the schedule changed: {length(old):g} epochs of {old['steps_per_epoch']} steps "
            f"(cosine ending at step {old['total_steps']}) -> {length(new):g} of "
            f"{new['steps_per_epoch']} (ending at step {new['total_steps']}); the learning "
            f"rate goes from {was:.3g} on the old curve to {now:.3g} on the new one")
    if abs(now - was) > 0.05 * max(abs(was), 1e-12):
        change = abs(now - was) / max(was, 1e-12)
        line += f": a {'jump up' if now > was else 'drop'} of {change:.0%}"
    return [line]
