"""The study (tbps.trainer.tools.study) and its report (tbps.trainer.tools.study_report): methods from the
command line, the plan, the skipping of finished runs, the statistics and the report (no
training: runs are faked)."""
import json
import math
from pathlib import Path

import pytest

from tbps.trainer.common.config_files import load_config
from tbps.trainer.tools import study as noise_study
from tbps.trainer.tools import study_report as noise_report

REPO = Path(__file__).resolve().parents[1]


def args(*argv):
    return noise_study.build_parser().parse_args(list(argv))


def test_methods_come_from_the_study_file_and_the_command_line(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("mine: {config: launch/configs/irra_synth.yaml, overrides: [method=aga], "
                     "ablation: aga}\n")
    study = noise_study.load_study(args(
        "train.epochs=2", "--methods-file", str(extra), "--ablation", "amns+division=tal",
        "--method", "rde-cls=launch/configs/rde_synth.yaml", "recipe.image_tokens.kind=attention",
        "recipe.image_tokens.score=cls", "--method", "irra=launch/configs/irra_synth.yaml",
        "optim.lr=1e-4"))
    assert list(study.methods)[:6] == ["irra", "tal", "rde", "amns", "aga", "amns+division"]
    assert study.methods["rde-cls"].overrides == ("recipe.image_tokens.kind=attention",
                                                  "recipe.image_tokens.score=cls")
    assert study.methods["irra"].overrides == ("optim.lr=1e-4",)        # replaced
    assert study.methods["rde"].ablation == "tal" and study.methods["amns+division"].ablation == "tal"
    assert study.methods["mine"].ablation == "aga"
    assert study.overrides[-1] == "train.epochs=2" and "model.pretrained={backbone}" in \
        study.overrides
    only = noise_study.load_study(args("--only", "rde", "tal", "--rates", "0.5", "0",
                                       "--seeds", "4"))
    assert list(only.methods) == ["rde", "tal"] and only.rates == [0.0, 0.5] and \
        only.seeds == [4]
    for bad in (["--method", "irra"], ["--method", "a/b=x.yaml"],
                ["--method", "x=launch/configs/irra_synth.yaml", "oops"],
                ["--only", "nope"], ["--ablation", "rde=nope"], ["--protocol", "nope"]):
        with pytest.raises(ValueError):
            noise_study.load_study(args(*bad))


@pytest.mark.parametrize("study_file", ["noise_study.yaml", "noise_study_gpu.yaml"])
@pytest.mark.parametrize("protocol", ["pretrained", "scratch"])
def test_every_default_method_loads_with_the_protocol(protocol, study_file):
    study = noise_study.load_study(args("--protocol", protocol, "--study",
                                        str(REPO / "launch/configs" / study_file)))
    expect = {"irra": ("irra", "none"), "tal": ("rde", "none"), "rde": ("rde", "consensus"),
              "amns": ("amns", "none"), "aga": ("aga", "none"),
              "amns+division": ("amns", "consensus")}
    for name, m in study.methods.items():
        overrides = [o.replace("{backbone}", "runs/bb") for o in study.overrides]
        cfg = load_config(REPO / m.config, [*overrides, *m.overrides])
        assert (cfg.method, cfg.recipe.weighting.kind) == expect[name]
        assert cfg.train.precision == ("fp32" if study_file == "noise_study.yaml" else "bf16")
        assert cfg.model.pretrained == ("runs/bb" if protocol == "pretrained" else None)
    assert study.methods["amns+division"].overrides == ("recipe.weighting.kind=consensus",
                                                        "recipe.weighting.use=probability")


def test_jobs_cover_methods_rates_seeds_with_one_clean_run_each():
    study = noise_study.load_study(args("--noise-seeds", "0", "1"))
    jobs = study.jobs()
    m, noisy = len(study.methods), len([r for r in study.rates if r > 0])
    assert len(jobs) == m * (1 + 2 * noisy) * len(study.seeds)
    assert len({j.tag for j in jobs}) == len(jobs)
    assert "rde/n00-s2" in {j.tag for j in jobs} and "rde/n50-ns1-s0" in {j.tag for j in jobs}
    assert [j.seed for j in jobs[:3]] == [0, 0, 0]                  # seed-major


def fake_run(run_dir: Path, r1: float, *, division=(), spec=None, job=None, wall=100) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "BGE+TSE" if division else "t2i"
    best = {name: {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 / 2, "mINP": r1 / 4}}
    (run_dir / "metrics.json").write_text(json.dumps(
        {"best": best, "final": best, "best_epoch": 3, "history": [{"R1": 10.0}, {"R1": 12.5}]}))
    lines = [{"event": "config"}]
    for epoch, precision in enumerate(division, 1):
        lines.append({"event": "epoch_start", "epoch": epoch, "kept": 0.5, "ccd_seconds": 1.0,
                      "ccd/consensus_precision": precision, "ccd/consensus_recall": 0.8})
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run_dir / "timing.json").write_text(json.dumps({"wall_s": wall, "load_start": 1.0,
                                                     "load_end": 2.5}))
    if job is not None:
        (run_dir / "study_run.json").write_text(json.dumps(
            {"spec": spec or {"command": ["x"]}, "method": {"config": "c.yaml", "overrides": [],
                                                            "ablation": None}, "job": job}))
    return run_dir


