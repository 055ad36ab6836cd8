"""Time the real training step on synthetic tensors, the fused kernels against their eager
references, side by side. A measuring script: nothing in the package imports it.

    tbps bench step-kernels --out runs/step                 # a GPU: ViT-B/16, IRRA and RDE
    tbps bench step-kernels --tiny --precision fp32 --out runs/step   # CPU: that it runs

The model is the project's own (tbps.trainer.model.weights.build_model) from launch/configs/<preset>.yaml with
model.pretrained unset and ViT-B/16's sizes (patch 16, vision 768 x 12 layers x 12 heads, text
512 x 12 x 8, embeddings 512, 384x128 images, 77 tokens; a 49,408-token vocabulary), random
weights of the real shapes, nothing downloaded. Per preset and impl ("kernels": the Triton
kernels, run by the interpreter on CPU when TRITON_INTERPRET=1; "reference": impl="reference",
eager PyTorch), from the same initial weights and the same
synthetic batch (batch 64, captions of 20-60 tokens, about two samples per identity): warm-up
steps, then timed steps of forward + backward + optimizer step under bf16 autocast (what
accelerate's bf16 mixed precision does). Reported per row: samples/s, ms per step (p20/p50/p80),
peak memory, the share of the step in the similarity losses and in the token selection (events
recorded when their forward starts and ends and when their backward starts and ends), the dtype
the losses receive, and the first step's loss (the two impls must agree). One process, one
device: the keys are the local batch (N = 64). Writes step.json, prints a table and one JSON line.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from tbps.kernels import similarity_loss as similarity_module
from tbps.kernels import topk_select as topk_module
from tbps.kernels._dispatch import interpreting
from tbps.kernels.bench import environment

VIT_B16 = ["model.pretrained=null", "model.image_size=[384,128]", "model.patch_size=16",
           "model.vision_width=768", "model.vision_layers=12", "model.vision_heads=12",
           "model.text_width=512", "model.text_layers=12", "model.text_heads=8",
           "model.embed_dim=512", "model.context_length=77"]
TINY = ["model.pretrained=null", "model.image_size=[64,32]", "model.patch_size=8",
        "model.vision_width=64", "model.vision_layers=1", "model.vision_heads=2",
        "model.text_width=64", "model.text_layers=1", "model.text_heads=2", "model.embed_dim=64",
        "model.context_length=16", "model.cross_layers=1", "model.cross_heads=2",
        "recipe.tse.dim=64"]
OPS = {"similarity": ("similarity_loss", "bidirectional_similarity_loss"),
       "selection": ("topk_select",)}


class Vocabulary:
    """What build_model reads of a tokenizer: sizes and special ids (the word-level layout)."""

    def __init__(self, size: int):
        self.vocab_size, self.pad_id, self.unk_id, self.mask_id = size, 0, 1, 2
        self.sot_id, self.eot_id = 3, 4
        self.special_ids = [0, 1, 2, 3, 4]


class Clock:
    """Timestamps: recorded CUDA events on a GPU, wall-clock seconds on CPU (synchronous)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)


class _Mark(torch.autograd.Function):
    """Identity on tensors that stamps the clock when its forward runs and when its backward runs."""

    @staticmethod
    def forward(ctx, stamps, key, *xs):
        ctx.stamps, ctx.key = stamps, key
        stamps.append((key, "fwd", stamps.clock.now()))
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.stamps.append((ctx.key, "bwd", ctx.stamps.clock.now()))
        return (None, None, *grads)


class Stamps(list):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.dtypes = {region: set() for region in OPS}

    def region_ms(self, name: str) -> float:
        """Forward (first input stamp to output stamp) plus backward (output's backward stamp to
        the inputs' backward stamp) of every call of region `name`."""
        by_call = {}
        for (region, call, side), phase, t in self:
            if region == name:
                by_call.setdefault(call, {})[(side, phase)] = t
        total = 0.0
        for s in by_call.values():
            if ("in", "fwd") in s and ("out", "fwd") in s:
                total += self.clock.ms(s[("in", "fwd")], s[("out", "fwd")])
            if ("out", "bwd") in s and ("in", "bwd") in s:
                total += self.clock.ms(s[("out", "bwd")], s[("in", "bwd")])
        return total


