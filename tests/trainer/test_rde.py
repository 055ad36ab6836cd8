"""RDE: token selection against a plain reference, CCD on a planted mixture, the 2-rank
per-sample and weighted losses against one process, and a short 2-process run with division."""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tbps.data_pipeline.tokenizer import PROBE, CaptionTokenizer, train_word_level
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.weights import build_model
from tbps.trainer.recipe import consensus_division as ccd
from tbps.trainer.recipe.step import Recipe, StepInfo
from tests.distributed import free_port, init_gloo

CAPTIONS = [PROBE, "the man wears blue jeans and white shoes", "a man with a green bag",
            "a woman in red"]
SMALL = ["method=rde", "loss.tau=0.05",
         "loss.tau_start=null", "model.image_size=[32, 16]", "model.vision_width=32",
         "model.text_width=32", "model.embed_dim=16", "model.vision_layers=1",
         "model.text_layers=1", "model.vision_heads=2", "model.text_heads=2",
         "model.context_length=16", "recipe.tse.dim=24"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_word_level(CAPTIONS * 2, path)
    return str(path)


def _model(tok_dir, num_samples=12, dtype=torch.float64, extra=()):
    tok = CaptionTokenizer.from_pretrained(tok_dir, context_length=16)
    cfg = load_config(None, SMALL + list(extra))
    torch.manual_seed(0)
    return build_model(cfg, tok, num_classes=1, num_samples=num_samples).to(dtype), tok, cfg


def _train(model, cfg, tok, batch, step):
    return model(Recipe(cfg, tok).train_losses, batch, step)


def _per_sample(model, cfg, batch, step):
    return model(ccd.per_sample_losses, cfg.recipe.weighting, batch, step.tau)


def _batch(tok, n=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, 32, 16, generator=g, dtype=dtype),
            "input_ids": torch.from_numpy(tok.encode_batch([CAPTIONS[i % 4] for i in range(n)])),
            "pid": torch.tensor([0, 1, 3, 0, 2, 4, 3, 1, 0, 2, 3, 1][:n]),
            "index": torch.arange(n)}


def test_tse_matches_a_plain_reference(tok_dir):
    model, tok, _ = _model(tok_dir)
    model.eval()
    enc = model.encoder
    batch = _batch(tok)
    with torch.no_grad():
        img, txt = enc.encode_image(batch["image"]), enc.encode_text(batch["input_ids"])
        got_i, got_t = model.tse(img, txt)

    def reference(head, tokens, scores, valid, k):
        out = []
        for b in range(tokens.shape[0]):
            cand = [j for j in range(tokens.shape[1]) if valid[b, j]]
            cand.sort(key=lambda j: (-float(scores[b, j]), j))
            x = F.normalize(tokens[b, cand[:k]], dim=-1)
            y = head.fc(x) + head.mlp(x)
            out.append(y.max(dim=0).values)
        return torch.stack(out)

    assert model.tse_k == (2, 4)         # floor(0.3 * 8 patches), floor(0.3 * 14)
    with torch.no_grad():
        want_i = reference(model.tse_image, img.tokens_BTE[:, 1:], img.attn_BK,
                           torch.ones_like(img.attn_BK, dtype=torch.bool), 2)
        words = (torch.arange(txt.input_ids_BL.shape[1])[None] >= 1) & \
            (torch.arange(txt.input_ids_BL.shape[1])[None] < txt.eos_B[:, None])
        want_t = reference(model.tse_text, txt.tokens_BLE, txt.attn_BL, words, 4)
    torch.testing.assert_close(got_i, want_i)
    torch.testing.assert_close(got_t, want_t)
    short = tok.encode_batch(["a man"])                  # 2 words < k: pools over those 2
    with torch.no_grad():
        t2 = enc.encode_text(torch.from_numpy(short))
        torch.testing.assert_close(model.tse(None, t2)[1], reference(
            model.tse_text, t2.tokens_BLE, t2.attn_BL, torch.tensor([[False, True, True, False]]), 4))


def test_ccd_recovers_a_planted_division():
    rng = np.random.default_rng(0)
    n = 4000
    noisy = rng.random(n) < 0.4
    common = rng.normal(0, 0.04, n)
    losses = {name: np.where(noisy, rng.normal(0.7, 0.08, n), rng.normal(0.2, 0.05, n)) + common
              for name in ("bge", "tse")}
    div = ccd.divide(losses, seed=3, max_iter=100, tol=1e-4, reg_covar=1e-6, threshold=0.5)
    diag = ccd.diagnostics(div, noisy)
    assert diag["consensus_precision"] > 0.99 and diag["consensus_recall"] > 0.99
    assert diag["bge_precision"] > 0.98 and diag["kept"] == pytest.approx(0.6, abs=0.02)
    again = ccd.divide(losses, seed=3, max_iter=100, tol=1e-4, reg_covar=1e-6, threshold=0.5)
    assert np.array_equal(div.labels, again.labels)
    # branches that disagree everywhere: every label is a coin flip, about half kept
    flipped = ccd.divide({"bge": losses["bge"], "tse": 1 - losses["tse"]}, seed=1, max_iter=100,
                         tol=1e-4, reg_covar=1e-6, threshold=0.5)
    assert flipped.disagree > 0.9 * n and 0.4 < flipped.labels.mean() < 0.6


