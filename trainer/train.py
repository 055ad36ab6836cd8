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

`tbps launch` is `accelerate launch` with SIGTERM / SIGUSR1 passed on to every rank and the exit
code the ranks chose (trainer/launch.py); `accelerate launch` works too.

    # check a config, its shards, tokenizer, model and DeepSpeed settings without training;
    # print the plan and a memory estimate per GPU (trainer/running/plan.py)
    tbps train --dry-run --config launch/configs/irra.yaml \
        --launch launch/accelerate/gpu_zero2.yaml data.shards=shards/cuhk

Overrides are `section.field=value` (or `--section.field value`). A short summary opens the run;
the resolved config is saved as <output_dir>/config.yaml and logged in log.jsonl. Each epoch:
the weighting part's division when it asks for one (trainer/recipe/consensus_division.py), the
training batches, an evaluation on the selection split that keeps the best weights in
<output_dir>/best, then a checkpoint that holds it. At the end: final/, the test metrics of best
and final (metrics.json) and a transformers export of the best (hf/): trainer/running/outputs.py.
The momentum model (trainer/running/ema.py) is built when a part of the recipe needs one.

Faults: SIGTERM / SIGUSR1 to any rank (or to `tbps launch`, which forwards them) stop every rank
at the same step within two steps, after a checkpoint (exit code 3); a step whose loss is not
finite on some rank is skipped (trainer/running/stepping.py); a collective that waits longer than
train.collective_timeout_s ends the run with an error naming it (exit code 1). Exit codes:
trainer/common/errors.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from tbps.data_pipeline.loader import LoaderConfig, TrainLoader
from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.seeds import seed_of
from tbps.data_pipeline.transforms import TrainAugment, prepare_batch
from tbps.trainer.common import collective, dist, errors
from tbps.trainer.common.config import Config
from tbps.trainer.common.global_batch import micro_batch
from tbps.trainer.common.config_files import load_config, parse_overrides
from tbps.trainer.common.errors import Stopped
from tbps.trainer.model.weights import build_model, load_tokenizer
from tbps.trainer.recipe.consensus_division import ConsensusWeighting
from tbps.trainer.recipe.momentum import momentum_modules
from tbps.trainer.recipe.step import Recipe, StepInfo
from tbps.trainer.running import checkpoint, lock, precision, resume, signals
from tbps.trainer.running.checkpoint import TrainState
from tbps.trainer.running.ema import ShardedEMA
from tbps.trainer.running.monitor import LoggedSums, Monitor
from tbps.trainer.running.optim import build_optimizer, param_groups, set_lr, tau_at
from tbps.trainer.running.outputs import Outputs
from tbps.trainer.running.stepping import Stepper, check_weights

log = logging.getLogger("trainer")


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


