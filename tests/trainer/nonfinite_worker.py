"""Run under `accelerate launch` by tests/trainer/test_faults.py: the trainer on the tiny shards
for 6 steps, rank 1 alone getting a NaN loss at step 3; every rank prints, per step, whether
the update was applied and whether its weights changed.

    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml \\
        tests/trainer/nonfinite_worker.py SHARDS OUT
"""
import sys

import torch

from tbps.trainer.common.config_files import load_config
from tbps.trainer.train import Run
from tests.trainer.conftest import REPO, TINY_MODEL


def main(shards: str, out: str) -> None:
    cfg = load_config(REPO / "launch/configs/irra_synth.yaml", [
        f"data.shards={shards}", f"train.output_dir={out}", *TINY_MODEL, "train.max_steps=6",
        "eval.select_split=none", "eval.final_split=none"])
    run = Run(cfg)
    rank = torch.distributed.get_rank()
    forward, step = run.model.forward, run.train_step

    def poisoned(entry, *args):
        out = forward(entry, *args)
        if entry == run.recipe.train_losses and run.state.step + 1 == 3 and rank == 1:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    def watched(batch, mark=None):
        before = [p.detach().clone() for p in run.model.parameters()]
        result = step(batch, mark)
        changed = any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
        print(f"rank {rank} step {run.state.step + 1} applied {result[3]} changed {changed}",
              flush=True)
        return result

    run.model.forward, run.train_step = poisoned, watched
    run.fit()


if __name__ == "__main__":
    main(*sys.argv[1:3])
