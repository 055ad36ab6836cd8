"""The noise study's report: per-run summaries, seed statistics, paired differences, targets, plots.

trainer/tools/study.py calls `summarize` on every finished run and `write_report` after each one;
the functions also work on a results.json alone:

    tbps study report launch/results/noise_study/results.json    # tables and plots again

A study run in pieces (other --out folders, --only, --rates) is reported as one by merging the
pieces' results.json files (same protocol, benchmark, backbone and overrides, or it stops):

    tbps study report A/results.json B/results.json --only irra tal rde --out DIR

Statistics (over training seeds, at one noise seed): mean and sample standard deviation; the
drop from 0 % is the difference of the means; a paired difference compares two methods seed by
seed (same seed, same noisy shards) with a two-sided 95 % t-interval of its mean (with three
seeds t = 4.30: an interval that excludes 0 is a difference beyond the seed spread).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

METRICS = ("R1", "mAP", "mINP")


# -- one run -----------------------------------------------------------------------------------

def summarize(run_dir: Path) -> dict:
    """The test metrics of the val-selected weights (the recipe's first similarity: t2i, or
    BGE+TSE with two branches), the val history, and the division's figures by epoch."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "metrics.json").read_text())
    metrics = report.get("best") or report["final"]
    first = next(iter(metrics))
    row = {k: round(float(metrics[first][k]), 3) for k in ("R1", "R5", "R10", "mAP", "mINP")
           if k in metrics[first]}
    row.update(similarity=first, best_epoch=report.get("best_epoch"),
               val_R1=[round(h["R1"], 2) for h in report.get("history", [])])
    division = []
    log = run_dir / "log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        if '"epoch_start"' not in line:
            continue
        event = json.loads(line)
        if event.get("event") == "epoch_start" and "ccd/consensus_precision" in event:
            division.append({"epoch": event["epoch"], "kept": event.get("kept"),
                             "precision": round(event["ccd/consensus_precision"], 4),
                             "recall": round(event["ccd/consensus_recall"], 4)})
    if division:
        row["division"] = division
    timing = run_dir / "timing.json"       # wall seconds and the machine's load around the run
    if timing.is_file():
        t = json.loads(timing.read_text())
        row.update(wall_s=t["wall_s"], load=[t.get("load_start"), t.get("load_end")])
    else:                                  # runs made before timing.json
        old = run_dir / "wall_seconds.txt"
        row["wall_s"] = int(old.read_text()) if old.is_file() else None
    return row


# -- statistics --------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t-interval of the mean; None with fewer than two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # heavy: only for intervals

    m, s = statistics.fmean(values), statistics.stdev(values)
    half = t.ppf(0.5 + level / 2, len(values) - 1) * s / math.sqrt(len(values))
    return m - half, m + half


def select(rows: list[dict], method: str, rate: float, noise_seed: int = 0) -> list[dict]:
    """The rows of one cell; a clean run (rate 0) belongs to every noise seed."""
    return sorted((r for r in rows if r["method"] == method and r["rate"] == rate
                   and (rate == 0 or r["noise_seed"] == noise_seed)), key=lambda r: r["seed"])


def cell(rows, method, rate, noise_seed=0, metric="R1") -> tuple[float | None, float | None, int]:
    values = [r[metric] for r in select(rows, method, rate, noise_seed)]
    return (*mean_std(values), len(values))


def drop(rows, method, rate, noise_seed=0) -> float | None:
    clean, noisy = cell(rows, method, 0.0)[0], cell(rows, method, rate, noise_seed)[0]
    return None if clean is None or noisy is None else clean - noisy


