"""Run under `accelerate launch` by tests/trainer/test_ema.py (or alone, for world size 1).

    python -m accelerate.commands.launch --config_file launch/accelerate/cpu_zero3.yaml \
        tests/trainer/ema_worker.py OUT_DIR TOKENIZER_DIR {fresh|resume}

Trains a tiny model for STEPS steps and keeps, besides the sharded EMA of its encoder, an
unsharded fp32 reference EMA built from the full fp32 parameters (gathered every step: what the
sharded EMA avoids). `fresh` checkpoints at step RESUME_AT and writes the EMA at the end;
`resume` restarts from that checkpoint and must end with the same EMA. Rank 0 writes
OUT_DIR/<mode>.json.
"""
import json
import sys
from pathlib import Path

import torch

from tbps.data_pipeline.tokenizer import PROBE, CaptionTokenizer
from tbps.trainer.common import collective, dist
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.retrieval import features
from tbps.trainer.model.weights import build_model
from tbps.trainer.recipe.step import Recipe, StepInfo
from tbps.trainer.running.ema import ShardedEMA

STEPS, RESUME_AT, B = 6, 3, 4
OVERRIDES = ["model.image_size=[32, 16]", "model.vision_width=32", "model.text_width=32",
             "model.embed_dim=16", "model.vision_layers=1", "model.text_layers=1",
             "model.vision_heads=2", "model.text_heads=2", "model.cross_layers=1",
             "model.cross_heads=2", "model.context_length=16", "train.precision=fp32",
             "optim.grad_clip=null", "train.tensorboard=false"]
CAPTIONS = [PROBE, "the man wears blue jeans", "a man with a green bag", "a woman in red"]


def full_fp32(param) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return (param.detach() if value is None else value).float().clone()


def batch_for(step: int, tok) -> dict:
    g = torch.Generator().manual_seed(1000 * step + collective.rank())
    return {"image": torch.randn(B, 3, 32, 16, generator=g),
            "input_ids": torch.from_numpy(tok.encode_batch([CAPTIONS[(step + i) % 4]
                                                            for i in range(B)])),
            "pid": torch.randint(0, 3, (B,), generator=g)}


def main(out_dir: str, tok_dir: str, mode: str) -> None:
    out = Path(out_dir)
    cfg = load_config(None, OVERRIDES + [f"train.output_dir={out}"])
    acc = dist.build_accelerator(cfg, str(out))
    tok = CaptionTokenizer.from_pretrained(tok_dir, context_length=16)

    def factory():
        return build_model(cfg, tok, num_classes=3, num_samples=16)

    torch.manual_seed(0)
    with dist.plain_init(acc):
        model = factory()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model, optimizer = acc.prepare(model, optimizer)
    dist.register_external_parameters(acc, model)
    ema = ShardedEMA(acc, model, factory=factory, modules=("encoder",), momentum=0.6,
                     momentum_end=0.9, total_steps=STEPS)
    online = acc.unwrap_model(model)
    names = [n for n, _ in online.named_parameters() if n.startswith("encoder.")]
    reference = {n: full_fp32(p) for n, p in online.named_parameters() if n in names}
    first = 0
    if mode == "resume":
        acc.load_state(str(out / "ckpt"))
        ema.load_state_dict(torch.load(out / f"ema-{collective.rank()}.pt", weights_only=True))
        first = RESUME_AT
    for step in range(first, STEPS):
        batch = {k: v.to(acc.device) for k, v in batch_for(step, tok).items()}
        loss = model(Recipe(cfg, tok).train_losses, batch,
                     StepInfo(0, step, 0.1, torch.Generator()))["loss"]
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        m = ema.update(step)
        params = dict(online.named_parameters())
        for n in names:
            reference[n].mul_(m).add_(full_fp32(params[n]), alpha=1 - m)
        if mode == "fresh" and step + 1 == RESUME_AT:
            acc.save_state(str(out / "ckpt"))
            torch.save(ema.state_dict(), out / f"ema-{collective.rank()}.pt")
    gathered = ema.full_state_dict()
    sharded_bytes = collective.all_gather_object(ema.stored_bytes())
    # the EMA forward against a plain model holding the reference EMA
    probe = {k: v.to(acc.device) for k, v in batch_for(99, tok).items()}
    img, txt = ema(features, probe)
    with dist.plain_init(acc):
        plain = factory()
    plain.load_state_dict(reference, strict=False)          # the encoder: all "features" needs
    with torch.no_grad():
        ref_img, ref_txt = plain.to(acc.device).eval()(features, probe)
    result = {
        "kind": ema.kind, "world": collective.world_size(),
        "ema_vs_reference": max(float((gathered[n] - reference[n]).abs().max()) for n in names),
        "moved": max(float((reference[n] - full_fp32(dict(online.named_parameters())[n])).abs().max())
                     for n in names),
        "sharded_bytes": sharded_bytes, "reference_bytes": 4 * sum(v.numel() for v in reference.values()),
        "forward_image": float((img.embeds_BE.float() - ref_img.embeds_BE).abs().max()),
        "forward_text": float((txt.embeds_BE.float() - ref_txt.embeds_BE).abs().max()),
        "forward_scale": float(ref_img.embeds_BE.abs().max()),
    }
    if collective.rank() == 0:
        torch.save(gathered, out / f"{mode}-ema.pt")
        (out / f"{mode}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
