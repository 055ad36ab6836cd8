"""ITM re-ranking at evaluation: on 2 ranks (DDP and ZeRO-3, every rank scoring its share of
the queries) it equals one process; the re-ranked top k is in ITM order, the rest untouched; the
report of `tbps evaluate --itm-rerank` shows the re-ranked row of its one evaluation."""
import html
import json
import os
import subprocess
import sys

import pytest
import torch

from tbps.data_pipeline.loader import EvalLoader
from tbps.trainer.inference import evaluate as evaluate_cli
from tbps.trainer.inference.evaluate import evaluate, itm_rerank
from tbps.trainer.model.weights import save_weights
from tests.trainer import rerank_worker
from tests.trainer.conftest import REPO


@pytest.fixture(scope="module")
def one_process(tiny_shards):
    cfg, tok, factory = rerank_worker.model_for(str(tiny_shards))
    model = factory().eval()
    return cfg, tok, model, evaluate(model, cfg, tok, "test", torch.device("cpu"))


def test_reranking_orders_the_top_k_by_itm_and_keeps_the_rest(one_process):
    cfg, tok, model, result = one_process
    assert list(result) == ["t2i", "t2i+ITM@12"]
    cost = result["t2i+ITM@12"]
    assert cost["rerank_seconds"] > 0 and cost["rerank_queries_per_s"] > 0
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.1, 0.7]])
    got, _ = itm_rerank(model, cfg, tok, "test", torch.device("cpu"), sims, 2,
                        pairs_per_batch=3)
    top = sims.topk(2, dim=1).indices
    assert bool((got.gather(1, top) > 1e3).all())                  # re-ranked pairs first
    rest = torch.ones_like(sims, dtype=torch.bool).scatter_(1, top, False)
    torch.testing.assert_close(got[rest], sims[rest])


@pytest.fixture(scope="module")
def itm_weights(tmp_path_factory, tiny_shards):
    """The untrained AGA model of the worker as a weights folder (what training writes)."""
    cfg, tok, factory = rerank_worker.model_for(str(tiny_shards))
    model = factory()
    out = tmp_path_factory.mktemp("aga") / "best"
    save_weights(model.state_dict(), out, cfg, tok, model.encoder.clip.config)
    return out


def test_the_report_shows_the_reranked_row_of_the_one_evaluation(itm_weights, tmp_path,
                                                                  monkeypatch, capsys):
    passes = []
    init = EvalLoader.__init__

    def counted(loader, *args, **kwargs):
        passes.append(kwargs["modality"])
        init(loader, *args, **kwargs)

    monkeypatch.setattr(EvalLoader, "__init__", counted)
    rc = evaluate_cli.main([str(itm_weights), "--split", "test", "--itm-rerank", "5",
                            "--report", str(tmp_path / "report"), "--out", str(tmp_path / "m"),
                            "--report-queries", "3", "--report-worst", "2"])
    assert rc == 0, capsys.readouterr().err
    # embeddings and tokens of the queries and the gallery, once each: the report embeds nothing
    assert sorted(passes) == ["image", "image", "text", "text"]
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    printed = json.loads((tmp_path / "m" / "evaluation.json").read_text())["metrics"]
    assert list(data["metrics"]) == ["t2i", "t2i+ITM@5"] == list(data["cmc"])
    assert data["metrics"] == printed          # the re-ranking's own timing included: one run
    row = data["metrics"]["t2i+ITM@5"]
    assert row["rerank_seconds"] > 0 and data["cmc"]["t2i+ITM@5"][0] == pytest.approx(row["R1"])
    assert data["options"]["--itm-rerank"] == 5 and "t2i+ITM@5" in data["itm_rerank"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "t2i+ITM@5" in page and f"{row['mAP']:.2f}" in page and "rerank_seconds" in page
    assert html.escape(data["itm_rerank"]) in page and "--itm-rerank" in page


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_zero3.yaml"])
def test_reranking_on_two_ranks_equals_one_process(tmp_path, tiny_shards, one_process, config):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch/accelerate" / config), "--num_processes", "2",
           str(REPO / "tests/trainer/rerank_worker.py"), str(tmp_path), str(tiny_shards)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads((tmp_path / "result.json").read_text())
    want = one_process[3]
    for name in want:
        for metric in ("R1", "R5", "R10", "mAP", "mINP"):
            assert got[name][metric] == pytest.approx(want[name][metric], abs=1e-4), (name, metric)