def paired(rows, a: str, b: str, rate: float, noise_seed: int = 0, metric: str = "R1") -> dict:
    """Per-seed differences a - b on the seeds both have, their mean and 95 % t-interval."""
    left = {r["seed"]: r[metric] for r in select(rows, a, rate, noise_seed)}
    right = {r["seed"]: r[metric] for r in select(rows, b, rate, noise_seed)}
    seeds = sorted(set(left) & set(right))
    diffs = [left[s] - right[s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, "mean": mean_std(diffs)[0],
            "interval": t_interval(diffs)}


def division_by_epoch(rows, method, rate, noise_seed=0) -> list[dict]:
    """Consensus precision / recall per division epoch: mean and std over seeds."""
    by_epoch: dict[int, list[dict]] = {}
    for r in select(rows, method, rate, noise_seed):
        for d in r.get("division", []):
            by_epoch.setdefault(d["epoch"], []).append(d)
    out = []
    for epoch in sorted(by_epoch):
        ds = by_epoch[epoch]
        p, ps = mean_std([d["precision"] for d in ds])
        q, qs = mean_std([d["recall"] for d in ds])
        out.append({"epoch": epoch, "n": len(ds), "precision": p, "precision_std": ps,
                    "recall": q, "recall_std": qs})
    return out


def ranking(rows, methods, rate, noise_seed) -> list[str]:
    """Methods with runs at (rate, noise seed), best mean R1 first."""
    means = {m: cell(rows, m, rate, noise_seed)[0] for m in methods}
    return sorted((m for m in means if means[m] is not None), key=lambda m: -means[m])


# -- targets -------------------------------------------------------------------------------------

def targets(rows: list[dict], zero_shot_r1: float | None, *, baseline="irra", robust="rde",
            control="tal", rate=0.5) -> list[dict]:
    """The issue's calibration figures and targets, each {"name", "value", "goal", "met"}
    (met None: not enough runs yet)."""
    out = []

    def add(name, value, goal, met):
        out.append({"name": name, "value": value, "goal": goal,
                    "met": None if value is None else bool(met)})

    clean = cell(rows, baseline, 0.0)[0]
    ratio = None if zero_shot_r1 is None or not clean else zero_shot_r1 / clean
    add(f"backbone zero-shot R1 / fine-tuned clean {baseline} R1", ratio, "<= 0.5",
        ratio is not None and ratio <= 0.5)
    d_base = drop(rows, baseline, rate)
    add(f"{baseline} R1 drop at {rate:.0%}", d_base, ">= 10", d_base is not None and d_base >= 10)
    methods = sorted({r["method"] for r in rows})
    stds = {m: cell(rows, m, rate)[1] for m in methods}
    stds = {m: s for m, s in stds.items() if s is not None}
    worst = max(stds.values()) if stds else None
    add(f"largest seed std of R1 at {rate:.0%} ({max(stds, key=stds.get) if stds else '-'})",
        worst, "<= 3", worst is not None and worst <= 3)
    d_rob = drop(rows, robust, rate)
    add(f"{robust} R1 drop / {baseline} R1 drop at {rate:.0%}",
        None if d_rob is None or not d_base else d_rob / d_base, "<= 0.5",
        d_rob is not None and d_base and d_rob <= 0.5 * d_base)
    pair = paired(rows, robust, control, rate)
    low = None if pair["interval"] is None else pair["interval"][0]
    add(f"{robust} - {control} R1 at {rate:.0%}: lower end of the paired 95 % interval", low,
        "> 0", low is not None and low > 0)
    last = [r["division"][-1]["precision"] for r in select(rows, robust, rate) if r.get("division")]
    add(f"{robust} consensus precision at the last division, {rate:.0%}: mean over seeds"
        + (f" (lowest seed {min(last):.3f})" if last else ""),
        statistics.fmean(last) if last else None, ">= 0.9",
        bool(last) and statistics.fmean(last) >= 0.9)
    seeds = sorted({r["noise_seed"] for r in rows if r["rate"] == rate})
    if len(seeds) >= 2:
        both = [m for m in methods if all(select(rows, m, rate, s) for s in seeds[:2])]
        ranks = [ranking(rows, both, rate, s) for s in seeds[:2]]
        add(f"ranking at {rate:.0%}, noise seeds {seeds[0]} and {seeds[1]}",
            " / ".join(" > ".join(r) for r in ranks), "equal", ranks[0] == ranks[1])
    else:
        add(f"ranking at {rate:.0%} for two noise seeds", None, "equal", False)
    return out


# -- text ----------------------------------------------------------------------------------------

def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(mean, std, n, digits=1) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}") + \
        ("" if n >= 3 else f" (n={n})")


