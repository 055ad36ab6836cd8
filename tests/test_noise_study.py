"""launch/noise_study.py: what it reads from a finished run and the table it writes."""
import importlib.util
import json
from pathlib import Path

import pytest

from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("noise_study", REPO / "launch" / "noise_study.py")
noise_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(noise_study)


def fake_run(path: Path, r1: float, divisions=()) -> Path:
    path.mkdir(parents=True)
    best = {"BGE+TSE": {"R1": r1, "mAP": r1 / 2}, "BGE": {"R1": 0.0, "mAP": 0.0}} if divisions \
        else {"t2i": {"R1": r1, "mAP": r1 / 2}}
    (path / "metrics.json").write_text(json.dumps({"best": best, "final": best, "best_epoch": 3}))
    lines = [{"event": "config"}]
    for epoch, precision in enumerate(divisions, 2):
        lines.append({"event": "epoch_start", "epoch": epoch, "kept": 0.5, "ccd_seconds": 1.0,
                      "ccd/consensus_precision": precision, "ccd/consensus_recall": 0.9})
    (path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_summary_reads_the_fused_score_and_the_last_division(tmp_path):
    row = noise_study.summarize(fake_run(tmp_path / "rde", 20.0, divisions=(0.6, 0.7, 0.85)))
    assert row["similarity"] == "BGE+TSE" and row["R1"] == 20.0 and row["mAP"] == 10.0
    assert row["precision"] == 0.85 and row["precision_by_epoch"] == [0.6, 0.7, 0.85]
    plain = noise_study.summarize(fake_run(tmp_path / "irra", 50.0))
    assert plain["similarity"] == "t2i" and "precision" not in plain


def test_table_averages_seeds_and_reports_the_drop():
    runs = [dict(method="irra", rate=0.0, seed=0, R1=50.0, mAP=40.0),
            dict(method="irra", rate=0.0, seed=1, R1=54.0, mAP=44.0),
            dict(method="irra", rate=0.5, seed=0, R1=10.0, mAP=9.0),
            dict(method="irra", rate=0.5, seed=1, R1=14.0, mAP=11.0),
            dict(method="rde", rate=0.5, seed=0, R1=30.0, mAP=20.0, precision=0.8, recall=0.9)]
    text = noise_study.table(runs, [0.0, 0.5])
    irra = next(line for line in text.splitlines() if line.startswith("| irra"))
    assert "(mean R1 52.0)" in irra and "(mean R1 12.0)" in irra and "| 40.0 |" in irra
    rde = next(line for line in text.splitlines() if line.startswith("| rde"))
    assert "0.800 / 0.900" in rde and rde.count("| - |") == 2     # no 0 % run: no drop


@pytest.mark.parametrize("method", sorted(noise_study.METHODS))
def test_every_study_recipe_loads_with_its_overrides(method):
    config, overrides = noise_study.METHODS[method]
    cfg = load_config(REPO / config, overrides)
    assert cfg.method == ("irra" if method == "irra" else "rde")
    if method != "irra":
        want = "consensus" if method == "rde" else "none"
        assert cfg.recipe.weighting.kind == want