def test_summary_reads_the_selected_similarity_and_the_division_by_epoch(tmp_path):
    row = noise_report.summarize(fake_run(tmp_path / "rde", 20.0, division=(0.6, 0.7, 0.85)))
    assert row["similarity"] == "BGE+TSE" and (row["R1"], row["mAP"], row["mINP"]) == (20, 10, 5)
    assert [d["precision"] for d in row["division"]] == [0.6, 0.7, 0.85]
    assert row["val_R1"] == [10.0, 12.5] and row["wall_s"] == 100 and row["load"] == [1.0, 2.5]
    assert "division" not in noise_report.summarize(fake_run(tmp_path / "irra", 50.0))


def test_a_run_folder_is_done_resumed_new_or_refused(tmp_path):
    spec = {"command": ["a", "b"], "backbone_sha256": "1"}
    run = tmp_path / "irra" / "n00-s0"
    assert noise_study.status(run, spec) == "new"
    run.mkdir(parents=True)
    (run / "study_run.json").write_text(json.dumps({"spec": spec}))
    (run / "checkpoints").mkdir()
    assert noise_study.status(run, spec) == "resume"
    (run / "metrics.json").write_text("{}")
    assert noise_study.status(run, spec) == "done"
    with pytest.raises(ValueError, match=r"another command .*'c'"):
        noise_study.status(run, {"command": ["a", "c"], "backbone_sha256": "1"})
    with pytest.raises(ValueError, match="backbone_sha256"):
        noise_study.status(run, {"command": ["a", "b"], "backbone_sha256": "2"})
    foreign = tmp_path / "x" / "y"
    foreign.mkdir(parents=True)
    (foreign / "something").write_text("")
    with pytest.raises(ValueError, match="did not start"):
        noise_study.status(foreign, spec)


def _rows():
    rows = []
    table = {("irra", 0.0): [60, 62, 61], ("irra", 0.5): [45, 50, 46],
             ("tal", 0.0): [64, 65, 66], ("tal", 0.5): [50, 52, 51],
             ("rde", 0.0): [63, 64, 65], ("rde", 0.5): [58, 60, 59]}
    for (m, rate), r1s in table.items():
        for seed, r1 in enumerate(r1s):
            row = {"tag": f"{m}/{rate}-s{seed}", "method": m, "rate": rate, "noise_seed": 0,
                   "seed": seed, "R1": float(r1), "mAP": r1 / 2, "mINP": r1 / 4,
                   "best_epoch": 3, "wall_s": 90 + seed, "val_R1": [1.0]}
            if m == "rde":
                row["division"] = [{"epoch": 1, "precision": 0.85 + rate / 10, "recall": 0.9},
                                   {"epoch": 2, "precision": 0.9 + rate / 10, "recall": 0.95}]
            rows.append(row)
    return rows