class Run:
    """Everything one training run holds; `fit()` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        new_folder = not self.run_dir.exists()
        signals.catch_stop_signals()
        choice = precision.resolve(cfg.train.precision)
        cfg.train.precision = choice.precision
        self.acc = dist.build_accelerator(cfg, str(self.run_dir))
        _setup_logging(self.acc)
        if choice.warning:
            log.warning(choice.warning)
        wanted = resume.resume_choice(cfg, self.run_dir)
        resume.check_run_dir(cfg, self.run_dir, wanted, self.acc.is_main_process)
        self.lock = lock.take(self.run_dir, self.acc.is_main_process)   # one writer a folder
        try:
            self._build(wanted, choice.reason)
        except BaseException:
            self.lock.release()
            if new_folder and self.acc.is_main_process and self.run_dir.is_dir() and \
                    not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()                # a set-up that failed leaves no folder
            raise

    def _build(self, wanted: str | None, precision_reason: str) -> None:
        cfg = self.cfg
        # which checkpoint, before anything is built (a wrong train.resume fails at once)
        found = checkpoint.find(self.run_dir, wanted) if wanted else None
        torch.manual_seed(cfg.train.seed)              # same initial weights on every rank
        self.tokenizer = load_tokenizer(cfg)
        self.meta = read_meta(cfg.data.shards)
        with dist.plain_init(self.acc):
            model = self._build_model()
        self.recipe = Recipe(cfg, self.tokenizer)
        self.loader = TrainLoader(cfg.data.shards, self.tokenizer, self._loader_cfg(),
                                  rank=self.acc.process_index, world_size=self.acc.num_processes)
        self.steps_per_epoch = self.loader.num_batches // cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.loader.num_batches} batches per rank, fewer "
                             f"than optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.model, self.optimizer = self.acc.prepare(model, self._optimizer(model))
        dist.register_external_parameters(self.acc, self.model)
        self.ema = self._build_ema()
        self.stepper = Stepper(cfg, self.acc, self.model, self.optimizer, self.ema)
        self.weighting = (ConsensusWeighting(cfg.recipe.weighting, cfg.train.seed,
                                             self.meta.get("options", {}).get("noise_rate", 0.0),
                                             self.meta.get("format", ""))
                          if cfg.recipe.weighting.kind == "consensus" else None)
        self.outputs = Outputs(cfg, self.acc, self.run_dir, self.tokenizer,
                               model.encoder.clip.config, self.meta)
        self.stopper = collective.StopAgreement(cfg.train.collective_timeout_s)
        self.state, notes = TrainState(), None
        self.data_problems = {}                   # the loader's counts so far, every rank's
        if found:
            self.state, notes = resume.resume(self.acc, cfg, self.run_dir, found, self.ema,
                                              self.layout())
        self.state.layout = self.layout()
        self.monitor = Monitor(self.acc, self.run_dir, self.total_steps, self.state.step)
        self.monitor.open_run(cfg, self.meta, self._summary(precision_reason), self.run_dir, notes)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict:
        cfg, s = self.cfg, self.state
        while s.epoch < cfg.train.epochs and not self._done():
            t0 = time.time()
            # a resumed epoch keeps the weights it started with (they are in the checkpoint)
            if s.batch_in_epoch == 0 and self.weighting and self.weighting.wants_scores(s.epoch):
                batches = (self.recipe.division_batch(self.to_device(b), s.epoch)
                           for b in self.loader.epoch(s.epoch))
                logs = self.weighting.update(self.model, batches, epoch=s.epoch,
                                             tau=self.tau(s.step), plot_dir=self.run_dir / "ccd")
                self.monitor.log("epoch_start", epoch=s.epoch, step=s.step, **logs)
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
            if self.outputs.wants_evaluation(s.epoch):
                self.outputs.evaluate_epoch(self.model, s, self.monitor)
            self._save_checkpoint()
        self.stopper.close()
        report = self.outputs.finish(self.model, s, self.monitor, self.data_problems)
        self.monitor.close()
        collective.barrier()                      # no rank leaves while another still works
        self.acc.end_training()
        return report

    def _train_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        self.model.train()
        sums = LoggedSums()
        for batch in self.loader.epoch(s.epoch, s.batch_in_epoch):
            out, lr, info, applied = self.train_step(self.to_device(batch))
            sums.add(out)                    # stays on the device until a logging step
            s.batch_in_epoch += 1
            s.samples_seen += batch["pid"].shape[0] * self.acc.num_processes
            if not self.acc.sync_gradients:
                continue
            s.step += 1
            if applied:
                sums.commit()
            else:
                sums.discard()
            self.stepper.count(applied, s.step, s.epoch, self.monitor)
            if s.step % cfg.train.log_every_steps == 0 or self._done():
                self._log_step(sums, lr, info)
                sums = LoggedSums()
            if cfg.train.ckpt_every_steps and s.step % cfg.train.ckpt_every_steps == 0:
                self._save_checkpoint()
            # every rank's stop request of the previous step, agreed without waiting
            if self.stopper.poll(signals.stop_requested()):
                self._stop()
            if self._done():
                break
        self.data_problems = self._data_problems()
        if any(self.data_problems.values()):
            self.monitor.log("data", echo=True, epoch=s.epoch, **self.data_problems)

    def train_step(self, batch: dict, mark=None):
        """One micro-batch (trainer/running/stepping.py); `mark(phase)`, for benchmarks.
        Returns (the recipe's outputs, the learning rate, the StepInfo, whether the step's
        update was applied: None between accumulation boundaries)."""
        lr = set_lr(self.optimizer, self.cfg.optim.lr, self.lr_factor(self.state.step))
        info = self.step_info()
        out, applied = self.stepper.step(self.recipe.train_losses, batch, info, self.state.step,
                                         mark or (lambda phase: None))
        return out, lr, info, applied

    # -- per-step values ---------------------------------------------------------------------

    def tau(self, step: int) -> float:
        return tau_at(self.cfg, self.steps_per_epoch, step)

    def lr_factor(self, step: int) -> float:
        return resume.lr_at(self.cfg, {"steps_per_epoch": self.steps_per_epoch,
                                       "total_steps": self.total_steps}, step)

    def step_info(self) -> StepInfo:
        s = self.state
        gen = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, self.acc.process_index,
                                                    s.epoch, s.batch_in_epoch))
        return StepInfo(epoch=s.epoch, step=s.step, tau=self.tau(s.step), generator=gen,
                        momentum_model=None if self.ema is None else self.ema.module)

    def to_device(self, batch: dict) -> dict:
        """The loader's CPU batch on the training device, with the longest caption's length
        read on the host (so the text encoder need not read it back from the device)."""
        ids = batch["input_ids"]
        eot = ids == self.tokenizer.eot_id
        if not bool(eot.any(dim=1).all()):
            raise ValueError("a caption has no end-of-text token; re-shard with this tokenizer")
        length = int(eot.int().argmax(dim=1).max()) + 1
        return {**prepare_batch(batch, self.acc.device), "text_length": length}

    def unwrap(self):
        return dist.unwrap(self.model)

    def layout(self) -> dict:
        return resume.run_layout(self.cfg, self.acc, batches_per_epoch=self.loader.num_batches,
                                 steps_per_epoch=self.steps_per_epoch,
                                 total_steps=self.total_steps)

    # -- set-up and bookkeeping -----------------------------------------------------------------

    def _loader_cfg(self) -> LoaderConfig:
        d, m = self.cfg.data, self.cfg.model
        augment = TrainAugment(pad=d.crop_pad, erase_p=d.erase_prob) if d.augment else None
        return LoaderConfig(batch_size=micro_batch(self.cfg, self.acc.num_processes),
                            image_size=tuple(m.image_size),
                            num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                            seed=self.cfg.train.seed, augment=augment)

    def _build_model(self):
        return build_model(self.cfg, self.tokenizer, self.meta["num_classes"],
                           self.meta["splits"]["train"]["num_samples"])

    def _optimizer(self, model):
        """Adam(W) over the per-module groups; DeepSpeed's CPU Adam where ZeRO offloads the
        optimizer state to the CPU."""
        if not dist.offloads_optimizer(self.acc):
            return build_optimizer(model, self.cfg)
        o = self.cfg.optim
        return dist.cpu_adam(param_groups(model, self.cfg), lr=o.lr, betas=o.betas, eps=o.eps,
                             adamw=o.optimizer == "adamw")

    def _build_ema(self):
        e = self.cfg.ema
        if not self.cfg.needs_momentum():
            return None
        modules = tuple(dict.fromkeys(momentum_modules(self.cfg) + tuple(e.modules)))
        return ShardedEMA(self.acc, self.model, factory=self._build_model, modules=modules,
                          momentum=e.momentum, momentum_end=e.momentum_end,
                          total_steps=self.total_steps, refresh_every=e.refresh_every)

    def _summary(self, precision_reason: str) -> dict:
        c = self.cfg
        return {"run": dist.describe(self.acc), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "select_split": self.outputs.select_split,
                "global_batch": c.data.batch_size,
                "micro_batch": micro_batch(c, self.acc.num_processes),
                "num_classes": self.meta["num_classes"], "vocab_size": self.tokenizer.vocab_size,
                "precision_reason": precision_reason,
                **({"division": self.weighting.gmm_reason} if self.weighting else {}),
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())}

    def _log_step(self, sums: LoggedSums, lr: float, info: StepInfo) -> None:
        self.lock.touch()
        if not sums.count:
            return
        s = self.state
        values = sums.mean_over_ranks()
        values.update(lr=lr, tau=info.tau, epoch=s.epoch,
                      samples_per_s=self.monitor.rate(s.samples_seen))
        if self.ema is not None:
            values["ema_momentum"] = self.ema.momentum(s.step - 1)
        self.monitor.step(s.step, values)

    def _data_problems(self) -> dict:
        """The loader's counts so far (corrupt shards, bad samples and images, padded samples),
        summed over the ranks: a problem counts whichever rank met it."""
        every = collective.all_gather_object(self.loader.stats.snapshot())
        return {k: sum(d[k] for d in every) for k in every[0]}

    def _done(self) -> bool:
        return self.state.step >= self.total_steps

    def _save_checkpoint(self) -> Path:
        check_weights(self.model, "a checkpoint", self.run_dir, self.state.step)
        self.lock.touch()
        self.state.layout = self.layout()
        return checkpoint.save(self.acc, self.run_dir, self.state, self.cfg.train.keep_checkpoints,
                               self.ema, describe=self.outputs.describe)

    def _stop(self) -> None:
        s = self.state
        path = self._save_checkpoint()
        self.stopper.close()
        self.monitor.log("stopped", echo=True, step=s.step, epoch=s.epoch, checkpoint=str(path))
        self.monitor.close()
        raise Stopped(f"stopped on request at step {s.step} (epoch {s.epoch}, batch "
                      f"{s.batch_in_epoch}); checkpoint {path}; continue with the same command "
                      "and train.resume=latest")


def _setup_logging(acc) -> None:
    level = logging.INFO if acc.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    dist.quiet_third_party()


def _main(argv) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.dry_run:
        from tbps.trainer.running import plan  # kept off a training run's start-up

        return plan.dry_run(args.config, parse_overrides(rest), launch_file=args.launch,
                            gpu_memory_gib=args.gpu_memory)
    if args.launch or args.gpu_memory:
        raise ValueError("--launch and --gpu-memory go with --dry-run")
    Run(load_config(args.config, parse_overrides(rest))).fit()
    return 0


def main(argv=None) -> int:
    signals.follow_launcher()
    signals.catch_stop_signals()
    code = errors.guard(lambda: _main(argv), timeout_field="train.collective_timeout_s",
                        on_stop="continue with the same command and train.resume=latest",
                        deferred=True)
    return signals.exit_code(code, same_on_every_rank=not errors.LAST["rank_specific"],
                             message=errors.LAST["message"])


def command(argv=None) -> int:
    """`tbps train` and `python -m tbps.trainer.train`: main, then deaf to stop requests."""
    code = main(argv)
    signals.ignore_stop_requests()            # the work is over: a late request must not kill
    return code


if __name__ == "__main__":
    sys.exit(command())