def _interval(p: dict) -> str:
    if p["mean"] is None:
        return "-"
    ci = p["interval"]
    text = f"{p['mean']:+.1f}"
    if ci is not None:
        text += f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" + ("*" if ci[0] > 0 or ci[1] < 0 else "")
    return text + ("" if len(p["diffs"]) >= 3 else f" (n={len(p['diffs'])})")


def tables(rows: list[dict], methods: list[str], rates: list[float], noise_seed: int = 0,
           baseline: str = "irra", ablations: dict | None = None) -> str:
    """The markdown tables of one noise seed."""
    ablations = ablations or {}
    head = "| method | " + " | ".join(f"{r:.0%}" for r in rates) + " |"
    rule = "|---|" + "---|" * len(rates)
    parts = []
    for metric in METRICS:
        lines = [f"**Test {metric}** (mean ± std over seeds)", "", head, rule]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                _ms(*cell(rows, m, r, noise_seed, metric)) for r in rates) + " |")
        parts.append("\n".join(lines))
    noisy = [r for r in rates if r > 0]
    lines = ["**R1 drop from 0 %** (difference of the means)", "",
             "| method | " + " | ".join(f"{r:.0%}" for r in noisy) + " |",
             "|---|" + "---|" * len(noisy)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_f(drop(rows, m, r, noise_seed)) for r in noisy)
                     + " |")
    parts.append("\n".join(lines))
    lines = ["**Paired per-seed R1 differences**: mean [95 % t-interval]; * = the interval "
             "excludes 0", "", head.replace("| method |", "| pair |"), rule]
    for m in methods:
        for other in ([baseline] if m != baseline else []) + \
                [a for a in [ablations.get(m)] if a and a != baseline]:
            if other not in methods:
                continue
            lines.append(f"| {m} - {other} | " + " | ".join(
                _interval(paired(rows, m, other, r, noise_seed)) for r in rates) + " |")
    parts.append("\n".join(lines))
    div = []
    for m in methods:
        for r in rates:
            for d in division_by_epoch(rows, m, r, noise_seed):
                div.append(f"| {m} | {r:.0%} | {d['epoch']} | {d['n']} | "
                           f"{_ms(d['precision'], d['precision_std'], 3, 3)} | "
                           f"{_ms(d['recall'], d['recall_std'], 3, 3)} |")
    if div:
        parts.append("\n".join(["**Consensus division by epoch** (precision and recall of "
                                "'clean'; mean ± std over n seeds)", "",
                                "| method | noise | epoch | n | precision | recall |",
                                "|---|---|---|---|---|---|", *div]))
    return "\n\n".join(parts)


def targets_table(items: list[dict]) -> str:
    lines = ["| figure | value | goal | met |", "|---|---|---|---|"]
    for t in items:
        v = t["value"]
        value = "-" if v is None else v if isinstance(v, str) else f"{v:.3g}"
        met = "not yet" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['name']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------

def plot(rows: list[dict], methods: list[str], rates: list[float], out: Path,
         noise_seed: int = 0) -> list[Path]:
    """r1_vs_noise.png (R1 and mAP against the noise rate, mean ± std) and, where a division
    runs, division.png (its precision and recall by epoch)."""
    import matplotlib  # plots only: kept off start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')
    import matplotlib.ticker  # noqa: F401

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("R1", "mAP")):
        for m in methods:
            pts = [(r * 100, *cell(rows, m, r, noise_seed, metric)[:2]) for r in rates]
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            x, y, s = zip(*pts)
            s = [v or 0.0 for v in s]
            line, = ax.plot(x, y, marker="o", label=m)
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training captions swapped (%)")
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_xticks([r * 100 for r in rates])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean ± std over seeds (noise seed {noise_seed})", fontsize=10)
    fig.tight_layout()
    path = out / "r1_vs_noise.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    series = [(m, r, division_by_epoch(rows, m, r, noise_seed)) for m in methods for r in rates
              if r > 0]
    series = [s for s in series if s[2]]
    if series:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        for m, r, ds in series:
            x = [d["epoch"] for d in ds]
            for ax, key in zip(axes, ("precision", "recall")):
                y = [d[key] for d in ds]
                s = [d[f"{key}_std"] or 0.0 for d in ds]
                line, = ax.plot(x, y, marker="o", label=f"{m}, {r:.0%}")
                ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                                color=line.get_color(), alpha=0.15)
        for ax, key in zip(axes, ("precision", "recall")):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_xlabel("epoch of the division")
            ax.set_ylabel(f"consensus {key} of 'clean'")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / "division.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- the whole report ----------------------------------------------------------------------------

