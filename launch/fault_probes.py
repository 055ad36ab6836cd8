"""Issue 24's fault probes, re-run as a careful user would: every command is the `tbps` CLI in a
subprocess (2 CPU processes over gloo under `tbps launch` where the probe is about ranks), on a
tiny synthetic dataset and model; each probe records its commands, exit codes, tracebacks, last
lines, whether the issue's expected outcome held, and its wall time.

    python launch/fault_probes.py                              # every probe (~7 min, 2 cores)
    python launch/fault_probes.py --only pickle_optimizer --work runs/probes
    python launch/fault_probes.py --list                       # the probes and what they expect

Results go to launch/results/fault_probes.json (written after every probe; probes recorded
there are skipped, so an interrupted run continues; --only re-runs the probes it names, --redo
forgets every record) and fault_probes.md
(the table, the summary against the issue's targets, every probe that did not hold). --work
keeps the data, the reference run and each probe's folder and logs (default: a temp folder).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "launch/results/fault_probes.json"
CONFIG = str(REPO / "launch/configs/irra_synth.yaml")
DDP = str(REPO / "launch/accelerate/cpu_ddp.yaml")
ZERO2 = str(REPO / "launch/accelerate/cpu_zero2.yaml")
TBPS = str(Path(sys.executable).with_name("tbps"))
# tests/trainer/conftest.py's TINY_MODEL: 320 train pairs, global batch 32 = 10 steps an epoch
TINY = ["model.vision_width=64", "model.text_width=64", "model.embed_dim=64",
        "model.vision_layers=2", "model.text_layers=2", "model.cross_layers=1",
        "data.batch_size=32", "data.num_workers=0", "data.eval_batch_size=64", "optim.lr=1e-3",
        "optim.warmup_epochs=0.2", "train.log_every_steps=1", "train.tensorboard=false",
        "train.precision=fp32"]
NO_EVAL = ["eval.select_split=none", "eval.final_split=none"]
EMA = ["ema.modules=[encoder]", "ema.momentum=0.9"]
TIMEOUT = 300
# rank 1 reads positions 160..319 of epoch 0's shard order (seed 0): shard 5 comes first
RANK1_SHARD = "train/shard-000005.tar"


# -- commands ------------------------------------------------------------------------------


@dataclass
class Done:
    """One finished command: what a user would see of it."""
    cmd: list
    rc: int
    out: str
    wall_s: float

    def record(self) -> dict:
        return {"cmd": shlex.join(self.cmd), "rc": self.rc, "wall_s": round(self.wall_s, 1),
                "traceback": traceback_in(self.out), "last_lines": last_lines(self.out)}

    @property
    def last(self) -> str:
        return (last_lines(self.out, 1) or [""])[0]


def traceback_in(text: str) -> bool:
    return "Traceback (most recent call last)" in text or "ChildFailedError" in text


def last_lines(text: str, n: int = 3) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1")
    e.pop("TRITON_INTERPRET", None)
    return e


class Started:
    """A command running in a session of its own (so a timeout ends all it started)."""

    def __init__(self, cmd: list, log: Path):
        self.cmd, self.log, self.t0 = [str(c) for c in cmd], log, time.time()
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env(), stdout=self.fh,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait(self, timeout: float = TIMEOUT) -> Done:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
            self.fh.write(f"\n[fault_probes: killed after {timeout} s]\n")
        self.fh.close()
        return Done(self.cmd, rc, self.log.read_text(errors="replace"), time.time() - self.t0)

    def text(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")


class Probe:
    """A probe's folder, its commands (logged there) and its verdict."""

    def __init__(self, name: str, folder: Path):
        self.name, self.dir = name, folder
        self.done: list[Done] = []
        self.checks: dict[str, object] = {}
        self.counts = {"code_ran": 0, "mixed_folder": 0, "nonfinite_results": 0,
                       "silent_random_start": 0, "uncounted_data_problem": 0}

    def run(self, cmd: list, timeout: float = TIMEOUT) -> Done:
        done = Started(cmd, self.dir / f"cmd{len(self.done)}.log").wait(timeout)
        self.done.append(done)
        print(f"    rc={done.rc} {done.wall_s:5.1f}s  {shlex.join(done.cmd)[-150:]}", flush=True)
        return done

    def finished(self, done: Done) -> Done:
        self.done.append(done)
        print(f"    rc={done.rc} {done.wall_s:5.1f}s  {shlex.join(done.cmd)[-150:]}", flush=True)
        return done

    def check(self, name: str, ok) -> bool:
        self.checks[name] = ok if isinstance(ok, (bool, int, float, str)) else bool(ok)
        return bool(ok)


def train(run_dir: Path, shards: Path, *extra) -> list:
    return [TBPS, "train", "--config", CONFIG, f"data.shards={shards}",
            f"train.output_dir={run_dir}", *TINY, *extra]


def launch(run_dir: Path, shards: Path, *extra, config: str = DDP, processes: int = 2) -> list:
    return [TBPS, "launch", "--config_file", config, "--num_processes", str(processes), "-m",
            "tbps.trainer.train", "--config", CONFIG, f"data.shards={shards}",
            f"train.output_dir={run_dir}", *TINY, *extra]


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    f = Path(run_dir) / "log.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if kind is None or rec.get("event") == kind:
            out.append(rec)
    return out


