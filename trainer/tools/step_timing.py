"""Whole training steps timed through the trainer's own code, two ways (the ops alone against
eager PyTorch: tbps.kernels.bench).

`tbps bench step` (python -m tbps.trainer.tools.step_timing ARGS; launch/step_bench.py runs it
per recipe case): any recipe's step, phase by phase.

    tbps bench step --config launch/configs/irra_synth.yaml data.shards=data/synth-shards
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m tbps.trainer.tools.step_timing \\
        --config launch/configs/irra_synth.yaml data.shards=data/synth-shards method=amns

It builds the run the trainer would (`Run`, in a temporary folder), warms up, then times `--steps`
optimizer steps of `Run.train_step`, the device synchronised at the end of each phase: data (the
loader's next batch and its copy to the device), forward, backward, optimizer, EMA (the momentum
model's update and refresh). Inside the forward (forward hooks): the momentum model's forward
and the online image encoder (what AWM's dropped patches save). Then the EMA refresh alone and
the bytes it moves. Rank 0 prints a table; `--out FILE.json` keeps it with the environment
(tbps.kernels.environment). Figures are per rank (samples/s counts every rank's samples).

`tbps bench step-kernels` (python -m tbps.trainer.tools.step_timing kernels ARGS; kernels/
gpu_check.sh's `step`): the step with the fused kernels against impl=reference.

    tbps bench step-kernels --out runs/step                           # a GPU: ViT-B/16
    tbps bench step-kernels --tiny --precision fp32 --out runs/step   # CPU: that it runs

The model of launch/configs/<preset>.yaml at ViT-B/16's sizes (tbps.trainer.model.sizes, random
weights, 384x128, a 49,408-token vocabulary; nothing downloaded), per preset and impl ("kernels":
Triton, in the interpreter on CPU when TRITON_INTERPRET=1; "reference": eager PyTorch, chosen by
tbps.kernels._dispatch.forced), from the same weights and synthetic batch (`synthetic_batch`):
warm-up, then timed forward + backward + optimizer steps under bf16 autocast. Per row: samples/s,
ms per step (p20/p50/p80), peak memory, the step's share in the similarity losses and in the
token selection, the dtypes they receive, and the first loss (the impls must agree). Writes
step.json, prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tbps.kernels import _dispatch
from tbps.kernels.bench import device_record
from tbps.kernels.environment import environment
from tbps.trainer.common import collective, errors
from tbps.trainer.common.config_files import load_config, parse_overrides
from tbps.trainer.model.sizes import CONTEXT_LENGTH, overrides
from tbps.trainer.model.weights import build_model
from tbps.trainer.recipe.step import Recipe, StepInfo
from tbps.trainer.running.optim import build_optimizer
from tbps.trainer.running.plan import synthetic_batch
from tbps.trainer.train import Run

REPO = Path(__file__).resolve().parents[2]
PHASES = ("data", "forward", "backward", "optimizer", "ema")
INSIDE = ("momentum_forward", "image_encoder_forward")      # parts of "forward"
VIT_B16 = ["model.pretrained=null", *overrides("ViT-B/16", context_length=CONTEXT_LENGTH)]
TINY = ["model.pretrained=null", "model.image_size=[64,32]", "model.patch_size=8",
        "model.vision_width=64", "model.vision_layers=1", "model.vision_heads=2",
        "model.text_width=64", "model.text_layers=1", "model.text_heads=2", "model.embed_dim=64",
        "model.context_length=16", "model.cross_layers=1", "model.cross_heads=2",
        "recipe.tse.dim=64"]
REGIONS = ("similarity", "selection")      # the kernels' interceptable ops (kernels/_dispatch.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- phases of Run
class PhaseTimer:
    """Wall time per phase, the device synchronised at each mark (benchmarks only), and the time
    inside chosen modules' forwards (forward hooks; no backward is timed)."""

    def __init__(self, device: torch.device):
        self.device, self.t, self.handles = device, None, []
        self.reset()

    def reset(self) -> None:
        self.times = {p: [] for p in PHASES}
        self.inside = {p: [] for p in INSIDE}

    def time_forward(self, name: str, first: torch.nn.Module, last: torch.nn.Module | None = None):
        """Time into inside[name] from `first`'s forward start to the end of `last`'s (or first's)."""
        started = []

        def pre(_module, _args):
            _sync(self.device)
            started.append(time.perf_counter())

        def post(_module, _args, _out):
            if started:
                _sync(self.device)
                self.inside[name].append(time.perf_counter() - started.pop())

        self.handles += [first.register_forward_pre_hook(pre),
                         (last or first).register_forward_hook(post)]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def start(self) -> None:
        _sync(self.device)
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times[phase].append(now - self.t)
        self.t = now