def write_report(results: dict, out: Path) -> str:
    """results.json's content -> out/results.md (+ plots); returns the markdown."""
    out = Path(out)
    rows, study = results["runs"], results["study"]
    methods = [m for m in study["methods"] if any(r["method"] == m for r in rows)]
    rates = study["rates"]
    ablations = {m: spec.get("ablation") for m, spec in study["methods"].items()}
    zs = results.get("zero_shot")
    zs_r1 = None if not zs else next(iter(zs.values()))["R1"]
    parts = [f"# Noisy correspondence on the synthetic data: {study['protocol']} protocol", "",
             study.get("description", ""), ""]
    if zs:
        first = next(iter(zs))
        parts += [f"Backbone zero-shot on the benchmark's test split ({first}): R1 "
                  f"{zs[first]['R1']:.1f}, mAP {zs[first]['mAP']:.1f}, mINP "
                  f"{zs[first]['mINP']:.1f}.", ""]
    parts += ["## Calibration figures and targets (noise seed 0)", "",
              targets_table(targets(rows, zs_r1)), ""]
    for ns in sorted({r["noise_seed"] for r in rows if r["rate"] > 0}) or [0]:
        parts += [f"## Noise seed {ns}", "",
                  tables(rows, methods, rates, ns, ablations=ablations), ""]
    parts += ["## Runs", "", "Wall seconds of the whole run (start, training, evaluations, export) "
              "and the machine's 1-minute load average at its start and end (2 cores: a load "
              "above 2 means other work shared them).", "",
              "| method | noise | noise seed | seed | R1 | mAP | mINP | best epoch "
              "| val R1 by epoch | wall s | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (methods.index(r["method"]) if r["method"] in methods
                                         else 99, r["rate"], r["noise_seed"], r["seed"])):
        parts.append(f"| {r['method']} | {r['rate']:.0%} | {r['noise_seed']} | {r['seed']} | "
                     f"{r['R1']:.2f} | {r['mAP']:.2f} | {r['mINP']:.2f} | {r['best_epoch']} | "
                     f"{' '.join(f'{v:.1f}' for v in r.get('val_R1', []))} | {r['wall_s']} | "
                     f"{' / '.join(f'{v:.1f}' for v in r.get('load') or [])} |")
    missing = results.get("missing", [])
    parts += ["", f"## Still to run: {len(missing)}", ""]
    parts += [f"- {m}" for m in missing[:50]] + (["- ..."] if len(missing) > 50 else [])
    env = results.get("environment", {})
    parts += ["", "## Environment and commands", ""]
    parts += [f"- {k}: {v}" for k, v in env.items() if k != "pieces"]
    if env.get("pieces"):
        parts += ["- merged from these studies (each piece's commit and command):"]
        parts += [f"  - {p.get('commit', '?')}: `{p.get('command', '?')}`" for p in env["pieces"]]
    parts += ["", "Methods (config and overrides on top of the protocol's):", ""]
    parts += [f"- {m}: `{s['config']}` {' '.join(s.get('overrides', []))}"
              + (f" (ablation: {s['ablation']})" if s.get("ablation") else "")
              for m, s in study["methods"].items()]
    parts += ["", "Protocol overrides for every run: `" + " ".join(study["overrides"]) + "`",
              "", "One run's command (the others differ in method, shards and seed):", "",
              "```", results.get("example_command", ""), "```", ""]
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    plot(rows, methods, rates, out)
    return text


# -- merging pieces -------------------------------------------------------------------------------

SAME = ("protocol", "benchmark", "overrides")


