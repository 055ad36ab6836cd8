"""What a run tells its user: a short summary, a rich progress bar, JSON log lines, TensorBoard.

Only rank 0 prints and writes. The run opens with a few lines (`run_summary`: method and parts,
data, ranks, precision, steps, output folder); the whole resolved config goes to config.yaml and
to log.jsonl, not to the console. Log lines go to `<run>/log.jsonl` (one JSON object per line,
with "event": "step" | "epoch" | "eval" | "config" | ...) and to the console when no progress bar
can be drawn (not a terminal), so CI logs still show progress.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tbps.trainer.common import collective
from tbps.trainer.common.config_files import save_config


class Monitor:
    def __init__(self, acc, run_dir: Path, total_steps: int, start_step: int = 0):
        self.acc, self.enabled = acc, acc.is_main_process
        self.console = Console(stderr=True)
        self.interactive = self.enabled and self.console.is_terminal
        self.path = Path(run_dir) / "log.jsonl"
        self.trackers = bool(acc.log_with)
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               info="")
            self.progress.start()
        self._t0, self._samples0 = time.time(), 0

    def rate(self, samples_seen: int) -> float:
        """Samples per second (all ranks) since the last call."""
        now = time.time()
        rate = (samples_seen - self._samples0) / max(now - self._t0, 1e-9)
        self._t0, self._samples0 = now, samples_seen
        return rate

    def step(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            info = (f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
                    f"{values['samples_per_s']:.0f} samples/s")
            self.progress.update(self.task, completed=step, info=info)
        self.log("step", step=step, **values)

    def log(self, event: str, *, echo: bool | None = None, **values) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if echo or (echo is None and not self.interactive):
            line = json.dumps(record)
            if self.progress is not None:
                self.progress.console.print(line, markup=False, highlight=False)
            else:
                print(line, file=sys.stderr, flush=True)
        scalars = {f"{event}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.trackers and scalars and "step" in values:
            self.acc.log(scalars, step=values["step"])

    def print_lines(self, lines: list[str]) -> None:
        if self.enabled:
            out = self.progress.console if self.progress else self.console
            for line in lines:
                out.print(line, markup=False, highlight=False, soft_wrap=True)

    def print(self, renderable) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(renderable)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def open_run(self, cfg, meta: dict, info: dict, run_dir: Path, resumed: list[str] | None
                 ) -> None:
        """The run's opening: config.yaml, the config event, the summary lines, what a resume
        did, TensorBoard's hyper-parameters."""

        if self.enabled:
            save_config(cfg, Path(run_dir) / "config.yaml")
            self.log("config", echo=False, config=cfg.to_dict(), **info)
            self.print_lines(run_summary(cfg, meta, info, run_dir))
            if resumed:
                self.log("resumed", echo=False, notes=resumed)
                self.print_lines(resumed)
        if cfg.train.tensorboard:
            flat = {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for sec, fields in cfg.to_dict().items() if isinstance(fields, dict)
                    for k, v in fields.items()}
            flat["method"] = str(cfg.method)
            self.acc.init_trackers("tensorboard", config=flat)


class LoggedSums:
    """The step's logged values summed on the device (float64) between logging steps: no host
    read per step. A step's micro-batches are held apart until the step is known to be applied
    (`commit`) or skipped (`discard`). `mean_over_ranks` makes the one all-reduce and the one
    read."""

    def __init__(self):
        self.keys, self.total, self.count = None, None, 0
        self.pending, self.pending_count = None, 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = sorted(out)
        row = torch.stack([out[k].detach().reshape(()).double() for k in self.keys])
        self.pending = row if self.pending is None else self.pending + row
        self.pending_count += 1

    def commit(self) -> None:
        if self.pending is not None:
            self.total = self.pending if self.total is None else self.total + self.pending
            self.count += self.pending_count
        self.pending, self.pending_count = None, 0

    def discard(self) -> None:
        self.pending, self.pending_count = None, 0

    def mean_over_ranks(self) -> dict[str, float]:
        if self.total is None:
            return {"loss": 0.0}
        return dict(zip(self.keys, collective.mean_tensor(self.total / self.count).tolist()))


def run_summary(cfg, meta: dict, info: dict, run_dir: Path) -> list[str]:
    """The few lines a run opens with (the full config is in config.yaml and log.jsonl)."""
    rc, run = cfg.recipe, info["run"]
    terms = " + ".join(t.kind if t.weight == 1 else f"{t.weight:g} {t.kind}" for t in rc.losses)
    parts = [f"branches {'+'.join(rc.branches)}", f"loss {terms}"]
    if rc.image_tokens.kind != "all":
        parts.append(f"image tokens {rc.image_tokens.kind} (drop {rc.image_tokens.ratio:g})")
    if rc.caption_augment.kind != "none":
        a = rc.caption_augment
        parts.append(f"caption augment {a.kind} {a.prob:g} (mask {a.mask:g}, random "
                     f"{a.random:g}, delete {1 - a.mask - a.random:g}"
                     f"{'; division too' if a.division else ''})")
    if "mlm" in rc.kinds() or rc.enrich.kind != "none":
        parts.append(f"caption mask {rc.caption_mask.kind} {rc.caption_mask.ratio:g}")
    if rc.enrich.kind != "none":
        parts.append(f"enrich {rc.enrich.kind}")
    if rc.weighting.kind != "none":
        parts.append(f"weighting {rc.weighting.kind} ({rc.weighting.use}; "
                     f"{info.get('division', 'GMM as configured')})")
    model = cfg.model.pretrained or (f"CLIP from scratch, width {cfg.model.vision_width}/"
                                     f"{cfg.model.text_width}")
    splits = meta.get("splits", {})
    train = splits.get("train", {})
    others = ", ".join(f"{k} {v.get('num_samples', 0):,}" for k, v in splits.items()
                       if k != "train")
    kind = (f"DeepSpeed ZeRO-{run['zero_stage']}" if run.get("zero_stage") else
            "DDP" if run["num_processes"] > 1 else "one process")
    backend = f", {run['backend']}" if run.get("backend") else ""
    epochs = cfg.train.epochs
    steps = f"{info['steps_per_epoch']:,} steps an epoch x {epochs} epochs"
    if info["total_steps"] != info["steps_per_epoch"] * epochs:
        steps += f", stopping at step {info['total_steps']:,} (train.max_steps)"
    else:
        steps += f" = {info['total_steps']:,} steps"
    select = f", best on {info['select_split']}" if info.get("select_split") else ""
    return [
        f"method  {cfg.method or 'custom'}: {', '.join(parts)}; {model}, "
        f"{info['parameters'] / 1e6:.1f}M parameters",
        f"data    {cfg.data.shards}: {train.get('num_samples', 0):,} training pairs of "
        f"{meta.get('num_classes', 0):,} identities ({others}); global batch "
        f"{info['global_batch']} = {info['micro_batch']} a rank x {run['num_processes']} "
        f"rank(s) x accumulation {cfg.optim.grad_accum}",
        f"ranks   {run['num_processes']} ({kind}, {run['device']}{backend}); precision "
        f"{info['precision_reason']}",
        f"steps   {steps}",
        f"output  {run_dir}/ (config.yaml, log.jsonl, checkpoints/{select})",
    ]
