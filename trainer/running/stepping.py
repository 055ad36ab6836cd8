"""One optimizer step of the loop: forward, backward, the finite check, clipping, the update and
the EMA, and the policy for steps whose loss was not finite.

A step whose loss is not finite on some rank is skipped on every rank (no update at all);
train.max_nonfinite_steps in a row stop the run with a message. Weights that became non-finite
are never written (`check_weights` before every checkpoint and weights folder): the run ends with
exit 1 naming the last checkpoint, all of whose weights were checked. Under DeepSpeed its engine has
already decided inside backward (it skips a step whose gradients are not finite and agrees
across ranks); otherwise one all-reduce of a flag and one host read per optimizer step.
"""
from __future__ import annotations

import torch

from tbps.trainer.common import collective, dist
from tbps.trainer.common.errors import TrainingFault
from tbps.trainer.running import checkpoint


class Stepper:
    def __init__(self, cfg, acc, model, optimizer, ema):
        self.cfg, self.acc, self.model, self.optimizer, self.ema = cfg, acc, model, optimizer, ema
        self._nonfinite = None             # device flag: a loss of this step was not finite
        self.skipped_in_a_row = 0

    def step(self, entry, batch: dict, info, step: int, mark) -> tuple[dict, bool | None]:
        """One micro-batch through `model(entry, batch, info)`; at an accumulation boundary also
        the update and the EMA's (unless a loss was not finite on some rank). `mark(phase)` is
        called after "forward", "backward", "optimizer", "ema". Returns (the entry's outputs,
        whether the update was applied: None between accumulation boundaries)."""
        acc, applied = self.acc, None
        with acc.accumulate(self.model):
            out = self.model(entry, batch, info)
            bad = ~torch.isfinite(out["loss"].detach())     # on the device: no host read here
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            mark("forward")
            acc.backward(out["loss"])           # DeepSpeed also steps here (at a boundary)
            mark("backward")
            if acc.sync_gradients:
                applied = self._all_finite()
                if applied and self.cfg.optim.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
                if applied:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        if applied and self.ema is not None:
            self.ema.update(step)
            mark("ema")
        return out, applied

    def _all_finite(self) -> bool:
        flag, self._nonfinite = self._nonfinite, None
        if dist.zero_stage(self.acc) or dist.using_deepspeed():
            skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
            return not skipped or self.cfg.train.precision == "fp16"   # fp16: loss scaling
        return not collective.any_rank(flag)

    def count(self, applied: bool, step: int, epoch: int, monitor) -> None:
        """After an optimizer step: a skipped one is logged; too many in a row stop the run."""
        if applied:
            self.skipped_in_a_row = 0
            return
        k = self.cfg.train.max_nonfinite_steps
        self.skipped_in_a_row += 1
        monitor.log("skipped", echo=True, step=step, epoch=epoch, in_a_row=self.skipped_in_a_row,
                    reason="the loss was not finite on at least one rank: no update")
        if self.skipped_in_a_row >= k:
            raise FloatingPointError(
                f"the loss was not finite in {k} steps in a row (steps {step - k + 1}-{step}, "
                f"epoch {epoch}; train.max_nonfinite_steps={k}); the weights were not updated by "
                "them. Lower optim.lr, use train.precision=fp32, or check the data; continue from "
                "the last checkpoint with train.resume=latest")


@torch.no_grad()
def weights_finite(model) -> bool:
    """Whether every parameter is finite on every rank: each rank checks what it holds (its
    ZeRO-3 partition, else the parameter); one all-reduce."""
    params = list(model.parameters())
    bad = torch.zeros((), dtype=torch.bool, device=params[0].device if params else "cpu")
    for p in params:
        held = getattr(p, "ds_tensor", None)
        held = p if held is None else held
        if held.is_floating_point() and held.numel():
            bad |= ~torch.isfinite(held).all()
    return not collective.any_rank(bad)


def check_weights(model, what: str, run_dir, step: int) -> None:
    """Refuse to write `what` from non-finite weights (TrainingFault: exit 1)."""
    if weights_finite(model):
        return
    good = checkpoint.newest(run_dir)
    raise TrainingFault(
        f"the weights hold non-finite values at step {step}: {what} is not written (nor any "
        "later result). The last checkpoint, whose weights were finite: "
        f"{good or 'none yet'}. Lower optim.lr, use train.precision=fp32 or check the data, then "
        + (f"continue with train.resume={good}" if good else "start the run again"))