def nonfinite_files(folder: Path) -> list[str]:
    """safetensors files under `folder` holding a NaN or an infinity."""
    import torch
    from safetensors.torch import load_file

    bad = []
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            state = load_file(str(f))
        except Exception:                   # noqa: BLE001 (a crafted or damaged input)
            continue
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in state.values()):
            bad.append(str(f.relative_to(folder)))
    return bad


# -- shared inputs (built once per --work folder) --------------------------------------------


class Inputs:
    def __init__(self, work: Path):
        self.work = work
        self.shards = work / "shards"
        self.base = work / "base"
        self.zero = work / "zero"
        self.index = work / "index"

    def log(self, name: str) -> Path:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self.work / "logs" / f"{name}.log"

    def need(self, what: str) -> None:
        getattr(self, f"_{what}")()

    def _ok(self, name: str, cmd: list) -> None:
        done = Started(cmd, self.log(name)).wait(600)
        if done.rc != 0:
            raise SystemExit(f"fault_probes: building {name} failed (exit {done.rc}):\n"
                             + "\n".join(last_lines(done.out, 20)))
        print(f"  [{name}] built in {done.wall_s:.1f}s", flush=True)

    def _data(self) -> None:
        """40 train ids x 4 images x 2 captions = 320 pairs in 10 shards (conftest's tiny_shards)."""
        if (self.shards / "manifest.parquet").is_file():
            return
        shutil.rmtree(self.work / "data", ignore_errors=True)
        shutil.rmtree(self.shards, ignore_errors=True)
        self._ok("synth", [TBPS, "synth", "--out", self.work / "data", "--seed", "5",
                           "--train-ids", "40", "--val-ids", "8", "--test-ids", "10", "--quiet"])
        self._ok("shard", [TBPS, "shard", "--format", "cuhk-pedes", "--root", self.work / "data",
                           "--out", self.shards, "--shard-size", "32", "--quiet"])

    def _base(self) -> None:
        """One process, one epoch (10 steps), the EMA on, checkpoints at steps 5 and 10, best/
        by the val split, final/, hf/."""
        self._data()
        if (self.base / "metrics.json").is_file() and (self.base / "best").is_dir():
            return
        shutil.rmtree(self.base, ignore_errors=True)
        self._ok("base", train(self.base, self.shards, *EMA, "train.epochs=1",
                               "train.ckpt_every_steps=5", "eval.final_split=none"))

    def _zero(self) -> None:
        """ZeRO-2 on 2 ranks, 4 steps, checkpoints at steps 2 and 4."""
        self._data()
        if (self.zero / "final").is_dir():
            return
        shutil.rmtree(self.zero, ignore_errors=True)
        self._ok("zero", launch(self.zero, self.shards, *NO_EVAL, "train.max_steps=4",
                                "train.ckpt_every_steps=2", config=ZERO2))

    def _index(self) -> None:
        self._base()
        if (self.index / "index.json").is_file():
            return
        shutil.rmtree(self.index, ignore_errors=True)
        self._ok("index", [TBPS, "search", "index", self.base / "best", self.shards, "--split",
                           "test", "--out", self.index, "--no-progress"])


# -- the probes ----------------------------------------------------------------------------

PROBES: dict[str, tuple] = {}


