"""The noisy-correspondence study: methods x noise rates x training seeds, from one backbone.

    tbps study run                                   # the default study (2 CPU cores)
    tbps study run --results launch/results/noise_study        # + the committed report
    tbps study run --only irra rde --seeds 0 --rates 0 0.5     # a part of it
    tbps study run --noise-seeds 1 --rates 0.5                  # a second noise draw
    tbps study run --method rde-cls=launch/configs/rde_synth.yaml \\
        recipe.image_tokens.kind=attention recipe.image_tokens.score=cls --ablation rde-cls=rde
    tbps study run --protocol scratch                # every method from random weights
    tbps study run --study launch/configs/noise_study_gpu.yaml  # the larger setting
    tbps study run --dry-run                         # the plan and its predicted time
    tbps study run optim.lr=1e-4 --only irra         # overrides for every run: first

The study file (launch/configs/noise_study.yaml) names the benchmark population, the noise rates
and seeds, the training seeds, the protocol (the backbone `tbps pretrain` makes, and
the fine-tuning schedule every method shares) and the methods: a method is a training config plus
overrides, a preset or a combination of parts (README: Recipes from parts). Overrides for every
run (section.field=value) come before the options, which take the words after them. `--method
NAME=CONFIG [override ...]` adds or replaces one method (repeatable), `--methods-file FILE` adds
those of a YAML mapping shaped like the study's `methods:`, `--ablation NAME=OTHER` pairs a
method with its ablation in the report (paired differences against it and against irra).

Steps: synthesise the benchmark and shard it once per noise rate and noise seed (the RDE protocol,
nested rates per noise seed, the shared vocabulary); make or reuse the backbone and evaluate it
untuned; predict the time of the runs still to do (the mean wall time of this study's finished
runs of the method, else the study file's stored estimate); then each run in turn, 2 processes
under `accelerate launch`. A run whose folder holds metrics.json from the same command is skipped,
an interrupted one resumes, and one made with another command stops the study with the
difference (remove that folder, or choose another --out). After every run its row goes into
<out>/results.json and the report (trainer/tools/study_report.py: tables, targets, plots) is rewritten
into --results (default <out>/<protocol>/report). `--backbone FOLDER` fine-tunes a given
model.pretrained folder instead; `--benchmark train_ids=300` changes the benchmark's size.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.synthetic import META_FILE
from tbps.kernels.environment import environment as machine_record
from tbps.trainer.tools import study_report
from tbps.trainer.tools.pretrain import PretrainSettings, ensure_backbone, zero_shot

REPO = Path(__file__).resolve().parents[2]

DEFAULT_STUDY = "launch/configs/noise_study.yaml"


@dataclass(frozen=True)
class Method:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    ablation: str | None = None

    def as_dict(self) -> dict:
        return {"config": self.config, "overrides": list(self.overrides),
                "ablation": self.ablation}


@dataclass(frozen=True)
class Job:
    method: Method
    rate: float
    noise_seed: int
    seed: int

    @property
    def tag(self) -> str:
        noise = "n00" if self.rate == 0 else f"n{round(self.rate * 100):02d}-ns{self.noise_seed}"
        return f"{self.method.name}/{noise}-s{self.seed}"


@dataclass
class Study:
    benchmark: dict
    rates: list[float]
    noise_seeds: list[int]
    seeds: list[int]
    protocol: str
    backbone: dict | None
    overrides: list[str]
    methods: dict[str, Method]
    launcher: dict = field(default_factory=dict)
    estimates_s: dict = field(default_factory=dict)
    description: str = ""

    def jobs(self) -> list[Job]:
        """Seed-major (a first pass over every method and rate with seed 0 is a study of its
        own), clean runs once (they need no noise seed)."""
        out = []
        for seed in self.seeds:
            for rate in self.rates:
                for ns in ([self.noise_seeds[0]] if rate == 0 else self.noise_seeds):
                    out += [Job(m, rate, ns, seed) for m in self.methods.values()]
        return out


# -- the study file and the command line ---------------------------------------------------------

def parse_method(tokens: list[str]) -> Method:
    """["NAME=CONFIG", "override", ...] -> Method."""
    if not tokens or "=" not in tokens[0]:
        raise ValueError(f"--method {' '.join(tokens)}: expected NAME=CONFIG [override ...]")
    name, config = tokens[0].split("=", 1)
    if not name or "/" in name or not config:
        raise ValueError(f"--method {tokens[0]}: NAME (no '/') and CONFIG must both be given")
    bad = [t for t in tokens[1:] if "=" not in t]
    if bad:
        raise ValueError(f"--method {name}: {bad} are not section.field=value overrides")
    return Method(name, config, tuple(tokens[1:]))


def methods_from(mapping: dict) -> dict[str, Method]:
    out = {}
    for name, spec in (mapping or {}).items():
        if not isinstance(spec, dict) or "config" not in spec:
            raise ValueError(f"method {name!r}: a mapping with config: (and overrides:, "
                             "ablation:) is expected")
        unknown = set(spec) - {"config", "overrides", "ablation"}
        if unknown:
            raise ValueError(f"method {name!r}: unknown keys {sorted(unknown)}")
        out[name] = parse_method([f"{name}={spec['config']}", *spec.get("overrides", [])])
        out[name] = dataclasses.replace(out[name], ablation=spec.get("ablation"))
    return out


def load_study(args) -> Study:
    raw = yaml.safe_load(Path(args.study).read_text())
    protocol = args.protocol or raw["protocol"]
    if protocol not in raw["protocols"]:
        raise ValueError(f"--protocol {protocol}: the study file has {sorted(raw['protocols'])}")
    proto = raw["protocols"][protocol]
    methods = methods_from(raw["methods"])
    if args.methods_file:
        methods.update(methods_from(yaml.safe_load(Path(args.methods_file).read_text())))
    for tokens in args.method or []:
        m = parse_method(tokens)
        methods[m.name] = dataclasses.replace(m, ablation=methods.get(m.name, m).ablation)
    for pair in args.ablation or []:
        name, _, other = pair.partition("=")
        if name not in methods or other not in methods:
            raise ValueError(f"--ablation {pair}: both must be methods of the study "
                             f"({sorted(methods)})")
        methods[name] = dataclasses.replace(methods[name], ablation=other)
    if args.only:
        unknown = [m for m in args.only if m not in methods]
        if unknown:
            raise ValueError(f"--only {unknown}: not methods of the study ({sorted(methods)})")
        methods = {m: methods[m] for m in args.only}
    benchmark = dict(raw["benchmark"])
    for item in args.benchmark or []:
        key, sep, value = item.partition("=")
        if not sep or key not in benchmark:
            raise ValueError(f"--benchmark {item}: KEY=VALUE with KEY one of {sorted(benchmark)}")
        benchmark[key] = yaml.safe_load(value)
    backbone = proto.get("backbone")
    if args.backbone:
        if not backbone:
            raise ValueError(f"--backbone: the {protocol} protocol fine-tunes no backbone")
        backbone = {"folder": args.backbone}
        proto = {**proto, "description": f"Every method fine-tunes the given backbone "
                 f"{args.backbone} with the same schedule."}
    return Study(benchmark=benchmark,
                 rates=sorted(args.rates if args.rates is not None else raw["noise"]["rates"]),
                 noise_seeds=args.noise_seeds or raw["noise"]["seeds"],
                 seeds=args.seeds if args.seeds is not None else raw["seeds"],
                 protocol=protocol, backbone=backbone,
                 overrides=[*raw.get("overrides", []), *proto.get("overrides", []),
                            *args.overrides],
                 methods=methods, launcher=raw.get("launcher", {}),
                 estimates_s=raw.get("estimates_s", {}).get(protocol, {}),
                 description=(proto.get("description") or "").strip())


# -- data and backbone ---------------------------------------------------------------------------

def _run(cmd: list, log: Path | None = None) -> None:
    cmd = [str(c) for c in cmd]
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    with open(log, "a") if log else open(os.devnull, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:8])} ..."
                           + (f" (output in {log})" if log else ""))


def shards_dir(data: Path, rate: float, noise_seed: int) -> Path:
    return data / ("shards-n00" if rate == 0 else
                   f"shards-n{round(rate * 100):02d}-ns{noise_seed}")


def prepare_data(study: Study, data: Path) -> None:
    """The benchmark (stopping if the folder holds another one) and its shards."""

    b, synth = study.benchmark, data / "synth"
    flags = {"seed": b["seed"], "train-ids": b["train_ids"], "val-ids": b["val_ids"],
             "test-ids": b["test_ids"], "images-per-id": b.get("images_per_id", 4)}
    if (synth / "reid_raw.json").is_file():
        have = json.loads((synth / META_FILE).read_text())[0]["config"]
        want = {"seed": b["seed"], "num_train_ids": b["train_ids"], "num_val_ids": b["val_ids"],
                "num_test_ids": b["test_ids"], "images_per_id": b.get("images_per_id", 4)}
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"{synth} holds another benchmark ({diff}): use another --data")
    else:
        _run([sys.executable, "-m", "tbps.data_pipeline.cli", "synth", "--out", synth,
              *[x for k, v in flags.items() for x in (f"--{k}", v)], "--workers", 2, "--quiet",
              "--overwrite"])
    for rate in study.rates:
        for ns in ([study.noise_seeds[0]] if rate == 0 else study.noise_seeds):
            out = shards_dir(data, rate, ns)
            if (out / "manifest.parquet").is_file():
                opts = read_meta(out).get("options", {})
                if abs(opts.get("noise_rate", 0) - rate) > 1e-9 or \
                        (rate and opts.get("noise_seed") != ns):
                    raise ValueError(f"{out} holds other noise ({opts}): remove it")
                continue
            _run([sys.executable, "-m", "tbps.data_pipeline.cli", "shard", "--format", "cuhk-pedes",
                  "--root", synth, "--out", out, "--noise-rate", rate, "--noise-seed", ns,
                  "--tokenizer", "synthetic-vocab", "--workers", 2, "--quiet"])


def prepare_backbone(study: Study, out: Path, data: Path) -> tuple[Path | None, dict | None]:
    """The backbone folder and its untuned test metrics on the clean shards (None: scratch)."""
    if not study.backbone:
        return None, None

    if "folder" in study.backbone:
        backbone = Path(study.backbone["folder"])
        return backbone, zero_shot(backbone, shards_dir(data, 0.0, 0))
    b = dict(study.backbone)
    b["overrides"] = tuple(b.get("overrides", ()))
    settings = PretrainSettings(benchmark=str(data / "synth"), **b,
                                processes=study.launcher.get("processes", 2),
                                accelerate_config=study.launcher.get(
                                    "accelerate_config", "launch/accelerate/cpu_ddp.yaml"))
    backbone = ensure_backbone(out / "backbone", settings)
    return backbone, zero_shot(backbone, shards_dir(data, 0.0, 0))


# -- runs ----------------------------------------------------------------------------------------

def command(study: Study, job: Job, data: Path, run_dir: Path, backbone: Path | None) -> list[str]:
    launcher = study.launcher
    overrides = [o.replace("{backbone}", str(backbone)) for o in study.overrides]
    return ["-m", "accelerate.commands.launch", "--config_file",
            launcher.get("accelerate_config", "launch/accelerate/cpu_ddp.yaml"),
            "--num_processes", str(launcher.get("processes", 2)), "-m", "tbps.trainer.train",
            "--config", job.method.config, *overrides, *job.method.overrides,
            f"data.shards={shards_dir(data, job.rate, job.noise_seed)}",
            f"train.output_dir={run_dir}", f"train.seed={job.seed}"]


def run_spec(cmd: list[str], backbone: Path | None) -> dict:
    """What must be equal for a finished run to count: the command and the backbone's
    settings (the same folder may have been remade)."""
    spec = {"command": cmd}
    if backbone is not None:
        record = backbone.parent / "pretrain.json"
        weights = record if record.is_file() else backbone / "model.safetensors"
        spec["backbone_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return spec


def status(run_dir: Path, spec: dict) -> str:
    """"done", "resume", "new"; ValueError for a folder of another command."""
    saved = run_dir / "study_run.json"
    if saved.is_file():
        have = json.loads(saved.read_text())["spec"]
        if have != spec:
            a, b = set(have.get("command", [])), set(spec.get("command", []))
            what = sorted(a ^ b) or [k for k in set(have) | set(spec)
                                      if have.get(k) != spec.get(k)]
            raise ValueError(f"{run_dir} holds a run of another command (differs in {what}); "
                             "remove that folder to run it again, or choose another --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds something this study did not start: remove it")
    if (run_dir / "metrics.json").is_file():
        return "done"
    return "resume" if (run_dir / "checkpoints").exists() else "new"


def train(job: Job, cmd: list[str], run_dir: Path, spec: dict, state: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"spec": spec, "method": job.method.as_dict(),
              "job": {"method": job.method.name, "rate": job.rate, "noise_seed": job.noise_seed,
                      "seed": job.seed}}
    (run_dir / "study_run.json").write_text(json.dumps(record, indent=1) + "\n")
    t0, load0 = time.time(), os.getloadavg()[0]
    _run([sys.executable, *cmd, *(["train.resume=latest"] if state == "resume" else [])],
         run_dir.parent / f"{run_dir.name}.log")
    timing = run_dir / "timing.json"               # an interrupted run adds its parts
    wall = time.time() - t0
    if state == "resume" and timing.is_file():
        wall += json.loads(timing.read_text())["wall_s"]
    timing.write_text(json.dumps({"wall_s": round(wall), "load_start": round(load0, 2),
                                  "load_end": round(os.getloadavg()[0], 2),
                                  "cpus": os.cpu_count()}) + "\n")


def finished_runs(out: Path) -> tuple[list[dict], dict[str, dict]]:
    """Every finished run under `out` (whatever invocation made it): its row, and the methods'
    configs as the runs recorded them."""
    rows, methods = [], {}
    for record in sorted(out.glob("*/*/study_run.json")):
        run_dir = record.parent
        if not (run_dir / "metrics.json").is_file():
            continue
        info = json.loads(record.read_text())
        tag = f"{run_dir.parent.name}/{run_dir.name}"
        rows.append({"tag": tag, **info["job"], **study_report.summarize(run_dir)})
        methods.setdefault(info["job"]["method"], info["method"])
    return rows, methods


def estimate(job: Job, rows: list[dict], stored: dict) -> tuple[float | None, str]:
    walls = [r["wall_s"] for r in rows if r["method"] == job.method.name and r.get("wall_s")]
    if walls:
        return sum(walls) / len(walls), "measured"
    if job.method.name in stored:
        return float(stored[job.method.name]), "stored"
    return None, "unknown"


def predict(todo: list[Job], rows: list[dict], stored: dict) -> tuple[float, list[str]]:
    """Seconds for the runs still to do, and the methods with no estimate (for those: the mean
    of the other methods' estimates, else of every measured run, until one of theirs is
    measured)."""
    if not todo:
        return 0.0, []
    per = {j.method.name: estimate(j, rows, stored)[0] for j in todo}
    known = [v for v in per.values() if v is not None]
    walls = [r["wall_s"] for r in rows if r.get("wall_s")]
    fallback = (sum(known) / len(known) if known else sum(walls) / len(walls) if walls
                else None)
    unknown = sorted(m for m, v in per.items() if v is None)
    if fallback is None:
        return float("nan"), unknown
    return sum(per[j.method.name] or fallback for j in todo), unknown


def environment(argv: list[str]) -> dict:
    """This invocation's environment record, with the device it trains on."""
    env = machine_record("tbps study run", argv)
    device = f"GPU: {env['gpu']}" if env["gpu"] else f"CPU only, {env['cores']} cores"
    return {"device": device, **env}


