"""One training step of a recipe on 2 ranks, for tests/trainer/test_parts_distributed.py.

    python -m accelerate.commands.launch --config_file launch/accelerate/cpu_zero3.yaml \\
        tests/trainer/parts_worker.py OUT_DIR TOKENIZER_DIR OVERRIDE ...

Builds the tiny model of `setup()`, prepares it (DDP or DeepSpeed ZeRO), builds the momentum
model the recipe's parts need (trainer/running/ema.py, sharded), splits the global batch of `batch()`
by rank and runs one step through the model's forward. Rank 0 writes OUT_DIR/result.pt: the
loss and the logged terms averaged over ranks, every parameter's full gradient, and the ITM
hard negatives each rank drew (with their identities). `reference()` is the same step in one
process, with a plain copy of the model as the momentum model.
"""
import copy
import sys
from pathlib import Path

import torch

from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.trainer.common import collective, dist
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.weights import build_model
from tbps.trainer.recipe import losses
from tbps.trainer.recipe.momentum import momentum_modules
from tbps.trainer.recipe.step import Recipe, StepInfo

B = 4            # per rank
SMALL = ["model.image_size=[32, 16]", "model.vision_width=32", "model.text_width=32",
         "model.embed_dim=16", "model.vision_layers=2", "model.text_layers=2",
         "model.vision_heads=2", "model.text_heads=2", "model.context_length=16",
         "model.cross_heads=2", "train.precision=fp32", "train.tensorboard=false",
         "loss.tau_start=null", "loss.tau=0.1"]
CAPTIONS = ["a woman in a red coat carrying a black backpack", "the man wears blue jeans",
            "a man with a green bag", "a woman in red shoes and a white shirt"]


def setup(tok_dir, overrides, out_dir="unused"):
    cfg = load_config(None, SMALL + list(overrides) + [f"train.output_dir={out_dir}"])
    tok = CaptionTokenizer.from_pretrained(tok_dir, context_length=16)
    return cfg, tok


def factory(cfg, tok):
    return build_model(cfg, tok, num_classes=2, num_samples=2 * B)


def batch(tok) -> dict:
    """The global batch: rank 0 holds identity 0 only and rank 1 identity 1 only, so every hard
    negative of an ITM pair must come from the other rank."""
    g = torch.Generator().manual_seed(5)
    return {"image": torch.randn(2 * B, 3, 32, 16, generator=g),
            "input_ids": torch.from_numpy(tok.encode_batch([CAPTIONS[i % 4]
                                                            for i in range(2 * B)])),
            "pid": torch.tensor([0] * B + [1] * B), "index": torch.arange(2 * B)}


def step_info(momentum) -> StepInfo:
    return StepInfo(epoch=1, step=3, tau=0.1, generator=torch.Generator().manual_seed(0),
                    momentum_model=momentum)


class Recorder:
    """Wraps losses.itm_negatives to keep each call's picks and whether they were found."""

    def __init__(self):
        self.calls, self.inner = [], losses.itm_negatives

    def __call__(self, query, keys, pid, key_ids, **kw):
        picks, found = self.inner(query, keys, pid, key_ids, **kw)
        self.calls.append({"pid": pid.clone(), "picked_ids": key_ids[picks].clone(),
                           "found": found.clone()})
        return picks, found


def reference(tok_dir, overrides) -> dict:
    """The same step in one process on the whole batch."""
    cfg, tok = setup(tok_dir, overrides)
    torch.manual_seed(0)
    model = factory(cfg, tok)
    momentum = copy.deepcopy(model).eval()
    out = model(Recipe(cfg, tok).train_losses, batch(tok), step_info(momentum))
    out["loss"].backward()
    return {"values": {k: float(v.detach()) for k, v in out.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None}}


def full_grad(param) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    return None if grad is None else grad.float().clone()


def main(out_dir: str, tok_dir: str, *overrides: str) -> None:
    from tbps.trainer.running.ema import ShardedEMA

    out = Path(out_dir)
    cfg, tok = setup(tok_dir, overrides, out_dir)
    acc = dist.build_accelerator(cfg, str(out))
    torch.manual_seed(0)
    with dist.plain_init(acc):
        model = factory(cfg, tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    dist.register_external_parameters(acc, model)
    ema = None
    if cfg.needs_momentum():
        ema = ShardedEMA(acc, model, factory=lambda: factory(cfg, tok),
                         modules=momentum_modules(cfg), momentum=0.995)
    recorder = Recorder()
    losses.itm_negatives = recorder
    r = collective.rank()
    local = {k: v[r * B:(r + 1) * B].to(acc.device) for k, v in batch(tok).items()}
    result = model(Recipe(cfg, tok).train_losses, local,
                   step_info(None if ema is None else ema.module))
    acc.backward(result["loss"])
    values = torch.stack([result[k].detach().float() for k in sorted(result)])
    torch.distributed.all_reduce(values)
    online = acc.unwrap_model(model)
    if dist.zero_stage(acc):
        grads = {n: full_grad(p) for n, p in online.named_parameters()}
    else:
        grads = {n: None if p.grad is None else p.grad.clone()
                 for n, p in online.named_parameters()}
    picks = collective.all_gather_object(recorder.calls)
    if r == 0:
        torch.save({"values": dict(zip(sorted(result), (values / 2).tolist())),
                    "grads": {n: g for n, g in grads.items() if g is not None},
                    "itm_calls": picks, "stage": dist.zero_stage(acc),
                    "ema_kind": None if ema is None else ema.kind}, out / "result.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