def probe(name: str, item: str, expect: str, needs: tuple = ()):
    def register(fn):
        PROBES[name] = (fn, item, expect, needs)
        return fn
    return register


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def newest_ckpt(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-????????"))[-1]


class _Payload:
    """A pickle that runs code when loaded: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant(ckpt: Path, name: str, marker: Path, drop: str | None = None) -> None:
    """A crafted torch file at ckpt/name (torch.save's zip format: what torch.load reads) and
    the checkpoint's manifest made to match, as a careful attacker would; `drop`: a file of the
    current layout removed so the older one is the one read."""
    import torch

    torch.save(_Payload(marker), ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digests = manifest.setdefault("sha256", {})
    if drop:
        (ckpt / drop).unlink()
        manifest["files"].pop(drop, None)
        digests.pop(drop, None)
    manifest["files"][name] = (ckpt / name).stat().st_size
    digests[name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def crafted_checkpoint(p: Probe, inp: Inputs, name: str, drop: str | None = None,
                       zero: bool = False) -> None:
    """Two resumes from a run whose newest checkpoint holds a crafted pickle: naming that
    checkpoint (refused: exit 2, the file named) and train.resume=latest (the previous one
    used); the marker must never appear."""
    src = inp.zero if zero else inp.base
    run = copy_run(src, p.dir / "run")
    ckpt, marker = newest_ckpt(run), p.dir / "MARKER-code-ran"
    previous = sorted((run / "checkpoints").glob("step-????????"))[-2].name
    plant(ckpt, name, marker, drop)
    if zero:
        args = lambda *x: launch(run, inp.shards, *NO_EVAL, "train.max_steps=4",  # noqa: E731
                                 "train.ckpt_every_steps=2", *x, config=ZERO2)
    else:
        args = lambda *x: train(run, inp.shards, *EMA, "train.epochs=1",  # noqa: E731
                                "train.ckpt_every_steps=5", "eval.final_split=none", *x)
    named = p.run(args(f"train.resume={ckpt}"))
    p.check("named: exit 2", named.rc == 2)
    said = [x for x in last_lines(named.out, 4) if x.startswith("error")]
    p.check("named: an error line names the file", bool(said) and name.split("/")[-1] in said[-1])
    p.check("named: marker absent", not marker.exists())
    latest = p.run(args("train.resume=latest"))
    resumed = events(run, "resumed")
    notes = " | ".join(resumed[-1].get("notes", [])) if resumed else ""
    p.check("latest: exit 0", latest.rc == 0)
    p.check("latest: resumed from the previous checkpoint", previous in notes)
    p.check("latest: the crafted one named as skipped", ckpt.name in notes)
    p.check("latest: marker absent", not marker.exists())
    p.counts["code_ran"] = int(marker.exists())


@probe("pickle_random_states", "1",
       "a crafted random_states_0.pkl (older layout, manifest matching) never runs: "
       "resume=<it> exit 2 naming it, resume=latest falls back; marker absent", ("base",))
def _(p, inp):
    crafted_checkpoint(p, inp, "random_states_0.pkl", drop="rng-rank00000.json")


@probe("pickle_optimizer", "1",
       "a crafted optimizer.bin never runs: exit 2 naming it / fallback; marker absent",
       ("base",))
def _(p, inp):
    crafted_checkpoint(p, inp, "optimizer.bin")


@probe("pickle_ema", "1",
       "a crafted ema-rank00000.pt (older layout, the safetensors removed) never runs: exit 2 "
       "naming it / fallback; marker absent", ("base",))
def _(p, inp):
    crafted_checkpoint(p, inp, "ema-rank00000.pt", drop="ema-rank00000.safetensors")


@probe("pickle_zero_optim", "1",
       "a crafted pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt (ZeRO-2, 2 ranks) "
       "never runs: exit 2 naming it / fallback; marker absent", ("zero",))
def _(p, inp):
    crafted_checkpoint(p, inp, "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                       zero=True)


@probe("pickle_zero_model", "1",
       "a crafted pytorch_model/mp_rank_00_model_states.pt (ZeRO-2, 2 ranks) never runs: "
       "exit 2 naming it / fallback; marker absent", ("zero",))
def _(p, inp):
    crafted_checkpoint(p, inp, "pytorch_model/mp_rank_00_model_states.pt", zero=True)


def concurrent(p: Probe, inp: Inputs, second_seed: int | None) -> None:
    """Two runs started together into one folder: one refused (exit 2 naming the holder's
    pid), the other exit 0 and unharmed (one config and one done event, its config.yaml, every
    checkpoint verified, no lock left)."""
    import yaml

    from tbps.trainer.running import checkpoint

    run = p.dir / "run"
    common = [*NO_EVAL, "train.max_steps=6", "train.ckpt_every_steps=2"]
    seeds = [0, 0 if second_seed is None else second_seed]
    started = [Started(train(run, inp.shards, *common, f"train.seed={s}"),
                       p.dir / f"run{i}.log") for i, s in enumerate(seeds)]
    done = [p.finished(s.wait()) for s in started]
    rcs = sorted(d.rc for d in done)
    p.check("exit codes 0 and 2", rcs == [0, 2])
    refused = [d for d in done if d.rc == 2]
    winner = [i for i, d in enumerate(done) if d.rc == 0]
    p.check("the refusal names the holder (pid)", bool(refused) and "pid" in refused[0].out)
    kinds = [e.get("event") for e in events(run)]
    p.check("one config event", kinds.count("config") == 1)
    p.check("one done event", kinds.count("done") == 1)
    cfg_seed = None
    if (run / "config.yaml").is_file():
        cfg_seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
    p.check("config.yaml is the winner's", len(winner) == 1 and cfg_seed == seeds[winner[0]])
    bad = {c.name: checkpoint.verify(c) for c in (run / "checkpoints").glob("step-????????")}
    bad = {k: v for k, v in bad.items() if v}
    p.check("every checkpoint verifies", not bad)
    p.check("final/ written", (run / "final").is_dir())
    p.check("no run.lock left", not (run / "run.lock").exists())
    mixed = (kinds.count("config") != 1 or kinds.count("done") != 1 or bad
             or len(winner) != 1 or cfg_seed != seeds[winner[0]])
    p.counts["mixed_folder"] = int(bool(mixed))


@probe("concurrent_same", "2", "two identical runs into one folder: one refused (exit 2, "
       "the holder named), the other exit 0 and unharmed", ("data",))
def _(p, inp):
    concurrent(p, inp, None)


@probe("concurrent_other_seed", "2", "two runs (seeds 0 and 1) into one folder: one refused, "
       "no mixed folder, no traceback", ("data",))
def _(p, inp):
    concurrent(p, inp, 1)


@probe("stale_lock", "2", "a run killed (SIGKILL) leaves run.lock; train.resume=latest takes "
       "it over (exit 0) and leaves none", ("data",))
def _(p, inp):
    run = p.dir / "run"
    args = [*NO_EVAL, "train.max_steps=200", "train.ckpt_every_steps=2"]
    s = Started(train(run, inp.shards, *args), p.dir / "killed.log")
    deadline = time.time() + 120
    while time.time() < deadline and s.proc.poll() is None:
        if any(e.get("step", 0) >= 3 for e in events(run, "step")):
            break
        time.sleep(0.1)
    os.killpg(s.proc.pid, signal.SIGKILL)
    p.finished(s.wait())
    p.check("run.lock left by the killed run", (run / "run.lock").exists())
    again = p.run(train(run, inp.shards, *NO_EVAL, "train.max_steps=6",
                        "train.ckpt_every_steps=2", "train.resume=latest"))
    p.check("resume exit 0", again.rc == 0)
    p.check("no run.lock left", not (run / "run.lock").exists())


def crafted_weights(p: Probe, inp: Inputs, damage, want: list[str]) -> None:
    """evaluate, export and search index on a crafted copy of best/: exit 2, the last line an
    error naming the file and the field, no traceback."""
    w = copy_run(inp.base / "best", p.dir / "best")
    damage(w)
    cmds = {"evaluate": [TBPS, "evaluate", w, "--split", "test", "--out", p.dir / "eval"],
            "export": [TBPS, "export", w, p.dir / "hf"],
            "search": [TBPS, "search", "index", w, inp.shards, "--split", "test", "--out",
                       p.dir / "ix", "--no-progress"]}
    for verb, cmd in cmds.items():
        d = p.run(cmd)
        p.check(f"{verb}: exit 2", d.rc == 2)
        p.check(f"{verb}: no traceback", not traceback_in(d.out))
        p.check(f"{verb}: last line names {want}",
                d.last.startswith("error") and all(x in d.last for x in want))
    p.check("nothing exported", not (p.dir / "hf" / "model.safetensors").exists())


def _model_json(field_value):
    def damage(w):
        info = json.loads((w / "model.json").read_text())
        info["num_classes"] = field_value
        (w / "model.json").write_text(json.dumps(info))
    return damage


@probe("weights_classes_negative", "3", "model.json num_classes -5: exit 2 naming model.json "
       "and num_classes (evaluate, export, search index)", ("base",))
def _(p, inp):
    crafted_weights(p, inp, _model_json(-5), ["model.json", "num_classes"])


@probe("weights_classes_huge", "3", "model.json num_classes 1e13: exit 2 naming the field",
       ("base",))
def _(p, inp):
    crafted_weights(p, inp, _model_json(1e13), ["model.json", "num_classes"])


@probe("weights_classes_text", "3", "model.json num_classes \"many\": exit 2 naming the field",
       ("base",))
def _(p, inp):
    crafted_weights(p, inp, _model_json("many"), ["model.json", "num_classes"])


@probe("weights_hidden_huge", "3", "clip_config.json vision hidden_size 2**40: exit 2 naming "
       "clip_config.json and hidden_size", ("base",))
def _(p, inp):
    def damage(w):
        data = json.loads((w / "clip_config.json").read_text())
        data["vision_config"]["hidden_size"] = 2 ** 40
        (w / "clip_config.json").write_text(json.dumps(data))
    crafted_weights(p, inp, damage, ["clip_config.json", "hidden_size"])


@probe("weights_tensor_shape", "3", "a tensor of another shape in model.safetensors: exit 2 "
       "naming the tensor", ("base",))
def _(p, inp):
    def damage(w):
        from safetensors.torch import load_file, save_file

        state = load_file(str(w / "model.safetensors"))
        key = "encoder.clip.text_projection.weight"
        state[key] = state[key][:, :-1].contiguous()
        save_file(state, str(w / "model.safetensors"))
    crafted_weights(p, inp, damage, ["encoder.clip.text_projection.weight"])


def same_size_damage(p: Probe, inp: Inputs, name: str, damage) -> None:
    """The newest checkpoint's `name` damaged without a size change: resume=latest names it,
    sets it aside and continues from the previous one (exit 0)."""
    run = copy_run(inp.base, p.dir / "run")
    ckpt = newest_ckpt(run)
    previous = sorted((run / "checkpoints").glob("step-????????"))[-2].name
    f = ckpt / name
    size = f.stat().st_size
    data = bytearray(f.read_bytes())
    damage(data)
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    d = p.run(train(run, inp.shards, *EMA, "train.epochs=1", "train.ckpt_every_steps=5",
                    "eval.final_split=none", "train.resume=latest"))
    resumed = events(run, "resumed")
    notes = " | ".join(resumed[-1].get("notes", [])) if resumed else ""
    p.check("exit 0", d.rc == 0)
    p.check("resumed from the previous checkpoint", previous in notes)
    p.check("the damaged one named", f"{ckpt.name} is damaged" in notes)
    p.check("set aside as .damaged", ckpt.with_name(ckpt.name + ".damaged").is_dir())


@probe("ckpt_samesize_header", "3", "model.safetensors' header overwritten (same size): "
       "fallback to the previous checkpoint, exit 0", ("base",))
def _(p, inp):
    def damage(data):
        data[8:16] = b"{broken!"
    same_size_damage(p, inp, "model.safetensors", damage)


@probe("ckpt_samesize_optimizer", "3", "optimizer.bin with bytes flipped mid-file (same size): "
       "fallback to the previous checkpoint, exit 0", ("base",))
def _(p, inp):
    def damage(data):
        mid = len(data) // 2
        data[mid: mid + 64] = bytes(b ^ 0xFF for b in data[mid: mid + 64])
    same_size_damage(p, inp, "optimizer.bin", damage)


@probe("ckpt_samesize_weights_data", "3", "model.safetensors with bytes flipped in its tensor "
       "data (same size, header intact): named and the previous checkpoint used, not loaded "
       "silently", ("base",))
def _(p, inp):
    def damage(data):
        mid = len(data) // 2
        data[mid: mid + 64] = bytes(b ^ 0xFF for b in data[mid: mid + 64])
    same_size_damage(p, inp, "model.safetensors", damage)


def damaged_shards(p: Probe, inp: Inputs, damage, steps: str = "train.max_steps=2") -> dict:
    """A copy of the shards with rank 1's first shard damaged, 2 ranks, 2 steps (a shard is read
    whole into the shuffle buffer; an image is decoded only when its batch comes: a whole epoch
    for those): the problem counted in log.jsonl's data event and metrics.json's data_problems."""
    shards = p.dir / "shards"
    shutil.copytree(inp.shards, shards)
    damage(shards / RANK1_SHARD)
    run = p.dir / "run"
    d = p.run(launch(run, shards, *NO_EVAL, steps))
    p.check("exit 0", d.rc == 0)
    data = events(run, "data")
    logged = {k: sum(e.get(k, 0) for e in data) for k in
              ("corrupt_shard", "bad_sample", "bad_image", "padded")}
    p.checks["log.jsonl data events"] = logged
    summary = {}
    if (run / "metrics.json").is_file():
        summary = json.loads((run / "metrics.json").read_text()).get("data_problems", {})
    p.checks["metrics.json data_problems"] = summary
    return logged


def _truncate(at):
    def damage(f: Path):
        with open(f, "r+b") as fh:
            fh.truncate(at)
    return damage


@probe("shard_truncated_512", "4", "rank 1's shard cut at a 512-byte boundary: corrupt_shard "
       "and padded counted in log.jsonl", ("data",))
def _(p, inp):
    logged = damaged_shards(p, inp, _truncate(150 * 512))
    ok = p.check("corrupt shard counted in log.jsonl", logged["corrupt_shard"] >= 1)
    p.check("padded counted in log.jsonl", logged["padded"] >= 1)
    p.counts["uncounted_data_problem"] = int(not ok)


@probe("shard_truncated_odd", "4", "rank 1's shard cut mid-block (150*512+100 bytes): "
       "corrupt_shard and padded counted in log.jsonl", ("data",))
def _(p, inp):
    logged = damaged_shards(p, inp, _truncate(150 * 512 + 100))
    ok = p.check("corrupt shard counted in log.jsonl", logged["corrupt_shard"] >= 1)
    p.check("padded counted in log.jsonl", logged["padded"] >= 1)
    p.counts["uncounted_data_problem"] = int(not ok)


@probe("corrupt_image", "holds", "a JPEG zeroed (same size) in rank 1's shard: skipped, "
       "bad_image counted in log.jsonl", ("data",))
def _(p, inp):
    def damage(f: Path):
        with tarfile.open(f) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".jpeg")))
        with open(f, "r+b") as fh:
            fh.seek(member.offset_data)
            fh.write(bytes(min(256, member.size)))
    logged = damaged_shards(p, inp, damage, "train.epochs=1")
    ok = p.check("bad image counted in log.jsonl", logged["bad_image"] >= 1)
    p.counts["uncounted_data_problem"] = int(not ok)


@probe("lr_inf", "5", "optim.lr=.inf from the start: exit 1 naming non-finite weights, no "
       "final/, best/, hf/ or checkpoint with non-finite tensors", ("data",))
def _(p, inp):
    run = p.dir / "run"
    d = p.run(train(run, inp.shards, *NO_EVAL, "optim.lr=.inf", "train.max_steps=4",
                    "train.ckpt_every_steps=1", "train.max_nonfinite_steps=100"))
    p.check("exit 1", d.rc == 1)
    p.check("the last line says non-finite", "non-finite" in d.last)
    p.check("no final/ or hf/", not (run / "final").exists() and not (run / "hf").exists())
    bad = nonfinite_files(run)
    p.check("no non-finite tensors written", not bad)
    p.counts["nonfinite_results"] = len(bad)
    if (run / "final").is_dir():                       # what the issue saw: exported anyway
        e = p.run([TBPS, "export", run / "final", p.dir / "hf"])
        p.check("export refused", e.rc != 0)


@probe("lr_inf_resumed", "5", "2 good steps, then resumed with optim.lr=.inf: exit 1 naming "
       "the last good checkpoint; final/ the first run's and finite", ("data",))
def _(p, inp):
    import torch
    from safetensors.torch import load_file

    run = p.dir / "run"
    common = [*NO_EVAL, "train.ckpt_every_steps=1", "train.max_nonfinite_steps=100"]
    p.run(train(run, inp.shards, *common, "train.max_steps=2"))
    before = load_file(str(run / "final" / "model.safetensors"))
    d = p.run(train(run, inp.shards, *common, "train.max_steps=4", "train.resume=latest",
                    "optim.lr=.inf"))
    p.check("exit 1", d.rc == 1)
    p.check("the message names step-00000002", "step-00000002" in d.out)
    after = load_file(str(run / "final" / "model.safetensors"))
    p.check("final/ untouched", all(torch.equal(before[k], after[k]) for k in before))
    bad = nonfinite_files(run)
    p.check("no non-finite tensors written", not bad)
    p.counts["nonfinite_results"] = len(bad)


@probe("evaluate_out_run", "6", "`evaluate RUN/best --out RUN` leaves metrics.json as it was "
       "and writes its own evaluation.json", ("base",))
def _(p, inp):
    run = copy_run(inp.base, p.dir / "run")
    before = (run / "metrics.json").read_bytes()
    d = p.run([TBPS, "evaluate", run / "best", "--split", "val", "--out", run])
    p.check("exit 0", d.rc == 0)
    p.check("metrics.json unchanged", (run / "metrics.json").read_bytes() == before)
    p.check("evaluation.json written", (run / "evaluation.json").is_file())


def pretrained_start(p: Probe, inp: Inputs, source: Path) -> None:
    """model.pretrained=<source>, one step at lr 1e-30 (the weights cannot move in fp32): the
    new run's final/ equals the source's tensors, nothing UNEXPECTED or MISSING."""
    import torch
    from safetensors.torch import load_file

    run = p.dir / "run"
    d = p.run(train(run, inp.shards, *NO_EVAL, f"model.pretrained={source}", "optim.lr=1e-30",
                    "train.max_steps=1"))
    p.check("exit 0", d.rc == 0)
    p.check("no UNEXPECTED/MISSING table", "UNEXPECTED" not in d.out and "MISSING" not in d.out)
    if d.rc != 0:
        return
    want = load_file(str(source / "model.safetensors"))
    got = load_file(str(run / "final" / "model.safetensors"))
    encoder = [k for k in want if k.startswith("encoder.")]
    same = [k for k in encoder if k in got and got[k].shape == want[k].shape
            and torch.allclose(got[k], want[k], rtol=0, atol=1e-6)]
    p.checks["encoder tensors equal to the source"] = f"{len(same)} of {len(encoder)}"
    ok = p.check("the start is the source's tensors", encoder and len(same) == len(encoder))
    p.counts["silent_random_start"] = int(not ok)


@probe("pretrained_final", "7", "model.pretrained=RUN/final: the run starts from its tensors",
       ("base",))
def _(p, inp):
    pretrained_start(p, inp, inp.base / "final")


@probe("pretrained_checkpoint", "7", "model.pretrained=RUN/checkpoints/step-00000010: the run "
       "starts from its tensors", ("base",))
def _(p, inp):
    pretrained_start(p, inp, inp.base / "checkpoints" / "step-00000010")


def misfit(folder: Path, src: Path) -> Path:
    """A copy of a weights folder with one tensor missing and one unexpected."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["encoder.clip.text_projection.weight"]
    state["encoder.clip.surplus.weight"] = state["encoder.clip.logit_scale"].clone().reshape(1)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@probe("pretrained_misfit", "7", "model.pretrained=<a folder with a tensor missing and one "
       "unexpected>: exit 2 naming both, no folder left", ("base",))
def _(p, inp):
    w = misfit(p.dir / "misfit", inp.base / "final")
    run = p.dir / "run"
    d = p.run(train(run, inp.shards, *NO_EVAL, f"model.pretrained={w}", "train.max_steps=1"))
    p.check("exit 2", d.rc == 2)
    p.check("no traceback", not traceback_in(d.out))
    p.check("names the missing tensor", "encoder.clip.text_projection.weight" in d.out)
    p.check("names the unexpected tensor", "encoder.clip.surplus.weight" in d.out)
    p.check("no run folder left", not run.exists())
    p.counts["silent_random_start"] = int(d.rc == 0)


@probe("search_empty_query", "8", "`search query IDX \"\"` and a blank query: exit 2, no hits",
       ("index",))
def _(p, inp):
    for q in ("", "   "):
        d = p.run([TBPS, "search", "query", inp.index, q])
        p.check(f"{q!r}: exit 2", d.rc == 2)
        p.check(f"{q!r}: no traceback", not traceback_in(d.out))


@probe("search_reindex_damaged", "8", "re-indexing into a damaged index: refused (exit 2) "
       "with advice that names removing it; following the advice works", ("index",))
def _(p, inp):
    ix = copy_run(inp.index, p.dir / "ix")
    f = ix / "index.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cmd = [TBPS, "search", "index", inp.base / "best", inp.shards, "--split", "test", "--out",
           ix, "--no-progress"]
    d = p.run(cmd)
    p.check("exit 2", d.rc == 2)
    p.check("no traceback", not traceback_in(d.out))
    advice = d.last.lower()
    p.check("advice names removing the folder", any(w in advice for w in
                                                     ("remove", "delete", "rm -r")))
    shutil.rmtree(ix)                                 # following the advice
    again = p.run(cmd)
    p.check("rebuilt after removal: exit 0", again.rc == 0)