def time_phases(cfg, steps: int, warmup: int) -> dict:
    """`steps` timed optimizer steps of Run.train_step after `warmup`, phase by phase."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.output_dir = str(Path(tmp) / "run")
        cfg.train.tensorboard = False
        run = Run(cfg)
        acc, timer = run.acc, PhaseTimer(run.acc.device)
        clip = run.unwrap().encoder.clip           # encode_image: patch embedding .. projection
        timer.time_forward("image_encoder_forward", clip.vision_model.embeddings.patch_embedding,
                           clip.visual_projection)
        if run.ema is not None:
            timer.time_forward("momentum_forward", run.ema.module)
        epoch, batches = 0, run.loader.epoch(0)
        steps_done, samples = 0, 0
        while steps_done < warmup + steps:
            timer.start()
            raw = next(batches, None)
            if raw is None:                          # the epoch ran out: the next one
                epoch += 1
                batches = run.loader.epoch(epoch)
                raw = next(batches)
            batch = run.to_device(raw)
            timer.mark("data")
            out = run.train_step(batch, mark=timer.mark)[0]
            samples += batch["pid"].shape[0] * acc.num_processes
            if not acc.sync_gradients:
                continue
            if run.ema is None:
                timer.times["ema"].append(0.0)
            run.state.step += 1                      # the caller counts the step
            steps_done += 1
            if steps_done == warmup:                 # forget the warm-up
                timer.reset()
                samples = 0
        timer.remove_hooks()
        per_phase = {p: statistics.fmean(v) for p, v in timer.times.items() if v}
        result = {"steps": steps, "warmup": warmup,
                  "phases_ms": {p: 1e3 * v for p, v in per_phase.items()},
                  "step_ms": 1e3 * sum(per_phase.values()),
                  "samples_per_s": samples / sum(sum(v) for v in timer.times.values()),
                  "global_batch": cfg.data.batch_size,
                  "world_size": acc.num_processes, "device": str(acc.device),
                  "device_name": (torch.cuda.get_device_name(acc.device)
                                  if acc.device.type == "cuda" else None),
                  "precision": cfg.train.precision, "loss": float(out["loss"].detach()),
                  "inside_forward_ms": {p: 1e3 * sum(v) / steps for p, v in timer.inside.items()
                                        if v},
                  "kept_patches": (None if cfg.recipe.image_tokens.kind == "all" else
                                   f"{1 - cfg.recipe.image_tokens.ratio:.0%}")}
        if run.ema is not None:
            result["ema"] = ema_refresh_cost(run.ema, acc.device)
        run.monitor.close()
        collective.barrier()
    return result


def ema_refresh_cost(ema, device, repeats: int = 5) -> dict:
    """Seconds and bytes of one refresh of the momentum model's compute copy."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        ema.refresh()
        _sync(device)
        times.append(time.perf_counter() - t0)
    total = sum((p.ds_numel if ema.kind == "zero3" else p.numel()) for p in ema.params.values())
    elem = torch.tensor([], dtype=ema.compute_dtype).element_size()
    gathered = 0 if ema.kind == "zero3" else total * elem
    return {"kind": ema.kind, "parameters": total, "refresh_every": ema.refresh_every,
            "refresh_ms": 1e3 * statistics.median(times),
            "bytes_gathered_per_rank": gathered, "stored_fp32_bytes_this_rank": ema.stored_bytes()}


def print_phases(r: dict) -> None:
    print(f"step {r['step_ms']:.1f} ms, {r['samples_per_s']:.1f} samples/s "
          f"(global batch {r['global_batch']}, {r['world_size']} process(es), {r['device']}, "
          f"{r['precision']}, {r['cpu']})")
    print("| phase | ms | share |")
    print("|---|---|---|")
    for phase, ms in r["phases_ms"].items():
        print(f"| {phase} | {ms:.1f} | {ms / r['step_ms']:.0%} |")
    for name, ms in r["inside_forward_ms"].items():
        print(f"| of forward: {name.replace('_', ' ')} | {ms:.1f} | {ms / r['step_ms']:.0%} |")
    if "ema" in r:
        e = r["ema"]
        print(f"EMA ({e['kind']}, {e['parameters'] / 1e6:.2f}M parameters): refresh "
              f"{e['refresh_ms']:.2f} ms, {e['bytes_gathered_per_rank'] / 2**20:.1f} MiB "
              f"gathered per rank, every {e['refresh_every']} step(s)")


