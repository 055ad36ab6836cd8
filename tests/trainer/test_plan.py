"""The dry run (`tbps train --dry-run`): its plan, its checks, and its memory
estimate against what a small model really holds."""
import json

import pytest
import torch

from tbps.trainer.common.config_files import load_config
from tbps.trainer.running import plan
from tbps.trainer.train import main
from tests.trainer.conftest import REPO, TINY_MODEL

CONFIG = str(REPO / "launch/configs/irra_synth.yaml")


def _dry(capsys, tiny_shards, *extra, launch="cpu_ddp.yaml", out=None):
    args = ["--dry-run", "--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
            f"train.output_dir={out or 'never-written'}", *extra]
    if launch:
        args += ["--launch", str(REPO / "launch/accelerate" / launch)]
    code = main(args)
    out_err = capsys.readouterr()
    return code, out_err.out, out_err.err


def test_the_plan_of_a_two_rank_run(capsys, tiny_shards, tmp_path):
    code, out, err = _dry(capsys, tiny_shards, "train.epochs=3", out=tmp_path / "run")
    assert code == 0, err
    for line in ("world size    2 = 1 machine(s) x 2 process(es)",
                 "global batch  32 = 16 a rank x 2 x accumulation 1",
                 "steps         10 an epoch x 3 epochs = 30",
                 "precision     train.precision=fp32 as set",
                 f"checkpoints   {tmp_path / 'run' / 'checkpoints'}/ every epoch, 2 kept"):
        assert line in out, out
    assert "ok    shards" in out and "ok    tokenizer" in out and "activations" in out
    assert not (tmp_path / "run").exists()                  # nothing trained, nothing written


def test_the_plan_under_zero3_with_offload(capsys, tiny_shards):
    code, out, err = _dry(capsys, tiny_shards, "data.batch_size=32", "train.precision=auto",
                          launch="gpu_zero3_offload.yaml")
    assert code == 0, err
    assert "global batch  32 = 4 a rank x 8 x accumulation 1" in out
    assert "DeepSpeed ZeRO-3, optimizer and parameters offloaded to the CPU" in out
    assert "cpu optimizer" in out and "cpu weights" in out
    assert "auto: bf16 on GPUs with bf16" in out


@pytest.mark.parametrize("extra, launch, message", [
    (["data.num_workers=2"], "gpu_ddp.yaml",
     "10 train shards for 8 ranks x 2 loader workers = 16 readers"),
    (["data.batch_size=512"], "gpu_ddp.yaml", "fewer than one global batch of 512"),
    (["data.batch_size=36"], "gpu_ddp.yaml", "36 (the global batch) does not split into whole "
     "micro-batches of at least 2 over 8 rank(s) x accumulation 1; use a multiple of 8 such as 32"),
])
def test_the_dry_run_names_what_would_fail(capsys, tiny_shards, extra, launch, message):
    code, out, err = _dry(capsys, tiny_shards, *extra, launch=launch)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_deepspeed_json_with_an_unfilled_auto_field(capsys, tiny_shards, tmp_path):
    ds = json.loads((REPO / "launch/deepspeed/zero2.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = "auto"
    ds["optimizer"] = {"type": "AdamW"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "acc.yaml").write_text(
        "distributed_type: DEEPSPEED\nnum_processes: 2\nnum_machines: 1\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n")
    args = ["--dry-run", "--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
            "--launch", str(tmp_path / "acc.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "zero_optimization.reduce_bucket_size is \"auto\", which nothing fills" in err
    assert "a 'optimizer' section" in err


def test_memory_estimate_against_a_measured_model(tiny_shards):
    """Weights, gradients and Adam's state of a real step (one process, fp32, the momentum
    model on) against the estimate; activations at the configured batch against the
    extrapolation from micro-batches 1 and 2."""
    cfg = load_config(CONFIG, [f"data.shards={tiny_shards}", *TINY_MODEL, "ema.modules=[encoder]"])
    lay = plan.Layout()
    _, meta = plan.check_shards(cfg, lay)
    tok = plan.check_tokenizer(cfg)
    model = plan.build_for_plan(cfg, tok, meta)
    ema, ema_params = plan._ema(cfg, model, {"precision": "fp32"})
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = plan.synthetic_batch(cfg, tok, cfg.data.batch_size)
    from tbps.trainer.recipe.step import Recipe, StepInfo

    out = model(Recipe(cfg, tok).train_losses, batch,
                StepInfo(epoch=0, step=0, tau=0.05, momentum_model=ema.module,
                         generator=torch.Generator().manual_seed(0)))
    out["loss"].backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)     # noqa: E731
    measured = {
        "weights": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": nbytes(v for s in opt.state.values() for v in s.values() if v.dim()),
        "ema": ema.stored_bytes() + nbytes(ema.module.parameters()),
    }
    P = sum(p.numel() for p in model.parameters())
    act = plan.activation_estimate(model, cfg, tok, torch.float32, ema)
    est = plan.memory_estimate(params=P, ema_params=ema_params, world=1, zero_stage=0,
                               precision="fp32", activations=act["bytes"])
    for key, value in measured.items():
        assert est[key] == pytest.approx(value, rel=0.01), key
    at_batch = plan.saved_bytes(model, cfg, tok, cfg.data.batch_size, torch.float32, ema)
    assert act["bytes"] + act["fixed"] == pytest.approx(at_batch, rel=0.1)
    # the sharded layouts divide what they should
    z2 = plan.memory_estimate(params=P, ema_params=0, world=8, zero_stage=2, precision="bf16")
    z3 = plan.memory_estimate(params=P, ema_params=0, world=8, zero_stage=3, precision="bf16")
    assert z2["weights"] == 2 * P and z2["gradients"] == 2 * P // 8
    assert z2["optimizer"] == z3["optimizer"] == 12 * P // 8 and z3["weights"] < 2 * P
