"""The training step of each preset, timed phase by phase (`tbps bench step`,
tbps.trainer.tools.step_timing) on 2 CPU processes.

    python launch/step_bench.py --out launch/results/step_bench          # about 10 min on 2 cores

Each case is `accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m
tbps.trainer.tools.step_timing` on small synthetic shards it makes once under --data (96x32;
384x128 for the ViT-B/16 case):
IRRA, RDE, AMNS (AWM), AMNS with every patch and with random dropping (AWM's cost and saving),
AGA, and AMNS at CLIP ViT-B/16's sizes (tbps.trainer.model.sizes; random weights, 384x128, 2
samples a rank), with AWM and with every patch, for the momentum model's forward and refresh at
real scale. A finished case (its JSON exists) is skipped; <out>/step_bench.md is rewritten after
every case with the CPU model, versions and commands.

On a GPU (`--gpu`, what kernels/gpu_check.sh runs): one process on the device, bf16, and the
ViT-B/16 cases at batch 64 with 10 timed steps, for the AMNS target (the AWM step no slower than
the full-token step at ViT-B/16 384x128):

    python launch/step_bench.py --gpu --cases amns-vit-b16 amns-vit-b16-all-patches --out runs/awm
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tbps.trainer.model import sizes

REPO = Path(__file__).resolve().parents[1]
SYNTH = "launch/configs/irra_synth.yaml"
COMMON = ["train.precision=fp32", "data.num_workers=0"]
TIMER = "tbps.trainer.tools.step_timing"
VIT_B16 = [*sizes.overrides("ViT-B/16"), "model.cross_layers=4", "model.cross_heads=8",
           "data.batch_size=2"]
CASES = {
    "irra": (SYNTH, []),
    "rde": ("launch/configs/rde_synth.yaml", []),
    "amns": (SYNTH, ["method=amns"]),
    "amns-all-patches": (SYNTH, ["method=amns", "recipe.image_tokens.kind=all"]),
    "amns-random-drop": (SYNTH, ["method=amns", "recipe.image_tokens.kind=random"]),
    "aga": (SYNTH, ["method=aga"]),
    "amns-vit-b16": (SYNTH, ["method=amns", *VIT_B16]),
    "amns-vit-b16-all-patches": (SYNTH, ["method=amns", "recipe.image_tokens.kind=all", *VIT_B16]),
}


def rel(path: Path) -> str:
    """A path as the commands record it: relative to the repository (their cwd) when inside it."""
    return os.path.relpath(path, REPO) if path.resolve().is_relative_to(REPO) else str(path)


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def shards(data: Path, size: str) -> Path:
    raw, out = data / f"synth-{size}", data / f"shards-{size}"
    if not (out / "manifest.parquet").exists():
        run([sys.executable, "-m", "tbps.data_pipeline.cli", "synth", "--out", rel(raw), "--train-ids",
             "60", "--val-ids", "4", "--test-ids", "4", "--image-size", size, "--quiet"])
        run([sys.executable, "-m", "tbps.data_pipeline.cli", "shard", "--format", "cuhk-pedes", "--root",
             rel(raw), "--out", rel(out), "--quiet"])
    return out


def awm_ratios(results: dict) -> list[str]:
    """AWM's step time over the full-token step's, for each case measured both ways."""
    lines = []
    for name, r in results.items():
        full = results.get(f"{name}-all-patches")      # amns / amns-vit-b16 have one
        if full is not None:
            lines.append(f"- {name}: AWM step / full-token step = "
                         f"{r['step_ms'] / full['step_ms']:.2f} ({r['step_ms']:.0f} / "
                         f"{full['step_ms']:.0f} ms; the momentum forward it adds "
                         f"{r['inside_forward_ms'].get('momentum_forward', 0):.0f} ms, the online "
                         f"image encoder {r['inside_forward_ms'].get('image_encoder_forward', 0):.0f}"
                         f" against {full['inside_forward_ms'].get('image_encoder_forward', 0):.0f}"
                         " ms)")
    return lines


def table(results: dict) -> str:
    head = next(iter(results.values()))
    where = (f"CPU: {head['cpu']}" if str(head.get("device", "cpu")).startswith("cpu")
             else f"device: {head.get('device_name', head.get('device'))}; CPU: {head['cpu']}")
    lines = [f"{where}; torch {head['torch']}; {head['world_size']} process(es), "
             f"{head.get('precision', 'fp32')}, {head.get('threads', 1)} thread(s) each; "
             f"commit {head['commit']}", "",
             "| case | samples/s | step ms | data | forward (momentum fwd / image enc.) | "
             "backward | optimizer | EMA | EMA refresh: ms, MiB a rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ph, inside, ema = r["phases_ms"], r["inside_forward_ms"], r.get("ema")
        fwd = f"{ph['forward']:.0f} ({inside.get('momentum_forward', 0):.0f} / " \
              f"{inside.get('image_encoder_forward', 0):.0f})"
        refresh = (f"{ema['refresh_ms']:.1f} ms, {ema['bytes_gathered_per_rank'] / 2**20:.1f}"
                   if ema else "-")
        lines.append(f"| {name} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{ph['data']:.1f} | {fwd} | {ph['backward']:.0f} | {ph['optimizer']:.0f} | "
                     f"{ph['ema']:.1f} | {refresh} |")
    ratios = awm_ratios(results)
    if ratios:
        lines += ["", "AWM against every patch (the AMNS target, on a GPU at ViT-B/16 384x128: "
                  "a ratio of at most 1):", "", *ratios]
    lines += ["", "Commands:"] + [f"    {r['command']}" for r in results.values()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="launch/results/step_bench")
    p.add_argument("--data", default="runs/step-bench-data")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--gpu", action="store_true", help="one process on the GPU, bf16, the "
                   "ViT-B/16 cases at batch 64 with 10 timed steps")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are {list(CASES)}")
    if args.gpu:
        import torch  # only to see the GPU: the cases run in their own processes

        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device is visible here")
    out, data = REPO / args.out, REPO / args.data
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.cases:
        config, overrides = CASES[name]
        path = out / f"{name}.json"
        if not path.exists():
            vit = "model.vision_width=768" in overrides
            where = shards(data, "384x128" if vit else "96x32")
            steps = ["--steps", "3", "--warmup", "1"] if vit else ["--steps", str(args.steps)]
            if args.gpu:
                launcher = [sys.executable, "-m", TIMER]
                steps = ["--steps", "10", "--warmup", "3"] if vit else steps
                settings = ["train.precision=bf16", "data.num_workers=2", *overrides,
                            *(["data.batch_size=64"] if vit else [])]
            else:
                launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                            "launch/accelerate/cpu_ddp.yaml", "--num_processes", "2", "-m",
                            TIMER]
                settings = [*COMMON, *overrides]
            run([*launcher, "--config", config, *steps, "--out", rel(path),
                 f"data.shards={rel(where)}", *settings])
        results[name] = json.loads(path.read_text())
        (out / "step_bench.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