def phases_main(argv=None) -> int:
    """`tbps bench step`."""
    p = argparse.ArgumentParser(prog="tbps bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (launch/configs/...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="write the result as JSON here")
    args, rest = p.parse_known_args(argv)
    result = {}

    def run() -> int:
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        cfg = load_config(args.config, parse_overrides(rest))
        result.update(time_phases(cfg, args.steps, args.warmup))
        return 0

    code = errors.guard(run, on_stop="nothing was written; run it again")
    if code:
        return code
    if collective.rank() == 0:
        result.update(environment("tbps bench step", argv), config=args.config, overrides=rest)
        print_phases(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- kernels vs reference
class Vocabulary:
    """What build_model and synthetic_batch read of a tokenizer (the word-level layout)."""

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
    """((region, call, side), phase, time) of every marked op call, and the dtypes they got."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.dtypes = {region: set() for region in REGIONS}

    def region_ms(self, name: str) -> float:
        """Forward (input stamp to output stamp) plus backward (output's backward stamp to the
        inputs') of every call of region `name`."""
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


def timed(fn, region: str, stamps: Stamps):
    """fn with its differentiable tensor arguments and results marked."""
    def wrapper(*args, **kwargs):
        call = len(stamps)
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


def time_kernel_steps(preset: str, impl: str, args, device) -> dict:
    """One row: `preset`'s step with impl "kernels" or "reference", from the same weights."""
    cfg = load_config(Path(args.configs) / f"{preset}.yaml",
                      (TINY if args.tiny else VIT_B16) + list(args.override))
    vocab = Vocabulary(args.vocab or (100 if args.tiny else 49408))
    torch.manual_seed(0)
    model = build_model(cfg, vocab, args.num_classes, args.num_samples).to(device).train()
    optimizer = build_optimizer(model, cfg)
    recipe = Recipe(cfg, vocab)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in
             synthetic_batch(cfg, vocab, args.batch, num_classes=args.num_classes).items()}
    clock = Clock(device)
    stamps = Stamps(clock)
    kernels = "triton" if device.type == "cuda" or _dispatch.interpreting() else "auto"
    precision = torch.bfloat16 if args.precision == "bf16" else None
    steps, first_loss = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _dispatch.forced(kernels if impl == "kernels" else "reference"), \
            _dispatch.intercepted(lambda op, region: timed(op, region, stamps)):
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                stamps.clear()
            start = clock.now()
            info = StepInfo(epoch=0, step=i, tau=cfg.loss.tau,
                            generator=torch.Generator().manual_seed(i))
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                out = model(recipe.train_losses, batch, info)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append((start, clock.now()))
            if first_loss is None:
                first_loss = float(out["loss"].detach())
        _sync(device)
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
            "input_dtypes": {k: sorted(v) for k, v in stamps.dtypes.items()},
            "first_loss": first_loss,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def print_kernel_rows(rows, env) -> None:
    from rich.console import Console  # rich only when a table is printed
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


def kernels_main(argv=None) -> list[dict]:
    """`tbps bench step-kernels`; returns the rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="tbps bench step-kernels",
                                description="the training step with the kernels against "
                                            "impl=reference (see tbps.trainer.tools.step_timing)")
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
    p.add_argument("--configs", default=str(REPO / "launch/configs"))
    p.add_argument("--override", action="append", default=[], help="section.field=value")
    p.add_argument("--out", default=None, help="folder for step.json")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.tiny else 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    env = {**environment("tbps bench step-kernels", argv), **device_record(device, dtype)}
    rows = []
    for preset in args.presets.split(","):
        for impl in args.impls.split(","):
            try:
                rows.append(time_kernel_steps(preset, impl, args, device))
            except Exception as e:  # noqa: BLE001  one failing row must not hide the others
                rows.append({"preset": preset, "impl": impl, "error": f"{type(e).__name__}: {e}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    print_kernel_rows(rows, env)
    print(json.dumps({"out": args.out, "device": env["device"], "rows": len(rows),
                      "failed": sum("error" in r for r in rows)}))
    return rows


def main(argv=None) -> int:
    """python -m: `kernels ARGS` is step-kernels, anything else `tbps bench step`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:
        kernels_main(argv[1:])
        return 0
    return phases_main(argv)


if __name__ == "__main__":
    sys.exit(main())