@probe("setup_fail_no_folder", "8", "a run that fails at set-up (missing tokenizer, missing "
       "pretrained folder): exit 2, no output folder left", ("data",))
def _(p, inp):
    for i, bad in enumerate([f"data.tokenizer={p.dir / 'no-tokenizer'}",
                             f"model.pretrained={p.dir / 'no-weights'}"]):
        run = p.dir / f"run{i}"
        d = p.run(train(run, inp.shards, *NO_EVAL, "train.max_steps=1", bad))
        p.check(f"{bad.split('=')[0]}: exit 2", d.rc == 2)
        p.check(f"{bad.split('=')[0]}: no traceback", not traceback_in(d.out))
        p.check(f"{bad.split('=')[0]}: no folder left", not run.exists())


def launcher_screen(p: Probe, d: Done, code: int) -> None:
    """Exit `code`, no traceback anywhere, the rank's message last or just before the wrapper's
    'tbps launch: exit code N' (which the wrapper prints only where accelerate failed: recorded,
    not required)."""
    lines = last_lines(d.out, 3)
    p.check(f"exit {code}", d.rc == code)
    p.check("no traceback or ChildFailedError", not traceback_in(d.out))
    said = lines[-1] == f"tbps launch: exit code {code}" if lines else False
    p.checks["last line 'tbps launch: exit code N'"] = "yes" if said else "no"
    message = lines[-2] if said and len(lines) >= 2 else (lines[-1] if lines else "")
    p.check("the rank's message last", message.startswith("error"))