def invocations(env: dict) -> list[dict]:
    """The study invocations ({commit, command}) behind a results.json's environment: its list of
    pieces where it has one (a merge, or a folder several invocations added runs to), else its
    own commit and command."""
    return env.get("pieces") or [{"commit": env.get("commit"), "command": env.get("command")}]


def merge(pieces: list[dict], only: list[str] | None = None) -> dict:
    """Several results.json contents of one protocol as one: the runs united (a run tag met twice
    is a ValueError: the pieces overlap), the methods united in order of first appearance (or
    `only`, in its order), rates and noise seeds the union, each piece's environment kept.
    Pieces of another protocol, benchmark or protocol overrides are a ValueError naming the
    field; so is another backbone: the backbone settings differ (one piece made it, another
    was given the folder with --backbone) and so do the zero-shot figures (all five metrics of
    the untuned backbone on the test split, which the same weights reproduce exactly)."""
    if not pieces:
        raise ValueError("nothing to merge")
    first = pieces[0]["study"]
    for i, piece in enumerate(pieces[1:], 2):
        for key in SAME:
            if piece["study"].get(key) != first.get(key):
                raise ValueError(f"piece {i} differs from piece 1 in study.{key}: "
                                 f"{piece['study'].get(key)!r} against {first.get(key)!r}")
        same_zs = piece.get("zero_shot") and piece.get("zero_shot") == pieces[0].get("zero_shot")
        if piece["study"].get("backbone") != first.get("backbone") and not same_zs:
            raise ValueError(f"piece {i} has another backbone than piece 1 (settings "
                             f"{piece['study'].get('backbone')!r} against "
                             f"{first.get('backbone')!r}, zero-shot figures "
                             f"{piece.get('zero_shot')} against {pieces[0].get('zero_shot')})")
    methods: dict[str, dict] = {}
    for piece in pieces:
        for name, spec in piece["study"]["methods"].items():
            if name in methods and methods[name] != spec:
                raise ValueError(f"method {name} differs between pieces: {methods[name]} "
                                 f"against {spec}")
            methods.setdefault(name, spec)
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise ValueError(f"--only names methods no piece has: {unknown} "
                             f"(the pieces have {sorted(methods)})")
        methods = {m: methods[m] for m in only}
    runs, seen = [], {}
    for i, piece in enumerate(pieces, 1):
        for row in piece["runs"]:
            if row["method"] not in methods:
                continue
            if row["tag"] in seen:
                raise ValueError(f"run {row['tag']} is in piece {seen[row['tag']]} and in "
                                 f"piece {i}: the pieces overlap")
            seen[row["tag"]] = i
            runs.append(row)
    study = {**first, "methods": methods,
             "rates": sorted({r for p in pieces for r in p["study"]["rates"]}),
             "noise_seeds": sorted({s for p in pieces for s in p["study"]["noise_seeds"]}),
             "seeds": sorted({s for p in pieces for s in p["study"].get("seeds", [])})}
    env = {k: v for k, v in pieces[-1].get("environment", {}).items()
           if k not in ("commit", "command")}
    env["pieces"] = [x for piece in pieces for x in invocations(piece.get("environment", {}))]
    missing = [m for p in pieces for m in p.get("missing", [])
               if m.split("/")[0] in methods]
    return {"study": study, "environment": env, "zero_shot": pieces[0].get("zero_shot"),
            "runs": runs, "missing": missing,
            "example_command": pieces[-1].get("example_command", "")}


def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="tbps study report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json of a study (several: merged)")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="report these methods only")
    p.add_argument("--out", help="where results.md, the plots and (when merging) results.json "
                   "go (default: the folder of the one results.json)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    paths = [Path(x) for x in args.results]
    for path in paths:
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    if len(paths) > 1 and not args.out:
        print("error: merging several results.json needs --out", file=sys.stderr)
        return 2
    pieces = [json.loads(path.read_text()) for path in paths]
    try:
        results = merge(pieces, args.only) if len(paths) > 1 or args.only else pieces[0]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else paths[0].parent
    if results is not pieces[0] or out != paths[0].parent:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
