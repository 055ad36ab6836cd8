"""The training step of each preset, timed phase by phase (trainer.bench) on 2 CPU processes.

    python launch/step_bench.py --out launch/results/step_bench          # about 10 min on 2 cores

Each case is `accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m trainer.bench`
on small synthetic shards it makes once under --data (96x32; 384x128 for the ViT-B/16 case):
IRRA, RDE, AMNS (AWM), AMNS with every patch and with random dropping (AWM's cost and saving),
AGA, and AMNS at CLIP ViT-B/16's sizes (random weights, 384x128, 2 samples a rank), with AWM and
with every patch, for the momentum model's forward and refresh at real scale. A finished case (its JSON exists) is skipped;
<out>/step_bench.md is rewritten after every case with the CPU model, versions and commands.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNTH = "launch/configs/irra_synth.yaml"
COMMON = ["train.precision=fp32", "data.num_workers=0"]
VIT_B16 = ["model.vision_width=768", "model.vision_layers=12", "model.vision_heads=12",
           "model.text_width=512", "model.text_layers=12", "model.text_heads=8",
           "model.embed_dim=512", "model.patch_size=16", "model.image_size=[384,128]",
           "model.cross_layers=4", "model.cross_heads=8", "data.batch_size=2"]
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
        run([sys.executable, "-m", "data_pipeline", "synth", "--out", rel(raw), "--train-ids",
             "60", "--val-ids", "4", "--test-ids", "4", "--image-size", size, "--quiet"])
        run([sys.executable, "-m", "data_pipeline", "shard", "--format", "cuhk-pedes", "--root",
             rel(raw), "--out", rel(out), "--quiet"])
    return out


def table(results: dict) -> str:
    head = next(iter(results.values()))
    lines = [f"CPU: {head['cpu']}; torch {head['torch']}; {head['world_size']} processes, "
             f"fp32, one thread each; commit {head['commit']}", "",
             "| case | samples/s | step ms | data | forward (momentum fwd / image enc.) | "
             "backward | optimizer | EMA | EMA refresh: ms, MiB a rank |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ph, inside, ema = r["phases_ms"], r["inside_forward_ms"], r.get("ema")
        fwd = f"{ph['forward']:.0f} ({inside.get('momentum_forward', 0):.0f} / " \
              f"{inside.get('image_encoder_forward', 0):.0f})"
        refresh = (f"{ema['refresh_ms']:.1f} ms, {ema['bytes_gathered_per_rank'] / 2**20:.1f}"
                   if ema else "-")
        lines.append(f"| {name} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{ph['data']:.1f} | {fwd} | {ph['backward']:.0f} | {ph['optimizer']:.0f} | "
                     f"{ph['ema']:.1f} | {refresh} |")
    lines += ["", "Commands:"] + [f"    {r['command']}" for r in results.values()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="launch/results/step_bench")
    p.add_argument("--data", default="runs/step-bench-data")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    args = p.parse_args(argv)
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
            run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 "launch/accelerate/cpu_ddp.yaml", "--num_processes", "2", "-m", "trainer.bench",
                 "--config", config, *steps, "--out", rel(path), f"data.shards={rel(where)}",
                 *COMMON, *overrides])
        results[name] = json.loads(path.read_text())
        (out / "step_bench.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