@probe("launcher_exit1", "8", "under tbps launch (2 ranks), optim.lr=.inf: the last screen is "
       "the rank's message and 'exit code 1', no traceback", ("data",))
def _(p, inp):
    d = p.run(launch(p.dir / "run", inp.shards, *NO_EVAL, "optim.lr=.inf",
                     "train.ckpt_every_steps=1", "train.max_nonfinite_steps=100",
                     "train.max_steps=4"))
    launcher_screen(p, d, 1)
    bad = nonfinite_files(p.dir / "run") if (p.dir / "run").exists() else []
    p.counts["nonfinite_results"] = len(bad)


@probe("launcher_exit2", "8", "under tbps launch (2 ranks), model.pretrained=<misfit>: the "
       "message is the last line, said once, exit 2, no traceback", ("base",))
def _(p, inp):
    w = misfit(p.dir / "misfit", inp.base / "final")
    d = p.run(launch(p.dir / "run", inp.shards, *NO_EVAL, f"model.pretrained={w}",
                     "train.max_steps=2"))
    launcher_screen(p, d, 2)
    p.check("said once", d.out.count("encoder.clip.text_projection.weight") <= 1)
    p.counts["silent_random_start"] = int(d.rc == 0)


@probe("launcher_exit2_resume", "8", "under tbps launch (2 ranks), train.resume=<a checkpoint "
       "with a crafted optimizer.bin>: exit 2, the message once, no traceback, marker absent",
       ("base",))