def test_statistics_drop_paired_intervals_and_targets():
    rows = _rows()
    assert noise_report.cell(rows, "irra", 0.5) == (47.0, pytest.approx(math.sqrt(7)), 3)
    assert noise_report.drop(rows, "irra", 0.5) == 14.0
    p = noise_report.paired(rows, "rde", "tal", 0.5)
    assert p["diffs"] == [8.0, 8.0, 8.0] and p["interval"] == (8.0, 8.0)
    q = noise_report.paired(rows, "rde", "irra", 0.5)          # diffs 13, 10, 13
    half = 4.302652729911275 * math.sqrt(3.0) / math.sqrt(3)
    assert q["interval"] == pytest.approx((12 - half, 12 + half))
    assert noise_report.t_interval([1.0]) is None
    d = noise_report.division_by_epoch(rows, "rde", 0.5)
    assert [x["precision"] for x in d] == pytest.approx([0.9, 0.95])
    met = {t["name"].split(":")[0].split(" (")[0]: t for t in noise_report.targets(rows, 20.0)}
    assert met["backbone zero-shot R1 / fine-tuned clean irra R1"]["met"]      # 20 / 61
    assert met["irra R1 drop at 50%"]["value"] == 14.0
    assert met["rde R1 drop / irra R1 drop at 50%"]["value"] == pytest.approx(5 / 14)
    assert met["rde - tal R1 at 50%"]["met"]
    assert met["rde consensus precision at the last division, 50%"]["value"] == \
        pytest.approx(0.95)
    assert "(lowest seed 0.950)" in next(t["name"] for t in noise_report.targets(rows, 20.0)
                                         if "precision" in t["name"])
    assert met["ranking at 50% for two noise seeds"]["met"] is None


def test_ranking_of_two_noise_seeds():
    rows = _rows()
    for r in [r for r in rows if r["rate"] == 0.5]:
        rows.append({**r, "noise_seed": 1, "R1": r["R1"] + (20 if r["method"] == "tal" else 0)})
    item = next(t for t in noise_report.targets(rows, None) if t["name"].startswith("ranking"))
    assert item["value"] == "rde > tal > irra / tal > rde > irra" and item["met"] is False


def test_report_tables_and_plots(tmp_path):
    results = {"study": {"protocol": "pretrained", "rates": [0.0, 0.5],
                         "methods": {"irra": {"config": "a", "overrides": []},
                                     "tal": {"config": "b", "overrides": []},
                                     "rde": {"config": "b", "overrides": [], "ablation": "tal"}},
                         "overrides": ["train.epochs=5"]},
               "runs": _rows(), "zero_shot": {"t2i": {"R1": 20.0, "mAP": 15.0, "mINP": 5.0}},
               "missing": ["aga/n00-s0"], "environment": {"cpu": "x"}}
    text = noise_report.write_report(results, tmp_path)
    assert "| irra | 61.0 ± 1.0 | 47.0 ± 2.6 |" in text
    assert "| rde - tal | -1.0 [-1.0, -1.0]* | +8.0 [+8.0, +8.0]* |" in text
    assert "| rde - irra | +3.0 [+0.5, +5.5]* | +12.0 [+7.7, +16.3]* |" in text
    assert "| rde | 50% | 2 | 3 | 0.950 ± 0.000 | 0.950 ± 0.000 |" in text
    assert "Still to run: 1" in text and "zero-shot" in text
    assert (tmp_path / "r1_vs_noise.png").stat().st_size > 1000
    assert (tmp_path / "division.png").stat().st_size > 1000


def _piece(methods, rows, backbone, zs=20.0, rates=(0.0, 0.5), command="python x"):
    return {"study": {"protocol": "pretrained", "benchmark": {"train_ids": 300},
                      "backbone": backbone, "overrides": ["train.epochs=5"],
                      "rates": list(rates), "noise_seeds": [0], "seeds": [0, 1, 2],
                      "methods": {m: {"config": f"{m}.yaml", "overrides": []} for m in methods}},
            "runs": rows, "zero_shot": {"t2i": {"R1": zs, "mAP": 15.0, "mINP": 5.0}},
            "missing": [], "environment": {"cpu": "x", "commit": "abc", "command": command},
            "example_command": "cmd"}


