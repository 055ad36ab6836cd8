"""Training entry point.

    # tiny CPU run on the synthetic data, 2 processes (what `tbps quickstart` does)
    tbps launch --config_file launch/accelerate/cpu_ddp.yaml -m tbps.trainer.train \
        --config launch/configs/irra_synth.yaml data.shards=data/synth-shards
    # a GPU node, DeepSpeed ZeRO-2, CLIP ViT-B/16 on CUHK-PEDES
    tbps launch --config_file launch/accelerate/gpu_zero2.yaml -m tbps.trainer.train \
        --config launch/configs/irra.yaml data.shards=shards/cuhk train.output_dir=runs/irra-cuhk
    # continue an interrupted run where it stopped (mid-epoch included; on another number of
    # ranks too)
    tbps launch ... -m tbps.trainer.train --config ... train.resume=latest

`tbps launch` is `accelerate launch` with SIGTERM / SIGUSR1 passed on to every
rank and the exit code the ranks chose (trainer/launch.py); `accelerate launch` works too.

    # check a config, its shards, tokenizer, model and DeepSpeed settings without training;
    # print the plan and a memory estimate per GPU (trainer/running/plan.py)
    tbps train --dry-run --config launch/configs/irra.yaml \
        --launch launch/accelerate/gpu_zero2.yaml data.shards=shards/cuhk

Overrides are `section.field=value` (or `--section.field value`). A short summary opens the run
(method and parts, data, ranks, precision, steps, output folder); the resolved config is saved
as <output_dir>/config.yaml and logged in log.jsonl. Each epoch: the weighting part's division
when it asks for one (the training set scored, gathered once, divided on rank 0, the weights
handed to every rank's recipe), the training batches, an evaluation on the selection split (val
where the shards have one) that keeps the best weights in <output_dir>/best, then a checkpoint
that holds it. At the end: the final weights, the test metrics of best and final
(metrics.json) and a transformers export of the best (hf/). The momentum model (trainer/running/ema.py)
is built when a part of the recipe needs one (trainer/recipe/step.py momentum_modules) or
`ema.modules` names some, and handed to the recipe with each step.

Faults: SIGTERM / SIGUSR1 to any rank (or to `tbps launch`, which forwards them)
stop every rank at the same step within two steps, after a checkpoint (exit code 3); a step
whose loss is not finite on some rank is skipped, train.max_nonfinite_steps in a row stop the
run; a collective that waits longer than train.collective_timeout_s (a rank died or hangs) ends
the run with an error naming it (exit code 1). Exit codes: trainer/running/errors.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tbps.data_pipeline.loader import LoaderConfig, TrainLoader
from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.transforms import TrainAugment, prepare_batch
from tbps.trainer import launch
from tbps.trainer.common.config import Config, load_config, parse_overrides, save_config
from tbps.trainer.inference.evaluate import evaluate, format_table
from tbps.trainer.model.weights import build_model, load_tokenizer, save_weights
from tbps.trainer.recipe.consensus_division import ConsensusWeighting
from tbps.trainer.recipe.step import StepInfo, momentum_modules
from tbps.trainer.running import checkpoint, dist, errors, precision
from tbps.trainer.running.checkpoint import TrainState
from tbps.trainer.running.errors import Stopped
from tbps.trainer.running.monitor import Monitor, run_summary
from tbps.trainer.running.optim import build_optimizer, lr_factor, set_lr

log = logging.getLogger("trainer")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop = {"signal": None}              # the first stop signal this process got


def _on_stop_signal(signum, _frame) -> None:
    _stop["signal"] = _stop["signal"] or signum


def catch_stop_signals() -> None:
    """SIGTERM / SIGUSR1 become a stop request that the ranks agree on (Run.fit)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_stop_signal)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tbps train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (launch/configs/...)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, shards, tokenizer, model and DeepSpeed settings and "
                        "print the plan with a memory estimate per GPU; no training")
    p.add_argument("--launch", metavar="ACCELERATE_YAML",
                   help="dry run: the accelerate config the run will be launched with (ranks, "
                        "machines, ZeRO stage, offload); default: this process's launch")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="dry run: memory of one GPU to compare the estimate with")
    return p


