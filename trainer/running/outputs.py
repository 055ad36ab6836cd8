"""What a run leaves in its folder besides checkpoints: best/ (the weights of the best epoch on
the selection split), final/, metrics.json (test metrics of best and final) and hf/ (a
transformers export of the best).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tbps.trainer.common import collective, dist
from tbps.trainer.inference.evaluate import evaluate, format_table
from tbps.trainer.inference.export import export_hf
from tbps.trainer.model.weights import load_weights_folder, save_description, save_weights
from tbps.trainer.running.stepping import check_weights

log = logging.getLogger(__name__)


def select_split(cfg, splits: set[str]) -> str | None:
    """The split the best epoch is chosen on (eval.select_split; auto: val where there is one)."""
    choice = cfg.eval.select_split
    if choice == "auto":
        if "val" in splits:
            return "val"
        log.warning("the shards have no val split: no best-checkpoint selection (the last epoch "
                    "is reported); set eval.select_split=test to select on test")
        return None
    if choice == "none":
        return None
    if choice not in splits:
        raise ValueError(f"eval.select_split={choice}: the shards have no {choice} split")
    if choice == "test":
        log.warning("selecting the best checkpoint on the TEST split (eval.select_split=test): "
                    "its test figures are optimistic")
    return choice


class Outputs:
    def __init__(self, cfg, acc, run_dir: Path, tokenizer, clip_config, meta: dict):
        self.cfg, self.acc, self.run_dir = cfg, acc, Path(run_dir)
        self.tokenizer, self.clip_config, self.meta = tokenizer, clip_config, meta
        self.splits = set(meta["splits"])
        self.select_split = select_split(cfg, self.splits)

    def wants_evaluation(self, epoch: int) -> bool:
        every = self.cfg.eval.every_epochs
        return bool(self.select_split and every and epoch % every == 0)

    def evaluate_epoch(self, model, s, monitor) -> None:
        """The epoch's evaluation on the selection split; best/ when it is the best so far (the
        state's history and best epoch updated, so the next checkpoint holds them)."""
        split, t0 = self.select_split, time.time()
        results = evaluate(model, self.cfg, self.tokenizer, split, self.acc.device)
        score = results[next(iter(results))]["R1"]
        flat = {f"{n}/{k}": v for n, m in results.items() for k, v in m.items()}
        monitor.log("eval", echo=True, split=split, epoch=s.epoch, step=s.step,
                    seconds=round(time.time() - t0, 1), **flat)
        s.history.append({"epoch": s.epoch, "split": split, "R1": score})
        if s.best_score is None or score > s.best_score:
            s.best_score, s.best_epoch = score, s.epoch
            self.save_weights(model, "best", {"epoch": s.epoch, "split": split, "R1": score},
                              step=s.step)

    def describe(self, folder: Path) -> None:
        """Rank 0: what rebuilding the model takes, into a checkpoint being written (so
        model.pretrained can start from it as from best/ or final/)."""
        save_description(folder, self.cfg, self.tokenizer, self.clip_config,
                         self.meta["num_classes"], self.meta["splits"]["train"]["num_samples"])

    def save_weights(self, model, name: str, extra: dict, *, step: int) -> None:
        check_weights(model, f"{name}/", self.run_dir, step)
        state_dict = self.acc.get_state_dict(model)
        if self.acc.is_main_process:
            save_weights(state_dict, self.run_dir / name, self.cfg, self.tokenizer,
                         self.clip_config, extra, num_classes=self.meta["num_classes"],
                         num_samples=self.meta["splits"]["train"]["num_samples"])
        collective.barrier()

    def finish(self, model, s, monitor, data_problems: dict) -> dict:
        """final/, the test metrics of best and final (metrics.json, printed), the export; the
        data problems of the run (every rank's) in metrics.json and the done event."""
        self.save_weights(model, "final", {"epoch": s.epoch, "step": s.step}, step=s.step)
        split = self.cfg.eval.final_split
        report = {"epochs": s.epoch, "steps": s.step, "best_epoch": s.best_epoch,
                  "select_split": self.select_split, "history": s.history,
                  "data_problems": data_problems}
        if split in self.splits:
            report["final"] = evaluate(model, self.cfg, self.tokenizer, split, self.acc.device)
            if s.best_epoch is not None:
                report["best"] = self._evaluate_folder("best", split)
        if self.acc.is_main_process:
            report["split"] = split
            (self.run_dir / "metrics.json").write_text(json.dumps(report, indent=1))
            for key in ("best", "final"):
                if key in report:
                    monitor.print(format_table(report[key], f"{key} weights on {split}"))
            monitor.log("done", echo=True, **{k: v for k, v in report.items() if k != "history"})
            self._export("best" if s.best_epoch is not None else "final")
        return report

    def _evaluate_folder(self, name: str, split: str) -> dict:
        """Metrics of a saved weights folder: every rank loads it into a plain (unwrapped,
        unsharded) model and evaluates its share."""
        with dist.plain_init(self.acc):
            cfg, tok, model = load_weights_folder(self.run_dir / name,
                                                  [f"data.shards={self.cfg.data.shards}"])
        return evaluate(model.to(self.acc.device), cfg, tok, split, self.acc.device)

    def _export(self, source: str) -> None:
        from transformers.utils import logging as hf_logging  # kept off start-up

        hf_logging.disable_progress_bar()           # "Writing model shards" under our own bar
        with dist.plain_init(self.acc):
            export_hf(self.run_dir / source, self.run_dir / "hf")
        log.info("exported the %s weights in transformers format to %s", source,
                 self.run_dir / "hf")