def _(p, inp):
    run = copy_run(inp.base, p.dir / "run")
    ckpt, marker = newest_ckpt(run), p.dir / "MARKER-code-ran"
    plant(ckpt, "optimizer.bin", marker)
    d = p.run(launch(run, inp.shards, *EMA, "train.epochs=1", "train.ckpt_every_steps=5",
                     "eval.final_split=none", f"train.resume={ckpt}"))
    launcher_screen(p, d, 2)
    p.check("said once", d.out.count("optimizer.bin cannot be read") == 1)
    p.check("marker absent", not marker.exists())
    p.counts["code_ran"] = int(marker.exists())


@probe("sigusr1_resume", "holds", "SIGUSR1 to tbps launch stops both ranks (exit 3, none left) "
       "and the resume gives the uninterrupted run's losses", ("data",))
def _(p, inp):
    import psutil

    common = [*NO_EVAL, "train.max_steps=8", "train.ckpt_every_steps=100"]
    ref = p.run(launch(p.dir / "ref", inp.shards, *common))
    run = p.dir / "run"
    s = Started(launch(run, inp.shards, *common), p.dir / "stopped.log")
    deadline = time.time() + 180
    while time.time() < deadline and s.proc.poll() is None and not any(
            e.get("step", 0) >= 2 for e in events(run, "step")):
        time.sleep(0.05)
    t0 = time.time()
    s.proc.send_signal(signal.SIGUSR1)
    stopped = p.finished(s.wait())
    p.checks["seconds from the signal to the exit"] = round(time.time() - t0, 1)
    p.check("exit 3", stopped.rc == 3)
    time.sleep(1)
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run) in a for a in (proc.info["cmdline"] or [])):
                left.append(proc.pid)
        except psutil.Error:
            pass
    p.check("no rank left running", not left)
    stop = events(run, "stopped")
    p.check("a stopped event", bool(stop))
    resumed = p.run(launch(run, inp.shards, *common, "train.resume=latest"))
    p.check("resume exit 0", resumed.rc == 0)
    losses = lambda r: {e["step"]: e["loss"] for e in events(r, "step")}  # noqa: E731
    a, b = losses(run), losses(p.dir / "ref")
    p.check("reference exit 0", ref.rc == 0)
    p.check("every step's loss as the uninterrupted run's (rel 1e-5)", sorted(a) == sorted(b)
            and all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) + 1e-6 for k in b))