def test_pieces_of_one_study_merge_into_one_report(tmp_path):
    rows = _rows()
    a = _piece(["irra", "tal"], [r for r in rows if r["method"] != "rde"], {"train_ids": 2000},
               command="tbps study run --only irra tal")
    b = _piece(["rde"], [r for r in rows if r["method"] == "rde"], {"folder": "runs/bb"},
               rates=(0.0, 0.2, 0.5), command="tbps study run --only rde")
    merged = noise_report.merge([a, b])
    assert list(merged["study"]["methods"]) == ["irra", "tal", "rde"]
    assert merged["study"]["rates"] == [0.0, 0.2, 0.5] and len(merged["runs"]) == len(rows)
    assert [p["command"] for p in merged["environment"]["pieces"]] == [
        "tbps study run --only irra tal", "tbps study run --only rde"]
    c = _piece(["aga"], [], {"train_ids": 2000}, command="tbps study run --only aga")
    again = noise_report.merge([merged, c])                    # a merged piece keeps its pieces
    assert [p["command"] for p in again["environment"]["pieces"]][1:] == [
        "tbps study run --only rde", "tbps study run --only aga"]
    only = noise_report.merge([a, b], only=["rde", "irra"])
    assert list(only["study"]["methods"]) == ["rde", "irra"]
    assert {r["method"] for r in only["runs"]} == {"rde", "irra"}
    with pytest.raises(ValueError, match="another backbone"):          # settings and figures
        noise_report.merge([a, _piece(["rde"], [], {"folder": "x"}, zs=21.0)])
    with pytest.raises(ValueError, match="overlap"):
        noise_report.merge([a, a])
    other = _piece(["rde"], [], {"train_ids": 2000})
    other["study"]["overrides"] = ["train.epochs=8"]
    with pytest.raises(ValueError, match="study.overrides"):
        noise_report.merge([a, other])
    with pytest.raises(ValueError, match="no piece has"):
        noise_report.merge([a, b], only=["aga"])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a)), pb.write_text(json.dumps(b))
    assert noise_report.main([str(pa), str(pb)]) == 2                   # --out is needed
    assert noise_report.main([str(pa), str(pb), "--out", str(tmp_path / "m")]) == 0
    text = (tmp_path / "m" / "results.md").read_text()
    assert "| rde - irra |" in text and "tbps study run --only rde" in text
    assert json.loads((tmp_path / "m" / "results.json").read_text())["runs"] == merged["runs"]


def test_prediction_uses_measured_then_stored_then_the_others_mean():
    study = noise_study.load_study(args("--only", "irra", "rde", "aga", "--seeds", "0",
                                        "--rates", "0"))
    jobs = study.jobs()
    rows = [{"method": "irra", "wall_s": 100}, {"method": "irra", "wall_s": 120}]
    total, unknown = noise_study.predict(jobs, rows, {"rde": 200, "irra": 999})
    assert total == 110 + 200 + 155 and unknown == ["aga"]
    assert math.isnan(noise_study.predict(jobs, [], {})[0])
    only_new = [j for j in jobs if j.method.name == "aga"]
    assert noise_study.predict(only_new, rows, {}) == (110, ["aga"])     # every run's mean


def test_main_skips_finished_runs_and_reports_after_each(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(job, cmd, run_dir, spec, state):
        trained.append(job.tag)
        fake_run(run_dir, 50.0 - 10 * job.rate, spec=spec, wall=60,
                 job={"method": job.method.name, "rate": job.rate,
                      "noise_seed": job.noise_seed, "seed": job.seed})

    monkeypatch.setattr(noise_study, "train", fake_train)
    monkeypatch.setattr(noise_study, "prepare_data", lambda study, data: None)
    monkeypatch.setattr(noise_study, "prepare_backbone", lambda study, out, data: (None, None))
    argv = ["--out", str(tmp_path / "out"), "--only", "irra", "rde", "--seeds", "0", "1",
            "--rates", "0", "0.5", "--results", str(tmp_path / "report")]
    assert noise_study.main(argv) == 0
    assert len(trained) == 8
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(results["runs"]) == 8 and results["missing"] == []
    assert "train.seed=1" in results["example_command"] or "train.seed=0" in \
        results["example_command"]
    out = capsys.readouterr().out
    stored = noise_study.load_study(args()).estimates_s          # the study file's estimates
    assert "[8/8]" in out and f"predicted {(4 * stored['irra'] + 4 * stored['rde']) / 60:.0f} min" in out
    trained.clear()
    assert noise_study.main(argv + ["--seeds", "0", "1", "2"]) == 0       # only seed 2 is new
    assert sorted(trained) == ["irra/n00-s2", "irra/n50-ns0-s2", "rde/n00-s2", "rde/n50-ns0-s2"]
    assert "8 finished, 4 to do; predicted 4 min" in capsys.readouterr().out
    pieces = json.loads((tmp_path / "out" / "pretrained" / "results.json").read_text())[
        "environment"]["pieces"]
    assert len(pieces) == 2 and pieces[1]["command"].endswith("--seeds 0 1 2")  # both kept
    assert pieces[0]["command"].endswith(str(tmp_path / "report"))
    assert noise_study.main(argv + ["optim.lr=1"]) == 2                 # another command
    assert "holds a run of another command" in capsys.readouterr().err