def test_division_always_divides():
    """All pairs above the threshold: it drops to the 1st percentile (about 1 % noisy)."""
    fit = ccd.fit_branch(np.r_[np.zeros(500), np.full(5, 1e-3)], max_iter=10, tol=1e-2,
                         reg_covar=5e-4, threshold=1e-9)
    assert 0 < (~fit.clean).sum() <= 0.02 * 505


# Training-mode BatchNorm uses each rank's own batch statistics (as under DDP), so the weighted
# training loss is compared with the TSE BatchNorms in eval mode; the per-sample losses of the
# division are scored in eval mode anyway.
BN_EVAL = ["recipe.tse.authors_bn_eval=true"]


def _worker(rank, port, tok_dir, out_path):
    init_gloo(rank, port, 2)
    torch.set_num_threads(1)
    model, tok, cfg = _model(tok_dir, extra=BN_EVAL)
    model.sample_weight[:] = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    batch = _batch(tok)
    local = {k: v[rank * 6:(rank + 1) * 6] for k, v in batch.items()}
    step = StepInfo(0, 0, 0.05, torch.Generator())
    model.eval()
    with torch.no_grad():
        per = _per_sample(model, cfg, local, step)
    gathered = {k: [torch.empty_like(v) for _ in range(2)] for k, v in per.items()}
    for k, v in per.items():
        dist.all_gather(gathered[k], v)
    model.train()
    out = _train(model, cfg, tok, local, step)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
        g /= 2
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"per": {k: torch.cat(v) for k, v in gathered.items()}, "loss": loss / 2,
                    "grads": grads}, out_path)
    dist.destroy_process_group()



@pytest.mark.distributed
def test_two_rank_per_sample_and_weighted_losses_equal_one_process(tmp_path, tok_dir):
    out_path = tmp_path / "dist.pt"
    mp.start_processes(_worker, args=(free_port(), tok_dir, str(out_path)), nprocs=2,
                       start_method="spawn")
    got = torch.load(out_path)
    model, tok, cfg = _model(tok_dir, extra=BN_EVAL)
    model.sample_weight[:] = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    batch, step = _batch(tok), StepInfo(0, 0, 0.05, torch.Generator())
    model.eval()
    with torch.no_grad():
        per = _per_sample(model, cfg, batch, step)
    for k in ("bge", "tse"):
        torch.testing.assert_close(got["per"][k], per[k], rtol=1e-10, atol=1e-12)
    model.train()
    out = _train(model, cfg, tok, batch, step)
    out["loss"].backward()
    # rank 1 holds no anchor at all (weight 0 on samples 6..11): its loss is exactly 0
    torch.testing.assert_close(got["loss"], out["loss"].detach(), rtol=1e-8, atol=1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-6, atol=1e-10,
                                       msg=name)


def test_a_batch_without_anchors_gives_zero_loss_and_gradients(tok_dir):
    model, tok, cfg = _model(tok_dir, dtype=torch.float32)
    model.sample_weight.zero_()
    out = _train(model, cfg, tok, _batch(tok, dtype=torch.float32),
                 StepInfo(0, 0, 0.015, torch.Generator()))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and torch.isfinite(out["tal_bge"])
    assert all(torch.isfinite(p.grad).all() and not p.grad.any()
               for p in model.parameters() if p.grad is not None)


@pytest.mark.distributed
@pytest.mark.slow
def test_rde_run_divides_logs_and_plots(tmp_path, tiny_shards_noisy):
    from tests.trainer.conftest import launch

    run = tmp_path / "run"
    launch("cpu_ddp.yaml", run, tiny_shards_noisy, "method=rde", "loss.tau=0.05",
           "loss.tau_start=null", "train.epochs=2", "recipe.weighting.warmup_epochs=1",
           "recipe.tse.dim=64")
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "epoch_start"]
    assert [e["epoch"] for e in starts] == [1]
    assert 0 <= starts[0]["ccd/consensus_precision"] <= 1 and starts[0]["scored"] == 320
    assert starts[0]["ccd/true_clean"] == pytest.approx(0.5)
    assert (run / "ccd" / "epoch-01.png").stat().st_size > 10_000
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs[1]["epoch_start_seconds"] > 0 and 0 < epochs[1]["epoch_start_fraction"] < 1
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["final"]) == ["BGE+TSE", "BGE", "TSE"]