def timed(fn, region: str, stamps: Stamps, impl: str):
    """fn with its differentiable tensor arguments and results marked, and impl forced."""
    def wrapper(*args, **kwargs):
        call = len(stamps)
        kwargs.setdefault("impl", impl)
        grad_args = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
        args = list(args)
        stamps.dtypes[region] |= {str(a.dtype).replace("torch.", "") for a in args
                                  if torch.is_tensor(a) and a.is_floating_point()}
        if grad_args:
            marked = _Mark.apply(stamps, (region, call, "in"), *[args[i] for i in grad_args])
            for i, x in zip(grad_args, marked):
                args[i] = x
        else:
            stamps.append(((region, call, "in"), "fwd", stamps.clock.now()))
        out = fn(*args, **kwargs)
        if isinstance(out, tuple) and hasattr(out, "_replace"):  # TopK: mark the features
            if out.features_BkD is not None and out.features_BkD.requires_grad:
                (feat,) = _Mark.apply(stamps, (region, call, "out"), out.features_BkD)
                return out._replace(features_BkD=feat)
        elif isinstance(out, tuple) and all(torch.is_tensor(o) and o.requires_grad for o in out):
            return _Mark.apply(stamps, (region, call, "out"), *out)
        elif torch.is_tensor(out) and out.requires_grad:
            return _Mark.apply(stamps, (region, call, "out"), out)[0]
        stamps.append(((region, call, "out"), "fwd", stamps.clock.now()))
        return out
    return wrapper


def patch_kernels(stamps: Stamps, impl: str) -> list:
    """Replace the kernels' functions wherever a trainer module imported them; returns undo."""
    undo = []
    for region, names in OPS.items():
        for name in names:
            original = getattr(similarity_module, name, None) or getattr(topk_module, name)
            wrapped = timed(original, region, stamps, impl)
            for module in [m for k, m in sys.modules.items() if k.startswith("tbps.trainer.")]:
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapped)
                    undo.append((module, name, original))
    return undo


