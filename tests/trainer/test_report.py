"""evaluate --report (CMC, grids, HTML) and the model card of the transformers export."""
import html
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from tbps.data_pipeline.manifest import read_manifest
from tbps.trainer.inference import drawing, evaluate, report
from tbps.trainer.inference.export import export_hf
from tbps.trainer.inference.gallery import list_gallery
from tbps.trainer.inference.metrics import Evaluation, retrieval_metrics
from tests.trainer.test_search import make_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_shards):
    return make_weights(tmp_path_factory.mktemp("report") / "best", tiny_shards, "rde_synth.yaml")


@pytest.fixture(scope="module")
def report_dir(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    rc = evaluate.main([str(weights), "--split", "test", "--report", str(out / "report"),
                        "--report-queries", "5", "--report-worst", "4"])
    assert rc == 0
    return out / "report"


def test_report_html_shows_existing_files_and_every_sampled_query(report_dir, weights):
    for name in ("report.html", "metrics.json", "cmc.png", "retrieval.png", "worst.png"):
        assert (report_dir / name).stat().st_size > 0, name
    page = (report_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"cmc.png", "retrieval.png", "worst.png", "metrics.json"} <= set(refs)
    for ref in refs:
        assert "://" not in ref and (report_dir / ref).is_file(), ref
    assert "<script" not in page and "url(" not in page
    data = json.loads((report_dir / "metrics.json").read_text())
    assert len(data["sampled"]) == 5 and len(data["worst"]) == 4
    for row in data["sampled"] + data["worst"]:
        assert html.escape(row["caption"]) in page
    assert list(data["metrics"]) == ["BGE+TSE", "BGE", "TSE"] == list(data["cmc"])
    for name, m in data["metrics"].items():
        curve = data["cmc"][name]
        assert len(curve) == report.CMC_RANKS and curve == sorted(curve)
        assert curve[0] == pytest.approx(m["R1"]) and curve[9] == pytest.approx(m["R10"])
        assert f"{m['mAP']:.2f}" in page
    ranks = [r["first_correct_rank"] for r in data["worst"]]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] >= max(
        r["first_correct_rank"] for r in data["sampled"])
    assert data["options"]["--report-queries"] == 5 and data["options"]["--split"] == "test"
    assert data["itm_rerank"] is None and "--report-worst" in page
    # the metrics beside the weights are the same as without --report
    assert json.loads((weights / "evaluation.json").read_text())["metrics"] == data["metrics"]


def test_first_correct_rank_gives_the_metrics_recall():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 9, (40, 30), generator=g).float()          # ties, as the metrics break them
    q, gal = torch.randint(0, 6, (40,), generator=g), torch.arange(30) % 6
    curve = report.cmc_curve(report.ranked(sim, q, gal, chunk=7), ranks=10)
    m = retrieval_metrics(sim, q, gal)
    assert [curve[0], curve[4], curve[9]] == pytest.approx([m["R1"], m["R5"], m["R10"]])


def test_the_report_draws_the_evaluation_it_is_given_and_computes_no_metric(tiny_shards,
                                                                            tmp_path):
    """No model anywhere: the report's numbers are the evaluation's, even made-up ones."""
    rows = sorted(read_manifest(tiny_shards, columns=["index", "pid"], split="test").to_pylist(),
                  key=lambda r: r["index"])
    items, _ = list_gallery(tiny_shards, "test")
    q_pids = torch.tensor([r["pid"] for r in rows])
    g_pids = torch.tensor([int(it.id) for it in items])
    sims = {"t2i": torch.randn(len(rows), len(items), generator=torch.Generator().manual_seed(0))}
    sims["t2i+ITM@3"] = sims["t2i"].clone()
    made_up = {"R1": 12.5, "R5": 25.0, "R10": 50.0, "mAP": 33.33, "mINP": 44.44}
    metrics = {"t2i": made_up, "t2i+ITM@3": {**made_up, "mAP": 77.77, "rerank_seconds": 0.25,
                                             "rerank_queries_per_s": 320.0}}
    ev = Evaluation("test", str(tiny_shards), 3, metrics, sims, q_pids, g_pids)
    report.write_report(ev, tmp_path / "r", queries=2, worst=2,
                        options={"weights": "w", "--itm-rerank": 3})
    data = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert data["metrics"] == metrics and list(data["cmc"]) == list(metrics)
    page = (tmp_path / "r" / "report.html").read_text()
    assert "77.77" in page and "320.00" in page and "--itm-rerank" in page
    assert "t2i+ITM@3" in data["itm_rerank"] and data["options"]["--itm-rerank"] == 3
    first = report.ranked(sims["t2i"], q_pids, g_pids)
    assert data["cmc"]["t2i"] == report.cmc_curve(first)
    with pytest.raises(ValueError, match="rank 0"):
        report.write_report(Evaluation("test", str(tiny_shards), 0, metrics), tmp_path / "x")


def test_grid_draws_unreadable_images_as_grey_boxes(tmp_path):
    img = torch.randint(0, 255, (96, 32, 3), dtype=torch.uint8).numpy()
    out = drawing.draw_rows([("a caption " * 30, [drawing.Tile(img, "1: id 3", drawing.GREEN),
                                                  drawing.Tile(None, "2: id 4", drawing.RED),
                                                  drawing.Tile(img, "9: id 3", apart=True)])],
                            tmp_path / "g.png", title="t")
    assert Image.open(out).size[0] > 340


def test_model_card_names_the_metrics(report_dir, weights, tmp_path):
    metrics = json.loads((weights / "evaluation.json").read_text())["metrics"]
    export_hf(weights, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    for name, m in metrics.items():
        row = f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in m) + " |"
        assert row in card
    assert "| similarity | R1 | R5 | R10 | mAP | mINP |" in card
    assert "tse_image" in card and "CLIPModel.from_pretrained" in card
    assert "tbps search index" in card
    # a run's metrics.json (best/final) serves when the folder has none of its own
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for f in weights.iterdir():
        if f.is_file() and f.name != "evaluation.json":
            (run / "best" / f.name).write_bytes(f.read_bytes())
    shutil.copytree(weights / "tokenizer", run / "best" / "tokenizer")
    (run / "metrics.json").write_text(json.dumps({"split": "test", "best": {"t2i": {
        "R1": 12.345, "R5": 50.0, "R10": 70.0, "mAP": 20.0, "mINP": 10.0}}}))
    export_hf(run / "best", run / "hf")
    assert "| t2i | 12.35 | 50.00 | 70.00 | 20.00 | 10.00 |" in (run / "hf" / "README.md").read_text()


def test_evaluate_writes_its_own_file_not_a_runs_metrics(weights, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"epochs": 3, "history": [], "best_epoch": 2}')
    assert evaluate.main([str(weights), "--split", "test", "--out", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 2
    assert json.loads((run / "evaluation.json").read_text())["split"] == "test"


def test_report_bad_input_exit_2(weights, tmp_path, capsys):
    assert evaluate.main([str(weights), "--report", str(tmp_path / "r"),
                          "--report-queries", "0"]) == 2
    assert "--report-queries" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "none"), "--report", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
