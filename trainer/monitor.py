"""What a run tells its user: a rich progress bar, JSON log lines, TensorBoard scalars.

Only rank 0 prints and writes. Log lines go to `<run>/log.jsonl` (one JSON object per line, with
"event": "step" | "epoch" | "eval" | "config" | ...) and to the console when no progress bar can
be drawn (not a terminal), so CI logs still show progress.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


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

    def print(self, renderable) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(renderable)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