def synthetic_batch(cfg, vocab: Vocabulary, batch: int, num_classes: int, device, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.model.image_size
    L = cfg.model.context_length
    lengths = torch.randint(min(20, L - 2), min(60, L - 1), (batch,), generator=g)
    ids = torch.randint(len(vocab.special_ids), vocab.vocab_size, (batch, L), generator=g)
    ids[:, 0] = vocab.sot_id
    pos = torch.arange(L)[None, :]
    ids = torch.where(pos == lengths[:, None], vocab.eot_id, ids)
    ids = torch.where(pos > lengths[:, None], vocab.pad_id, ids)
    pid = torch.randint(0, num_classes, (batch // 2,), generator=g).repeat(2)  # two per identity
    batch_dict = {"image": torch.randn(batch, 3, h, w, generator=g), "input_ids": ids, "pid": pid,
                  "index": torch.arange(batch)}
    return {**{k: v.to(device) for k, v in batch_dict.items()},
            "text_length": int(lengths.max()) + 1}


def time_steps(preset: str, impl: str, args, device) -> dict:
    from tbps.trainer.common.config import load_config
    from tbps.trainer.model.weights import build_model
    from tbps.trainer.recipe.step import StepInfo
    from tbps.trainer.running.optim import build_optimizer

    overrides = (TINY if args.tiny else VIT_B16) + list(args.override)
    cfg = load_config(Path(args.configs) / f"{preset}.yaml", overrides)
    vocab = Vocabulary(args.vocab or (100 if args.tiny else 49408))
    torch.manual_seed(0)
    model = build_model(cfg, vocab, args.num_classes, args.num_samples).to(device).train()
    optimizer = build_optimizer(model, cfg)
    batch = synthetic_batch(cfg, vocab, args.batch, args.num_classes, device)
    clock = Clock(device)
    stamps = Stamps(clock)
    kernel_impl = "triton" if device.type == "cuda" or interpreting() else "auto"
    undo = patch_kernels(stamps, kernel_impl if impl == "kernels" else "reference")
    precision = torch.bfloat16 if args.precision == "bf16" else None
    steps, first_loss = [], None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                stamps.clear()
            start = clock.now()
            info = StepInfo(epoch=0, step=i, tau=cfg.loss.tau,
                            generator=torch.Generator().manual_seed(i))
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                out = model(batch, mode="train", step=info)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append((start, clock.now()))
            if first_loss is None:
                first_loss = float(out["loss"].detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        for module, name, original in undo:
            setattr(module, name, original)
    ms = [clock.ms(a, b) for a, b in steps[args.warmup:]]
    total = sum(ms)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"preset": preset, "impl": impl, "batch": args.batch, "precision": args.precision,
            "samples_per_s": 1e3 * args.batch / statistics.median(ms),
            "ms_p20": q[1], "ms_p50": statistics.median(ms), "ms_p80": q[7],
            "peak_mib": (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                         else math.nan),
            "similarity_share": stamps.region_ms("similarity") / total,
            "selection_share": stamps.region_ms("selection") / total,
            "input_dtypes": {k: sorted(v) for k, v in stamps.dtypes.items()}, "first_loss": first_loss,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def print_table(rows, env):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training step on {env['device']}")
    cols = ("preset", "impl", "samples/s", "ms p50", "p20-p80", "peak MiB", "% similarity",
            "% selection", "input dtypes", "first loss")
    for c in cols:
        table.add_column(c, justify="left" if c in ("preset", "impl", "input dtypes") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["preset"], r["impl"], *["-"] * 7, r["error"][:60])
            continue
        table.add_row(r["preset"], r["impl"], f"{r['samples_per_s']:.1f}", f"{r['ms_p50']:.1f}",
                      f"{r['ms_p20']:.1f}-{r['ms_p80']:.1f}", f"{r['peak_mib']:.0f}",
                      f"{100 * r['similarity_share']:.1f}", f"{100 * r['selection_share']:.1f}",
                      " ".join(f"{k}:{','.join(v)}" for k, v in r["input_dtypes"].items() if v),
                      f"{r['first_loss']:.6g}")
    Console(width=200).print(table)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="tbps bench step-kernels", description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="irra,rde")
    p.add_argument("--impls", default="kernels,reference")
    p.add_argument("--batch", type=int, default=None, help="default 64 (8 with --tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks that the script runs")
    p.add_argument("--num-classes", type=int, default=11003, help="identities (CUHK-PEDES: 11,003)")
    p.add_argument("--num-samples", type=int, default=68126, help="training pairs (CUHK-PEDES)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "launch/configs"))
    p.add_argument("--override", action="append", default=[], help="section.field=value")
    p.add_argument("--out", default=None, help="folder for step.json")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.tiny else 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, torch.bfloat16 if args.precision == "bf16" else torch.float32, [])
    env["command"] = " ".join(["tbps bench step-kernels", *argv])
    rows = []
    for preset in args.presets.split(","):
        for impl in args.impls.split(","):
            try:
                rows.append(time_steps(preset, impl, args, device))
            except Exception as e:  # noqa: BLE001  one failing row must not hide the others
                rows.append({"preset": preset, "impl": impl, "error": f"{type(e).__name__}: {e}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    print_table(rows, env)
    print(json.dumps({"out": args.out, "device": env["device"], "rows": len(rows),
                      "failed": sum("error" in r for r in rows)}))
    return rows


if __name__ == "__main__":
    main()