BAD_CONFIGS = ["train.epochs=0", "train.epoch=3", "train.precision=fp8", "optim.lr=-1",
               "optim.lr=abc", "data.batch_size=0", "train.collective_timeout_s=0",
               "eval.select_split=bogus", "recipe.losses=[{kind: nope}]",
               "data.shards=/nonexistent/shards", "model.image_size=[96]"]


@probe("bad_configs", "holds", "each bad override (and a missing --config file): exit 2, the "
       "last line one 'error:' line naming it, no traceback", ("data",))
def _(p, inp):
    # named: the field, or for a path the path itself
    cases = [(train(p.dir / f"run{i}", inp.shards, *NO_EVAL, bad),
              bad.split("=", 1)[1] if bad.startswith("data.shards") else bad.split("=")[0])
             for i, bad in enumerate(BAD_CONFIGS)]
    cases.append(([TBPS, "train", "--config", p.dir / "nope.yaml"], "nope.yaml"))
    for cmd, name in cases:
        d = p.run(cmd)
        p.check(f"{name}: exit 2, no traceback, named in the last line",
                d.rc == 2 and not traceback_in(d.out) and d.last.startswith("error")
                and name in d.last)


# -- the record ----------------------------------------------------------------------------


def run_probe(name: str, inp: Inputs) -> dict:
    fn, item, expect, needs = PROBES[name]
    for n in needs:
        inp.need(n)
    folder = inp.work / "probes" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    p = Probe(name, folder)
    t0 = time.time()
    error = None
    try:
        fn(p, inp)
    except Exception as exc:               # noqa: BLE001 (the probe's own fault: recorded)
        import traceback
        error = "".join(traceback.format_exception(exc))[-2000:]
    bad = nonfinite_files(folder)          # any probe's written results, not only lr_inf's
    if bad and not p.counts["nonfinite_results"]:
        p.counts["nonfinite_results"] = len(bad)
    held = error is None and bool(p.checks) and all(
        v for v in p.checks.values() if isinstance(v, bool))
    return {"name": name, "item": item, "expect": expect, "held": held,
            "exit_codes": [d.rc for d in p.done],
            "traceback": any(traceback_in(d.out) for d in p.done),
            "last_lines": last_lines(p.done[-1].out) if p.done else [],
            "checks": p.checks, "counts": p.counts, "commands": [d.record() for d in p.done],
            "probe_error": error, "wall_s": round(time.time() - t0, 1)}


