"""ITM re-ranking on 2 ranks (tests/trainer/test_rerank.py): rank 0 writes the evaluation.

    python -m accelerate.commands.launch --config_file launch/accelerate/cpu_zero3.yaml \\
        tests/trainer/rerank_worker.py OUT_DIR SHARDS
"""
import json
import sys
from pathlib import Path

import torch

from tbps.data_pipeline.manifest import read_meta
from tbps.trainer.common import collective, dist
from tbps.trainer.common.config_files import load_config
from tbps.trainer.inference.evaluate import evaluate
from tbps.trainer.model.weights import build_model, load_tokenizer

OVERRIDES = ["method=aga", "eval.itm_rerank=12", "model.vision_width=32", "model.text_width=32",
             "model.embed_dim=32", "model.vision_layers=1", "model.text_layers=1",
             "model.vision_heads=2", "model.text_heads=2", "model.cross_heads=2",
             "data.num_workers=0", "data.eval_batch_size=16", "train.precision=fp32",
             "train.tensorboard=false"]


def model_for(shards: str, out_dir: str = "unused"):
    cfg = load_config(None, OVERRIDES + [f"data.shards={shards}", f"train.output_dir={out_dir}"])
    tok = load_tokenizer(cfg)
    meta = read_meta(shards)
    torch.manual_seed(0)
    return cfg, tok, lambda: build_model(cfg, tok, meta["num_classes"],
                                         meta["splits"]["train"]["num_samples"])


def main(out_dir: str, shards: str) -> None:
    cfg, tok, factory = model_for(shards, out_dir)
    acc = dist.build_accelerator(cfg, out_dir)
    with dist.plain_init(acc):
        model = factory()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, _ = acc.prepare(model, optimizer)
    dist.register_external_parameters(acc, model)
    result = evaluate(model, cfg, tok, "test", acc.device)
    if collective.rank() == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
