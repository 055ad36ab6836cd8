"""Time the training step of any recipe, phase by phase, through the trainer's own code.

    # one process, the quickstart's shards (tbps quickstart makes them)
    tbps bench step --config launch/configs/irra_synth.yaml data.shards=data/synth-shards
    # 2 CPU processes, AMNS's AWM against the full-token step
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m tbps.trainer.tools.bench \\
        --config launch/configs/irra_synth.yaml data.shards=data/synth-shards method=amns
    # a GPU: ViT-B/16 at 384x128, random weights of the real shapes (no download)
    accelerate launch --num_processes 1 -m tbps.trainer.tools.bench --config launch/configs/irra.yaml \\
        data.shards=shards/cuhk model.pretrained=null model.vision_width=768 ...

It builds the run the trainer would (`tbps.trainer.train.Run`, in a temporary output folder), warms
up, then times `--steps` optimizer steps of `Run.train_step` with the device synchronised at the
end of each phase: data (the loader's next batch and its copy to the device), forward, backward,
optimizer, EMA (the momentum model's update, and its refresh: an all-gather under DDP and
ZeRO-1/2). Inside the forward it also times the momentum model's forward (AWM's scoring pass,
TEM, distillation targets) and the online image encoder (what AWM's dropped patches save). It
times the EMA refresh alone and says how many bytes it moves. Prints a table;
`--out FILE.json` keeps it, with the device, CPU model, versions and command. Rank 0 reports;
the figures are per rank (samples/s counts every rank's samples).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("data", "forward", "backward", "optimizer", "ema")
INSIDE = ("momentum_forward", "image_encoder_forward")      # parts of "forward"


class PhaseTimer:
    """Wall time per phase; the device is synchronised at each mark (benchmarks only)."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, None
        self.reset()

    def reset(self) -> None:
        self.times = {p: [] for p in PHASES}
        self.inside = {p: [] for p in INSIDE}

    def wrap(self, fn, name: str):
        """fn, timed into `inside[name]` (forward-only calls: no autograd backward is timed)."""
        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.inside[name].append(time.perf_counter() - t0)
            return out
        return timed

    def start(self) -> None:
        self._sync()
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.times[phase].append(now - self.t)
        self.t = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def bench(cfg, steps: int, warmup: int) -> dict:
    from tbps.trainer.running import dist
    from tbps.trainer.train import Run

    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.output_dir = str(Path(tmp) / "run")
        cfg.train.tensorboard = False
        run = Run(cfg)
        acc, timer = run.acc, PhaseTimer(run.acc.device)
        encoder = run.unwrap().encoder
        encoder.encode_image = timer.wrap(encoder.encode_image, "image_encoder_forward")
        make_info = run.step_info

        def step_info():
            info = make_info()
            if info.momentum is not None:
                info.momentum = timer.wrap(info.momentum, "momentum_forward")
            return info

        run.step_info = step_info
        epoch, batches = 0, run.loader.epoch(0)
        steps_done, samples = 0, 0
        total = warmup + steps
        while steps_done < total:
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
            run.state.step += 1
            steps_done += 1
            if steps_done == warmup:                 # forget the warm-up
                timer.reset()
                samples = 0
        per_phase = {p: statistics.fmean(v) for p, v in timer.times.items() if v}
        step_s = sum(per_phase.values())
        result = {"steps": steps, "warmup": warmup, "phases_ms": {p: 1e3 * v for p, v in
                                                                  per_phase.items()},
                  "step_ms": 1e3 * step_s, "samples_per_s": samples / sum(
                      sum(v) for v in timer.times.values()),
                  "global_batch": cfg.data.batch_size * acc.num_processes * cfg.optim.grad_accum,
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
        dist.barrier()
    return result


def ema_refresh_cost(ema, device, repeats: int = 5) -> dict:
    """Seconds and bytes of one refresh of the momentum model's compute copy."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ema.refresh()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    total = sum((p.ds_numel if ema.kind == "zero3" else p.numel()) for p in ema.params.values())
    elem = torch.tensor([], dtype=ema.compute_dtype).element_size()
    gathered = 0 if ema.kind == "zero3" else total * elem
    return {"kind": ema.kind, "parameters": total, "refresh_every": ema.refresh_every,
            "refresh_ms": 1e3 * statistics.median(times),
            "bytes_gathered_per_rank": gathered, "stored_fp32_bytes_this_rank": ema.stored_bytes()}


def print_table(r: dict) -> None:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (launch/configs/...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="write the result as JSON here")
    args, rest = p.parse_known_args(argv)
    from tbps.trainer.common.config import load_config, parse_overrides
    from tbps.trainer.running import dist, errors

    result = {}

    def run() -> int:
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        cfg = load_config(args.config, parse_overrides(rest))
        result.update(bench(cfg, args.steps, args.warmup))
        return 0

    code = errors.guard(run, on_stop="nothing was written; run it again")
    if code:
        return code

    if dist.rank() == 0:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parents[2]).stdout.strip()
        result.update(cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(),
                      commit=commit, command=" ".join(["tbps bench step", *(argv or
                                                                                 sys.argv[1:])]),
                      config=args.config, overrides=rest)
        print_table(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