TARGETS = [("files that execute code on load", "code_ran"),
           ("mixed run folders", "mixed_folder"),
           ("probes with a Python traceback", None),
           ("results with non-finite weights", "nonfinite_results"),
           ("silent random starts", "silent_random_start"),
           ("data problems not counted in log.jsonl", "uncounted_data_problem")]


def summary(records: dict) -> list[tuple[str, int]]:
    rows = []
    for label, key in TARGETS:
        if key is None:
            rows.append((label, sum(r["traceback"] for r in records.values())))
        else:
            rows.append((label, sum(r["counts"].get(key, 0) for r in records.values())))
    return rows


def meta() -> dict:
    import torch

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "commit": git("rev-parse", "HEAD"),
            "tree_modified": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join([sys.executable, *sys.argv])}


def write(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(results))


def markdown(results: dict) -> str:
    recs = [results["probes"][n] for n in PROBES if n in results["probes"]]
    m = results["meta"]
    total = sum(r["wall_s"] for r in recs)
    out = ["# Issue 24's fault probes, re-run through the CLI", "",
           f"`launch/fault_probes.py`; {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
           f"torch {m['torch']}, commit {m['commit'][:10]}"
           f"{' (tree modified)' if m.get('tree_modified') else ''}; "
           f"{len(recs)} of {len(PROBES)} probes, {total / 60:.1f} min of probes "
           f"(inputs built: {results.get('inputs_s', 0):.0f} s); the last invocation ran "
           f"{len(results.get('last_invocation', {}).get('probes', []))} probe(s) in "
           f"{results.get('last_invocation', {}).get('wall_s', 0) / 60:.1f} min.", "",
           "## Targets (each should be 0)", "", "| target | reached |", "|---|---|"]
    out += [f"| {label} | {n} |" for label, n in summary(results["probes"])]
    out += ["", "## Probes", "", "| probe | issue item | held | exit codes | traceback | s |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['name']} | {r['item']} | {'yes' if r['held'] else '**no**'} | "
            f"{' '.join(map(str, r['exit_codes']))} | {'yes' if r['traceback'] else 'no'} | "
            f"{r['wall_s']:.0f} |" for r in recs]
    failed = [r for r in recs if not r["held"]]
    out += ["", "## Did not hold", ""] + ([] if failed else ["None."])
    for r in failed:
        out += [f"### {r['name']} (item {r['item']})", "", f"Expected: {r['expect']}.", ""]
        out += [f"- {k}: {v}" for k, v in r["checks"].items()]
        if r["probe_error"]:
            out += ["", "The probe itself failed:", "", "```", r["probe_error"], "```"]
        for c in r["commands"]:
            seen = ["(a Python traceback or ChildFailedError appeared above)"] if c["traceback"] else []
            out += ["", "```", f"$ {c['cmd']}", *seen, *c["last_lines"], f"(exit {c['rc']})", "```"]
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run this probe (again) and no other (repeatable)")
    ap.add_argument("--work", type=Path, help="folder for data, runs and logs (default: temp)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--redo", action="store_true", help="forget the recorded probes")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, item, expect, _) in PROBES.items():
            print(f"{name:26s} [{item}] {expect}")
        return 0
    unknown = [n for n in args.only if n not in PROBES]
    if unknown:
        raise SystemExit(f"error: unknown probe(s) {unknown}; --list shows them")
    results = {"probes": {}}
    if args.results.is_file() and not args.redo:
        results = json.loads(args.results.read_text())
    results["meta"] = meta()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_probes-"))
    work.mkdir(parents=True, exist_ok=True)
    inp = Inputs(work.resolve())
    todo = args.only or [n for n in PROBES if n not in results["probes"]]
    print(f"fault_probes: {len(todo)} probe(s) to run in {work} "
          f"({len(results['probes'])} recorded in {args.results})", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: {PROBES[name][2]}", flush=True)
        t0 = time.time()
        rec = run_probe(name, inp)
        built = time.time() - t0 - rec["wall_s"]
        results["inputs_s"] = round(results.get("inputs_s", 0) + built, 1)
        results["probes"][name] = rec
        results["last_invocation"] = {"probes": todo[:i], "wall_s": round(time.time() - started, 1)}
        write(results, args.results)
        failed = [k for k, v in rec["checks"].items() if v is False]
        print(f"  -> {'held' if rec['held'] else 'DID NOT HOLD'} in {rec['wall_s']:.0f}s"
              + (f"; failed: {failed}" if failed else "")
              + ("; probe error" if rec["probe_error"] else ""), flush=True)
    if not results["probes"]:
        return 0
    write(results, args.results)
    print("\ntarget                                      reached (should be 0)")
    for label, n in summary(results["probes"]):
        print(f"  {label:42s} {n}")
    recs = results["probes"].values()
    print(f"{sum(r['held'] for r in recs)} of {len(recs)} probes held; "
          f"{sum(r['wall_s'] for r in recs) / 60:.1f} min; {results['meta']['cpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