def _minutes(s: float) -> str:
    return "?" if s != s else f"{s / 60:.0f} min"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tbps study run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=DEFAULT_STUDY, help="the study file")
    p.add_argument("--protocol", help="pretrained or scratch (default: the study file's)")
    p.add_argument("--out", default="runs/noise-study", help="run folders (under <protocol>/)")
    p.add_argument("--data", default="data/noise-study", help="benchmark and shards")
    p.add_argument("--results", help="where the report goes (default <out>/<protocol>/report)")
    p.add_argument("--rates", type=float, nargs="+")
    p.add_argument("--noise-seeds", type=int, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="run these methods only")
    p.add_argument("--method", nargs="+", action="append", metavar="NAME=CONFIG [OVERRIDE]",
                   help="add or replace a method (repeatable)")
    p.add_argument("--methods-file", help="YAML mapping NAME: {config, overrides, ablation}")
    p.add_argument("--ablation", action="append", metavar="NAME=OTHER")
    p.add_argument("--benchmark", action="append", metavar="KEY=VALUE",
                   help="change a field of the study file's benchmark (e.g. train_ids=300)")
    p.add_argument("--backbone", help="fine-tune this model.pretrained folder instead of "
                   "making the study file's backbone")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("overrides", nargs="*", help="section.field=value for every run")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if Path.cwd().resolve() != REPO:             # commands and records use repository paths
        for name in ("study", "out", "data", "results", "methods_file"):
            if getattr(args, name):
                setattr(args, name, str(Path(getattr(args, name)).resolve()))
        os.chdir(REPO)
    try:
        study = load_study(args)
        out, data = Path(args.out) / study.protocol, Path(args.data)
        results_dir = Path(args.results) if args.results else out / "report"
        jobs = study.jobs()
        rows, _ = finished_runs(out)
        done = {r["tag"] for r in rows}
        todo = [j for j in jobs if j.tag not in done]
        total, unknown = predict(todo, rows, study.estimates_s)
        print(f"noise study ({study.protocol}): {len(jobs)} runs, {len(jobs) - len(todo)} "
              f"finished, {len(todo)} to do; predicted {_minutes(total)}"
              + (f" (no estimate yet for {', '.join(unknown)}: the others' mean is used)"
                 if unknown else ""), flush=True)
        if args.dry_run:
            return 0
        prepare_data(study, data)
        backbone, zs = prepare_backbone(study, out, data)
        env = environment(argv)
        plan = {}
        for job in jobs:                                   # check every folder before training
            cmd = command(study, job, data, out / job.tag, backbone)
            spec = run_spec(cmd, backbone)
            plan[job.tag] = (cmd, spec, status(out / job.tag, spec))
        t_start = time.time()
        for i, job in enumerate(todo, 1):
            cmd, spec, state = plan[job.tag]
            train(job, cmd, out / job.tag, spec, state)
            rows, _ = finished_runs(out)
            row = next(r for r in rows if r["tag"] == job.tag)
            remaining, _ = predict(todo[i:], rows, study.estimates_s)
            print(f"[{i}/{len(todo)}] {job.tag}: R1 {row['R1']:.1f} mAP {row['mAP']:.1f} "
                  f"({row['wall_s']} s); elapsed {_minutes(time.time() - t_start)}, about "
                  f"{_minutes(remaining)} to go", flush=True)
            save(out, results_dir, study, jobs, zs, env, cmd)
        save(out, results_dir, study, jobs, zs, env, plan[jobs[0].tag][0] if jobs else [])
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def save(out: Path, results_dir: Path, study: Study, jobs: list[Job], zs: dict | None,
         env: dict, cmd: list[str]) -> dict:
    """<out>/results.json (every finished run in the folder) and the report beside a copy."""
    rows, recorded = finished_runs(out)
    previous = out / "results.json"            # every invocation that added runs to this folder
    pieces = (study_report.invocations(json.loads(previous.read_text()).get("environment", {}))
              if previous.is_file() else [])
    here = {"commit": env.get("commit"), "command": env.get("command")}
    env = {**env, "pieces": [p for p in pieces if p != here and p.get("command")] + [here]}
    methods = {**recorded, **{m.name: m.as_dict() for m in study.methods.values()}}
    order = list(study.methods) + sorted(set(recorded) - set(study.methods))
    tags = {r["tag"] for r in rows}
    results = {"study": {"protocol": study.protocol, "description": study.description,
                         "benchmark": study.benchmark,
                         "rates": sorted(set(study.rates) | {r["rate"] for r in rows}),
                         "noise_seeds": study.noise_seeds, "seeds": study.seeds,
                         "backbone": study.backbone, "overrides": study.overrides,
                         "methods": {m: methods[m] for m in order}},
               "environment": env, "zero_shot": zs, "runs": rows,
               "missing": [j.tag for j in jobs if j.tag not in tags],
               "example_command": " ".join(["python", *cmd])}
    text = json.dumps(results, indent=1) + "\n"
    (out / "results.json").write_text(text)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(text)
    study_report.write_report(results, results_dir)
    return results


if __name__ == "__main__":
    sys.exit(main())
