"""Training entry point.

    # tiny CPU run on the synthetic data, 2 processes (what `python -m trainer.quickstart` does)
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m trainer.train \
        --config launch/configs/irra_synth.yaml data.shards=data/synth-shards
    # a GPU node, DeepSpeed ZeRO-2, CLIP ViT-B/16 on CUHK-PEDES
    accelerate launch --config_file launch/accelerate/gpu_zero2.yaml -m trainer.train \
        --config launch/configs/irra.yaml data.shards=shards/cuhk train.output_dir=runs/irra-cuhk
    # continue an interrupted run where it stopped (mid-epoch included)
    accelerate launch ... -m trainer.train --config ... train.resume=latest

Overrides are `section.field=value` (or `--section.field value`). The resolved config is
printed at start and saved as <output_dir>/config.yaml. Each epoch: the weighting part's
division when it asks for one (the training set scored, gathered once, divided on rank 0, the
weights handed to every rank's recipe), the training batches, a checkpoint, and an evaluation on
the selection split (val where the shards have one) that keeps the best weights in
<output_dir>/best. At the end: the final weights, the test metrics of best and final
(metrics.json) and a transformers export of the best (hf/). The momentum model (trainer/ema.py)
is built when a part of the recipe needs one (trainer/recipe.py momentum_modules) or
`ema.modules` names some, and handed to the recipe with each step.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader import LoaderConfig, TrainLoader
from data_pipeline.manifest import read_meta
from data_pipeline.transforms import TrainAugment, prepare_batch
from trainer import checkpoint, dist
from trainer.build import build_model, load_tokenizer, save_weights
from trainer.ccd import ConsensusWeighting
from trainer.checkpoint import TrainState
from trainer.config import Config, load_config, parse_overrides, save_config
from trainer.evaluate import evaluate, format_table
from trainer.monitor import Monitor
from trainer.optim import build_optimizer, lr_factor, set_lr
from trainer.recipe import StepInfo, momentum_modules

log = logging.getLogger("trainer")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """Training stopped early on request (a scheduler's SIGTERM / SIGUSR1) after a checkpoint."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (launch/configs/...)")
    args, rest = p.parse_known_args(argv)
    return load_config(args.config, parse_overrides(rest))


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Run:
    """Everything one training run holds; `fit()` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.acc = dist.build_accelerator(cfg, str(self.run_dir))
        _setup_logging(self.acc)
        self._check_run_dir()
        torch.manual_seed(cfg.train.seed)              # same initial weights on every rank
        self.tokenizer = load_tokenizer(cfg)
        self.meta = read_meta(cfg.data.shards)
        self.splits = set(self.meta["splits"])
        with dist.plain_init(self.acc):
            model = self._build_model()
        self.clip_config = model.encoder.clip.config
        self.loader = TrainLoader(cfg.data.shards, self.tokenizer, self._loader_cfg(),
                                  rank=self.acc.process_index, world_size=self.acc.num_processes)
        self.steps_per_epoch = self.loader.num_batches // cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.loader.num_batches} batches per rank, fewer "
                             f"than optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        optimizer = build_optimizer(model, cfg)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        dist.register_external_parameters(self.acc, self.model)
        self.ema = self._build_ema()
        self.weighting = (ConsensusWeighting(cfg.recipe.weighting, cfg.train.seed)
                          if cfg.recipe.weighting.kind == "consensus" else None)
        self.state = TrainState()
        if cfg.train.resume:
            path = checkpoint.find(self.run_dir, cfg.train.resume)
            self.state = checkpoint.load(self.acc, path, self.ema)
            log.info("resumed from %s at epoch %d, batch %d, step %d", path, self.state.epoch,
                     self.state.batch_in_epoch, self.state.step)
        self.select_split = self._select_split()
        self._stop_signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.monitor = Monitor(self.acc, self.run_dir, self.total_steps, self.state.step)
        self._announce()

    # -- set-up helpers -----------------------------------------------------------------------

    def _loader_cfg(self) -> LoaderConfig:
        d, m = self.cfg.data, self.cfg.model
        augment = TrainAugment(pad=d.crop_pad, erase_p=d.erase_prob) if d.augment else None
        return LoaderConfig(batch_size=d.batch_size, image_size=tuple(m.image_size),
                            num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                            seed=self.cfg.train.seed, augment=augment)

    def _build_model(self):
        return build_model(self.cfg, self.tokenizer, self.meta["num_classes"],
                           self.meta["splits"]["train"]["num_samples"])

    def _build_ema(self):
        e = self.cfg.ema
        if not self.cfg.needs_momentum():
            return None
        from trainer.ema import ShardedEMA

        modules = tuple(dict.fromkeys(momentum_modules(self.cfg) + tuple(e.modules)))
        return ShardedEMA(self.acc, self.model, factory=self._build_model, modules=modules,
                          momentum=e.momentum, momentum_end=e.momentum_end,
                          total_steps=self.total_steps, refresh_every=e.refresh_every)

    def _check_run_dir(self) -> None:
        exists = (self.run_dir / checkpoint.CKPT_DIR).exists()
        if exists and not self.cfg.train.resume:
            raise ValueError(f"{self.run_dir} already holds a run; pass train.resume=latest to "
                             "continue it or choose another train.output_dir")
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _select_split(self) -> str | None:
        choice = self.cfg.eval.select_split
        if choice == "auto":
            if "val" in self.splits:
                return "val"
            log.warning("the shards have no val split: no best-checkpoint selection (the last "
                        "epoch is reported); set eval.select_split=test to select on test")
            return None
        if choice == "none":
            return None
        if choice not in self.splits:
            raise ValueError(f"eval.select_split={choice}: the shards have no {choice} split")
        if choice == "test":
            log.warning("selecting the best checkpoint on the TEST split (eval.select_split=test)"
                        ": its test figures are optimistic")
        return choice

    def _announce(self) -> None:
        info = {"run": dist.describe(self.acc), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "select_split": self.select_split,
                "global_batch": self.cfg.data.batch_size * self.acc.num_processes *
                self.cfg.optim.grad_accum, "num_classes": self.meta["num_classes"],
                "vocab_size": self.tokenizer.vocab_size,
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())}
        if self.acc.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.monitor.log("config", echo=True, config=self.cfg.to_dict(), **info)
        if self.cfg.train.tensorboard:
            flat = {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for sec, fields in self.cfg.to_dict().items() if isinstance(fields, dict)
                    for k, v in fields.items()}
            flat["method"] = str(self.cfg.method)
            self.acc.init_trackers("tensorboard", config=flat)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal (ranks must stop together).
        Asked at logging steps only: the all-reduce and its host sync stay out of other steps."""
        flag = torch.tensor([self._stop_signal is not None], dtype=torch.long,
                            device=self.acc.device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    # -- per-step values ---------------------------------------------------------------------

    def tau(self, step: int) -> float:
        lc = self.cfg.loss
        if lc.tau_start is None:
            return lc.tau
        span = lc.tau_anneal_epochs * self.steps_per_epoch
        frac = 1.0 if span <= 0 else min(1.0, step / span)
        return lc.tau_start + (lc.tau - lc.tau_start) * frac

    def lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        return lr_factor(step, warmup_steps=int(o.warmup_epochs * self.steps_per_epoch),
                         total_steps=self.total_steps, start=o.warmup_start_factor,
                         minimum=o.min_lr_factor)

    def step_info(self) -> StepInfo:
        s = self.state
        gen = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, self.acc.process_index,
                                                    s.epoch, s.batch_in_epoch))
        return StepInfo(epoch=s.epoch, step=s.step, tau=self.tau(s.step), generator=gen,
                        momentum=self.ema)

    def _to_device(self, batch: dict) -> dict:
        """The loader's CPU batch on the training device, with the longest caption's length
        read on the host (so the text encoder need not read it back from the device)."""
        ids = batch["input_ids"]
        eot = ids == self.tokenizer.eot_id
        if not bool(eot.any(dim=1).all()):
            raise ValueError("a caption has no end-of-text token; re-shard with this tokenizer")
        length = int(eot.int().argmax(dim=1).max()) + 1
        return {**prepare_batch(batch, self.acc.device), "text_length": length}

    @torch.no_grad()
    def score_training_set(self) -> dict:
        """Per-sample losses (the recipe's per_sample_losses) of this epoch's training batches,
        in eval mode with the training augmentations, gathered once from every rank:
        {"index": N, "noisy": N, <branch>: N} numpy arrays on every rank, in the order
        (batch, rank, sample). Samples the epoch leaves out (fewer than batch x ranks) are
        absent."""
        s, acc = self.state, self.acc
        was_training = self.model.training
        self.model.eval()
        parts = {}
        for b, batch in enumerate(self.loader.epoch(s.epoch)):
            batch = self._to_device(batch)
            gen = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, acc.process_index,
                                                        s.epoch, b, 1))
            out = self.model(batch, mode="per_sample",
                             step=StepInfo(epoch=s.epoch, step=s.step, tau=self.tau(s.step),
                                           generator=gen))
            out = {**out, "index": batch["index"], "noisy": batch["noisy"]}
            for k, v in out.items():
                parts.setdefault(k, []).append(v.detach())
        self.model.train(was_training)
        world, result = dist.world_size(), {}
        for k, v in parts.items():
            local = torch.stack(v)                                   # batches x B
            dtype = torch.float32 if local.is_floating_point() else local.dtype
            every = dist.gather_nograd(local.to(dtype)[None])         # ranks x batches x B
            result[k] = every.view(world, *local.shape).transpose(0, 1).reshape(-1).cpu().numpy()
        return result

    def _divide(self) -> dict:
        """The weighting part's division for this epoch: score, divide on rank 0, hand the
        weights to every rank's recipe."""
        t0 = time.time()
        scores = self.score_training_set()
        result = None
        if dist.rank() == 0:
            result = self.weighting.divide(scores, self.state.epoch, self.run_dir / "ccd")
        weights, logs = dist.broadcast_object(result)
        self._unwrap().recipe.set_sample_weights(scores["index"], weights)
        logs["ccd_seconds"] = round(time.time() - t0, 2)
        return logs

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, s = self.cfg, self.state
        while s.epoch < cfg.train.epochs and not self._done():
            t0 = time.time()
            # a resumed epoch keeps the weights it started with (they are in the checkpoint)
            if s.batch_in_epoch == 0 and self.weighting and self.weighting.wants_scores(s.epoch):
                self.monitor.log("epoch_start", epoch=s.epoch, step=s.step, **self._divide())
            t1 = time.time()
            self._train_epoch()
            self.monitor.log("epoch", epoch=s.epoch, step=s.step,
                             epoch_start_seconds=round(t1 - t0, 2),
                             train_seconds=round(time.time() - t1, 2),
                             epoch_start_fraction=round((t1 - t0) / max(time.time() - t0, 1e-9), 4))
            if self._done() and s.batch_in_epoch < self.loader.num_batches:
                break
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            checkpoint.save(self.acc, self.run_dir, s, cfg.train.keep_checkpoints, self.ema)
            if self.select_split and cfg.eval.every_epochs and s.epoch % cfg.eval.every_epochs == 0:
                self._select(self.select_split)
        return self._finish()

    def _done(self) -> bool:
        return self.state.step >= self.total_steps

    def _train_epoch(self) -> None:
        cfg, s, acc = self.cfg, self.state, self.acc
        self.model.train()
        sums = LoggedSums()
        for batch in self.loader.epoch(s.epoch, s.batch_in_epoch):
            batch = self._to_device(batch)
            out, lr, info = self.train_step(batch)
            sums.add(out)                    # stays on the device until a logging step
            s.batch_in_epoch += 1
            s.samples_seen += batch["pid"].shape[0] * acc.num_processes
            if not acc.sync_gradients:
                continue
            s.step += 1
            if s.step % cfg.train.log_every_steps == 0 or self._done():
                values = sums.mean_over_ranks()
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"the loss was {values['loss']} in the {sums.count} batches before step "
                        f"{s.step} (epoch {s.epoch}); lower optim.lr or check the data")
                values.update(lr=lr, tau=info.tau, epoch=s.epoch,
                              samples_per_s=self.monitor.rate(s.samples_seen))
                if self.ema is not None:
                    values["ema_momentum"] = self.ema.momentum(s.step - 1)
                self.monitor.step(s.step, values)
                sums = LoggedSums()
            if cfg.train.ckpt_every_steps and s.step % cfg.train.ckpt_every_steps == 0:
                checkpoint.save(self.acc, self.run_dir, s, cfg.train.keep_checkpoints, self.ema)
            if s.step % cfg.train.log_every_steps == 0 and self._stop_requested():
                path = checkpoint.save(self.acc, self.run_dir, s, cfg.train.keep_checkpoints,
                                       self.ema)
                self.monitor.log("stopped", echo=True, step=s.step, epoch=s.epoch,
                                 checkpoint=str(path))
                self.monitor.close()
                raise Stopped(f"stopped by signal at step {s.step} (epoch {s.epoch}, batch "
                              f"{s.batch_in_epoch}); checkpoint {path}; continue with "
                              "train.resume=latest")
            if self._done():
                break
        stats = self.loader.stats.snapshot()
        if any(stats.values()):
            self.monitor.log("data", echo=True, epoch=s.epoch, **stats)

    def train_step(self, batch: dict, mark=None):
        """One micro-batch: forward and backward; at an accumulation boundary also the optimizer
        step and the EMA update (the caller counts the step). `mark(phase)`, for benchmarks,
        is called at the end of each phase ("forward", "backward", "optimizer", "ema").
        Returns (the recipe's outputs, the learning rate, the StepInfo)."""
        cfg, acc = self.cfg, self.acc
        mark = mark or (lambda phase: None)
        lr = set_lr(self.optimizer, cfg.optim.lr, self.lr_factor(self.state.step))
        info = self.step_info()
        with acc.accumulate(self.model):
            out = self.model(batch, mode="train", step=info)
            mark("forward")
            acc.backward(out["loss"])
            mark("backward")
            if acc.sync_gradients and cfg.optim.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        if acc.sync_gradients and self.ema is not None:
            self.ema.update(self.state.step)
            mark("ema")
        return out, lr, info

    def _select(self, split: str) -> None:
        s = self.state
        t0 = time.time()
        results = evaluate(self.model, self.cfg, self.tokenizer, split, self.acc.device)
        name = next(iter(results))
        score = results[name]["R1"]
        flat = {f"{n}/{k}": v for n, m in results.items() for k, v in m.items()}
        self.monitor.log("eval", echo=True, split=split, epoch=s.epoch, step=s.step,
                         seconds=round(time.time() - t0, 1), **flat)
        s.history.append({"epoch": s.epoch, "split": split, "R1": score})
        if s.best_score is None or score > s.best_score:
            s.best_score, s.best_epoch = score, s.epoch
            self._save_weights("best", {"epoch": s.epoch, "split": split, "R1": score})

    def _save_weights(self, name: str, extra: dict) -> None:
        state_dict = self.acc.get_state_dict(self.model)
        if self.acc.is_main_process:
            save_weights(state_dict, self.run_dir / name, self.cfg, self.tokenizer,
                         self.clip_config, extra, num_classes=self.meta["num_classes"],
                         num_samples=self.meta["splits"]["train"]["num_samples"])
        dist.barrier()

    def _finish(self) -> dict:
        s = self.state
        self._save_weights("final", {"epoch": s.epoch, "step": s.step})
        final_split = self.cfg.eval.final_split
        report = {"epochs": s.epoch, "steps": s.step, "best_epoch": s.best_epoch,
                  "select_split": self.select_split, "history": s.history}
        if final_split in self.splits:
            report["final"] = evaluate(self.model, self.cfg, self.tokenizer, final_split,
                                       self.acc.device)
            if s.best_epoch is not None:
                report["best"] = self._evaluate_folder("best", final_split)
        if self.acc.is_main_process:
            report["split"] = final_split
            (self.run_dir / "metrics.json").write_text(json.dumps(report, indent=1))
            for key in ("best", "final"):
                if key in report:
                    self.monitor.print(format_table(report[key], f"{key} weights on {final_split}"))
            self.monitor.log("done", echo=True, **{k: v for k, v in report.items()
                                                   if k != "history"})
            self._export()
        self.monitor.close()
        dist.barrier()                      # no rank leaves while another still works
        self.acc.end_training()
        return report

    def _evaluate_folder(self, name: str, split: str) -> dict:
        """Metrics of a saved weights folder: every rank loads it into a plain (unwrapped,
        unsharded) model and evaluates its share."""
        from trainer.build import load_weights_folder

        with dist.plain_init(self.acc):
            cfg, tok, model = load_weights_folder(self.run_dir / name,
                                                  [f"data.shards={self.cfg.data.shards}"])
        return evaluate(model.to(self.acc.device), cfg, tok, split, self.acc.device)

    def _export(self) -> None:
        from trainer.export import export_hf

        source = "best" if self.state.best_epoch is not None else "final"
        with dist.plain_init(self.acc):
            export_hf(self.run_dir / source, self.run_dir / "hf")
        log.info("exported the %s weights in transformers format to %s", source,
                 self.run_dir / "hf")

    def _unwrap(self):
        return self.acc.unwrap_model(self.model)


class LoggedSums:
    """The step's logged values summed on the device (float64) between logging steps: no host
    read per step. `mean_over_ranks` makes the one all-reduce and the one read."""

    def __init__(self):
        self.keys, self.total, self.count = None, None, 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = sorted(out)
        row = torch.stack([out[k].detach().reshape(()).double() for k in self.keys])
        self.total = row if self.total is None else self.total + row
        self.count += 1

    def mean_over_ranks(self) -> dict[str, float]:
        if self.total is None:
            return {"loss": 0.0}
        t = self.total / self.count
        if dist.world_size() > 1:
            torch.distributed.all_reduce(t)
            t = t / dist.world_size()
        return dict(zip(self.keys, t.tolist()))


def _setup_logging(acc) -> None:
    level = logging.INFO if acc.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("accelerate", "deepspeed", "torch.distributed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        Run(cfg).fit()
    except Stopped as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return 3
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