def parse_args(argv) -> Config:
    args, rest = build_parser().parse_known_args(argv)
    return load_config(args.config, parse_overrides(rest))


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Run:
    """Everything one training run holds; `fit()` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        catch_stop_signals()
        choice = precision.resolve(cfg.train.precision)
        cfg.train.precision = choice.precision
        self.acc = dist.build_accelerator(cfg, str(self.run_dir))
        _setup_logging(self.acc)
        if choice.warning:
            log.warning(choice.warning)
        self.precision_reason = choice.reason
        self.resume = self._resume_choice()
        self._check_run_dir()
        # which checkpoint, before anything is built (a wrong train.resume fails at once)
        self._resume_from = checkpoint.find(self.run_dir, self.resume) if self.resume else None
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
        optimizer = self._optimizer(model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        dist.register_external_parameters(self.acc, self.model)
        self.ema = self._build_ema()
        self.weighting = (ConsensusWeighting(cfg.recipe.weighting, cfg.train.seed)
                          if cfg.recipe.weighting.kind == "consensus" else None)
        self.state = TrainState()
        self.stopper = dist.StopAgreement(cfg.train.collective_timeout_s)
        self._nonfinite = None             # device flag: a loss of this step was not finite
        self._skipped_in_a_row = 0
        self.monitor = None
        resumed = self._resume() if self.resume else None
        self.state.layout = self.layout()
        self.select_split = self._select_split()
        self.monitor = Monitor(self.acc, self.run_dir, self.total_steps, self.state.step)
        self._announce(resumed)

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

    def _optimizer(self, model):
        """Adam(W) over the per-module groups; DeepSpeed's CPU Adam where ZeRO offloads the
        optimizer state to the CPU (a torch optimizer there is refused by DeepSpeed)."""
        if not dist.offloads_optimizer(self.acc):
            return build_optimizer(model, self.cfg)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from tbps.trainer.running.optim import param_groups

        o = self.cfg.optim
        return DeepSpeedCPUAdam(param_groups(model, self.cfg), lr=o.lr, betas=o.betas, eps=o.eps,
                                adamw_mode=o.optimizer == "adamw")

    def _build_ema(self):
        e = self.cfg.ema
        if not self.cfg.needs_momentum():
            return None
        from tbps.trainer.running.ema import ShardedEMA

        modules = tuple(dict.fromkeys(momentum_modules(self.cfg) + tuple(e.modules)))
        return ShardedEMA(self.acc, self.model, factory=self._build_model, modules=modules,
                          momentum=e.momentum, momentum_end=e.momentum_end,
                          total_steps=self.total_steps, refresh_every=e.refresh_every)

    def _resume_choice(self) -> str | None:
        """train.resume, with "auto" turned into "latest" or None by what the folder holds."""
        resume = self.cfg.train.resume
        if resume == "auto":
            has = any(checkpoint._complete(self.run_dir / checkpoint.CKPT_DIR))
            log.info("train.resume=auto: %s", "a checkpoint is there, continuing it" if has
                     else "no checkpoint yet, starting")
            return "latest" if has else None
        return resume

    def _check_run_dir(self) -> None:
        run, shards = self.run_dir.resolve(), Path(self.cfg.data.shards).resolve()
        if run == shards or shards in run.parents or run in shards.parents:
            raise ValueError(f"train.output_dir={self.run_dir} and data.shards="
                             f"{self.cfg.data.shards} overlap: a run must not write into its "
                             "input; choose another train.output_dir")
        exists = (self.run_dir / checkpoint.CKPT_DIR).exists()
        if exists and not self.resume:
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

    def layout(self) -> dict:
        """What a checkpoint records of how this run trains (compared on resume)."""
        c = self.cfg
        return {"world_size": self.acc.num_processes, "batch_size": c.data.batch_size,
                "grad_accum": c.optim.grad_accum, "batches_per_epoch": self.loader.num_batches,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "epochs": c.train.epochs, "zero_stage": dist.zero_stage(self.acc),
                "warmup_epochs": c.optim.warmup_epochs}

    def _resume(self) -> list[str]:
        """Load the checkpoint train.resume names; what was done, as lines for the log."""
        path, skipped = self._resume_from
        if skipped and self.acc.is_main_process:
            checkpoint.set_aside(self.run_dir, path)
        dist.barrier()
        saved = checkpoint.read_state(path).layout
        converted = self._check_kind(path, saved)
        if converted:
            path = converted
        self.state, loaded = checkpoint.load(self.acc, path, self.ema)
        if converted:
            loaded.insert(0, f"DeepSpeed's optimizer partitions were cut for "
                             f"{saved['world_size']} rank(s): converted to a universal "
                             f"checkpoint ({path}) and re-cut for {self.acc.num_processes}")
        old, new, old_step = self.state.layout, self.layout(), self.state.step
        notes = [f"resumed from {path} at epoch {self.state.epoch}, batch "
                 f"{self.state.batch_in_epoch}, step {self.state.step}", *skipped, *loaded]
        if old and (old["world_size"], old["batch_size"], old["grad_accum"]) != \
                (new["world_size"], new["batch_size"], new["grad_accum"]):
            notes += self._move_position(old, new)
        if old:
            notes += self._schedule_change(old, new, old_step)
        return notes

    def _check_kind(self, path: Path, saved: dict) -> Path | None:
        """A checkpoint of another kind of launch: DDP and DeepSpeed write different files (a
        clear error); DeepSpeed's optimizer partitions on another number of ranks or ZeRO stage
        go through its universal checkpoint (the converted folder, else None)."""
        if not saved:
            return None
        old_zero, new_zero = saved.get("zero_stage", 0), dist.zero_stage(self.acc)
        if bool(old_zero) != bool(new_zero):
            kinds = {False: "DDP", True: "DeepSpeed"}
            raise checkpoint.CheckpointError(
                f"{path} was written under {kinds[bool(old_zero)]}"
                f"{f' ZeRO-{old_zero}' if old_zero else ''}; this run is "
                f"{kinds[bool(new_zero)]}{f' ZeRO-{new_zero}' if new_zero else ''}: resume with "
                "the same kind of launch (the best/ and final/ weights load anywhere)")
        if new_zero and (saved["world_size"], old_zero) != (self.acc.num_processes, new_zero):
            return checkpoint.universal(self.acc, path)
        return None

    def _move_position(self, old: dict, new: dict) -> list[str]:
        """The checkpoint's position on this run's layout (other ranks, batch or accumulation):
        the same share of the epoch, the optimizer step counted in this run's steps so the
        learning-rate schedule continues at the same point of training."""
        s = self.state
        frac = s.batch_in_epoch / max(1, old["batches_per_epoch"])
        accum = new["grad_accum"]
        batch = min(new["batches_per_epoch"], int(frac * new["batches_per_epoch"]) // accum * accum)
        step = s.epoch * new["steps_per_epoch"] + batch // accum
        old_lr = self.cfg.optim.lr * _lr_at(self.cfg, old, s.step)
        new_lr = self.cfg.optim.lr * _lr_at(self.cfg, new, step)
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
            lines.append(f"ranks {old['world_size']}-{new['world_size'] - 1} have no random "
                         "state in the checkpoint and start fresh ones")
        s.batch_in_epoch, s.step = batch, step
        return lines

    def _schedule_change(self, old: dict, new: dict, old_step: int) -> list[str]:
        """What a changed schedule (epochs, max_steps, warm-up) does to the learning rate."""
        length = lambda d: d["total_steps"] / max(1, d["steps_per_epoch"])   # noqa: E731
        if (length(old), old.get("warmup_epochs")) == (length(new), new["warmup_epochs"]):
            return []
        lr, step = self.cfg.optim.lr, self.state.step
        was, now = lr * _lr_at(self.cfg, old, old_step), lr * _lr_at(self.cfg, new, step)
        line = (f"the schedule changed: {length(old):g} epochs of {old['steps_per_epoch']} steps "
                f"(cosine ending at step {old['total_steps']}) -> {length(new):g} of "
                f"{new['steps_per_epoch']} (ending at step {new['total_steps']}); the learning "
                f"rate goes from {was:.3g} on the old curve to {now:.3g} on the new one")
        if abs(now - was) > 0.05 * max(abs(was), 1e-12):
            change = abs(now - was) / max(was, 1e-12)
            line += f": a {'jump up' if now > was else 'drop'} of {change:.0%}"
        return [line]

    def _announce(self, resumed: list[str] | None) -> None:
        info = {"run": dist.describe(self.acc), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "select_split": self.select_split,
                "global_batch": self.cfg.data.batch_size * self.acc.num_processes *
                self.cfg.optim.grad_accum, "num_classes": self.meta["num_classes"],
                "vocab_size": self.tokenizer.vocab_size, "precision_reason": self.precision_reason,
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())}
        if self.acc.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.monitor.log("config", echo=False, config=self.cfg.to_dict(), **info)
            self.monitor.print_lines(run_summary(self.cfg, self.meta, info, self.run_dir))
            if resumed:
                self.monitor.log("resumed", echo=False, notes=resumed)
                self.monitor.print_lines(resumed)
        if self.cfg.train.tensorboard:
            flat = {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for sec, fields in self.cfg.to_dict().items() if isinstance(fields, dict)
                    for k, v in fields.items()}
            flat["method"] = str(self.cfg.method)
            self.acc.init_trackers("tensorboard", config=flat)

    # -- per-step values ---------------------------------------------------------------------

    def tau(self, step: int) -> float:
        lc = self.cfg.loss
        if lc.tau_start is None:
            return lc.tau
        span = lc.tau_anneal_epochs * self.steps_per_epoch
        frac = 1.0 if span <= 0 else min(1.0, step / span)
        return lc.tau_start + (lc.tau - lc.tau_start) * frac

    def lr_factor(self, step: int) -> float:
        return _lr_at(self.cfg, {"steps_per_epoch": self.steps_per_epoch,
                                 "total_steps": self.total_steps}, step)

    def step_info(self) -> StepInfo:
        s = self.state
        gen = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, self.acc.process_index,
                                                    s.epoch, s.batch_in_epoch))
        return StepInfo(epoch=s.epoch, step=s.step, tau=self.tau(s.step), generator=gen,
                        momentum=self.ema)

    def to_device(self, batch: dict) -> dict:
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
            batch = self.to_device(batch)
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
        self.unwrap().recipe.set_sample_weights(scores["index"], weights)
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
            # the epoch's evaluation first, so its checkpoint holds it (history, best epoch)
            if self.select_split and cfg.eval.every_epochs and s.epoch % cfg.eval.every_epochs == 0:
                self._select(self.select_split)
            self._save_checkpoint()
        return self._finish()

    def _done(self) -> bool:
        return self.state.step >= self.total_steps

    def _save_checkpoint(self) -> Path:
        self.state.layout = self.layout()
        return checkpoint.save(self.acc, self.run_dir, self.state, self.cfg.train.keep_checkpoints,
                               self.ema)

    def _train_epoch(self) -> None:
        cfg, s, acc = self.cfg, self.state, self.acc
        self.model.train()
        sums = LoggedSums()
        for batch in self.loader.epoch(s.epoch, s.batch_in_epoch):
            batch = self.to_device(batch)
            out, lr, info, applied = self.train_step(batch)
            sums.add(out)                    # stays on the device until a logging step
            s.batch_in_epoch += 1
            s.samples_seen += batch["pid"].shape[0] * acc.num_processes
            if not acc.sync_gradients:
                continue
            s.step += 1
            if applied:
                sums.commit()
                self._skipped_in_a_row = 0
            else:
                sums.discard()
                self._skipped(out)
            if s.step % cfg.train.log_every_steps == 0 or self._done():
                if sums.count:
                    values = sums.mean_over_ranks()
                    values.update(lr=lr, tau=info.tau, epoch=s.epoch,
                                  samples_per_s=self.monitor.rate(s.samples_seen))
                    if self.ema is not None:
                        values["ema_momentum"] = self.ema.momentum(s.step - 1)
                    self.monitor.step(s.step, values)
                sums = LoggedSums()
            if cfg.train.ckpt_every_steps and s.step % cfg.train.ckpt_every_steps == 0:
                self._save_checkpoint()
            # every rank's stop request of the previous step, agreed without waiting
            if self.stopper.poll(_stop["signal"] is not None):
                self._stop()
            if self._done():
                break
        stats = self.loader.stats.snapshot()
        if any(stats.values()):
            self.monitor.log("data", echo=True, epoch=s.epoch, **stats)

    def _stop(self) -> None:
        s = self.state
        path = self._save_checkpoint()
        self.stopper.close()
        self.monitor.log("stopped", echo=True, step=s.step, epoch=s.epoch, checkpoint=str(path))
        self.monitor.close()
        raise Stopped(f"stopped on request at step {s.step} (epoch {s.epoch}, batch "
                      f"{s.batch_in_epoch}); checkpoint {path}; continue with the same command "
                      "and train.resume=latest")

    def _skipped(self, out: dict) -> None:
        """A step whose update was skipped for a non-finite loss: say so; too many in a row stop
        the run."""
        s, k = self.state, self.cfg.train.max_nonfinite_steps
        self._skipped_in_a_row += 1
        self.monitor.log("skipped", echo=True, step=s.step, epoch=s.epoch,
                         in_a_row=self._skipped_in_a_row,
                         reason="the loss was not finite on at least one rank: no update")
        if self._skipped_in_a_row >= k:
            raise FloatingPointError(
                f"the loss was not finite in {k} steps in a row (steps "
                f"{s.step - k + 1}-{s.step}, epoch {s.epoch}; train.max_nonfinite_steps={k}); "
                "the weights were not updated by them. Lower optim.lr, use "
                "train.precision=fp32, or check the data; continue from the last checkpoint "
                "with train.resume=latest")

    def train_step(self, batch: dict, mark=None):
        """One micro-batch: forward and backward; at an accumulation boundary also the optimizer
        step and the EMA update (the caller counts the step), unless a loss of the step was not
        finite on some rank: then no update at all. `mark(phase)`, for benchmarks, is called at
        the end of each phase ("forward", "backward", "optimizer", "ema").
        Returns (the recipe's outputs, the learning rate, the StepInfo, whether the step's
        update was applied: None between accumulation boundaries)."""
        cfg, acc = self.cfg, self.acc
        mark = mark or (lambda phase: None)
        lr = set_lr(self.optimizer, cfg.optim.lr, self.lr_factor(self.state.step))
        info = self.step_info()
        applied = None
        with acc.accumulate(self.model):
            out = self.model(batch, mode="train", step=info)
            self._note_finite(out["loss"])
            mark("forward")
            acc.backward(out["loss"])           # DeepSpeed also steps here (at a boundary)
            mark("backward")
            if acc.sync_gradients:
                applied = self._step_is_finite()
                if applied and cfg.optim.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                if applied:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        if applied and self.ema is not None:
            self.ema.update(self.state.step)
            mark("ema")
        return out, lr, info, applied

    def _note_finite(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())        # on the device: no host read here
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def _step_is_finite(self) -> bool:
        """Whether every rank's losses of this step were finite. Under DeepSpeed its engine
        has already decided inside backward (it skips a step whose gradients are not finite and
        agrees across ranks: no extra read); otherwise one all-reduce of a flag and one host
        read per optimizer step."""
        flag, self._nonfinite = self._nonfinite, None
        if dist.zero_stage(self.acc) or dist.using_deepspeed():
            skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
            return not skipped or self.cfg.train.precision == "fp16"   # fp16: loss scaling
        return not dist.any_rank(flag)

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
        self.stopper.close()
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
        from tbps.trainer.model.weights import load_weights_folder

        with dist.plain_init(self.acc):
            cfg, tok, model = load_weights_folder(self.run_dir / name,
                                                  [f"data.shards={self.cfg.data.shards}"])
        return evaluate(model.to(self.acc.device), cfg, tok, split, self.acc.device)

    def _export(self) -> None:
        from transformers.utils import logging as hf_logging

        from tbps.trainer.inference.export import export_hf

        hf_logging.disable_progress_bar()           # "Writing model shards" under our own bar
        source = "best" if self.state.best_epoch is not None else "final"
        with dist.plain_init(self.acc):
            export_hf(self.run_dir / source, self.run_dir / "hf")
        log.info("exported the %s weights in transformers format to %s", source,
                 self.run_dir / "hf")

    def unwrap(self):
        return self.acc.unwrap_model(self.model)


def _lr_at(cfg: Config, layout: dict, step: int) -> float:
    """The schedule's learning-rate factor at `step` for a run of this layout."""
    o = cfg.optim
    warmup = layout.get("warmup_epochs", o.warmup_epochs)
    return lr_factor(step, warmup_steps=int(warmup * layout["steps_per_epoch"]),
                     total_steps=layout["total_steps"], start=o.warmup_start_factor,
                     minimum=o.min_lr_factor)


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
        t = self.total / self.count
        if dist.world_size() > 1:
            torch.distributed.all_reduce(t)
            t = t / dist.world_size()
        return dict(zip(self.keys, t.tolist()))


def _setup_logging(acc) -> None:
    level = logging.INFO if acc.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    dist.quiet_third_party()


def _main(argv) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.dry_run:
        from tbps.trainer.running import plan

        return plan.dry_run(args.config, parse_overrides(rest), launch_file=args.launch,
                            gpu_memory_gib=args.gpu_memory)
    if args.launch or args.gpu_memory:
        raise ValueError("--launch and --gpu-memory go with --dry-run")
    Run(load_config(args.config, parse_overrides(rest))).fit()
    return 0


def main(argv=None) -> int:
    launch.follow_launcher()
    catch_stop_signals()
    code = errors.guard(lambda: _main(argv), timeout_field="train.collective_timeout_s",
                        on_stop="continue with the same command and train.resume=latest")
    return launch.exit_code(code, same_on_every_rank=not errors.LAST["rank_specific"])


def command(argv=None) -> int:
    """`tbps train` and `python -m tbps.trainer.train`: main, then deaf to stop requests."""
    code = main(argv)
    launch.ignore_stop_requests()            # the work is over: a late request must not kill
    return code


if __name__ == "__main__":
    sys.exit(command())
