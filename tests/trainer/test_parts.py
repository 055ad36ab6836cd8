"""The recipe's sampled and momentum parts against their definitions (METHODS.md).

AWM (AMNS): drop floor(r N) patches without replacement with probability proportional to
1 - the normalised score; AGM (AGA): k = ceil(0.15 n) words by the layer-aggregated attention;
ITM's hard negatives: the similarity softmax over other identities; ITC with distillation, BSDM
and WAF (with per-pair weights) against float64 formulas written out here.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tbps.trainer.recipe import draws, losses
from tbps.trainer.recipe.caption_masking import aggregate_layers, sampled_mlm_mask, word_positions
from tbps.trainer.recipe.token_selection import awm_weights, keep_patches, kept_indices


def inclusion_probabilities(w: list[float], k: int) -> list[float]:
    """P(item j among k draws without replacement, probability proportional to w), exactly."""
    n, total = len(w), [0.0] * len(w)
    for seq in itertools.permutations(range(n), k):
        p, left = 1.0, sum(w)
        for j in seq:
            p *= w[j] / left
            left -= w[j]
        for j in seq:
            total[j] += p
    return total


def assert_frequencies(counts: torch.Tensor, trials: int, want: list[float], sigmas: float = 5):
    for j, p in enumerate(want):
        sd = math.sqrt(max(p * (1 - p), 1e-12) / trials)
        assert abs(counts[j].item() / trials - p) <= sigmas * sd + 1e-12, (j, counts[j] / trials, p)


# -- keyed draws -----------------------------------------------------------------------------------

def test_keyed_draws_depend_on_the_sample_not_on_its_batch():
    idx = torch.tensor([5, 17, 3, 99])
    u = draws.uniform(7, idx, 6, stream=draws.AWM)
    assert u.shape == (4, 6) and bool(((u > 0) & (u < 1)).all())
    torch.testing.assert_close(draws.uniform(7, idx[[2, 0]], 6, stream=draws.AWM), u[[2, 0]])
    assert not torch.equal(draws.uniform(7, idx, 6, stream=draws.AGM), u)      # other stream
    assert not torch.equal(draws.uniform(8, idx, 6, stream=draws.AWM), u)      # other step
    big = draws.uniform(draws.step_seed(0, 1, 2), torch.arange(4000), 50, stream=1)
    assert abs(big.mean().item() - 0.5) < 0.003 and abs(big.var().item() - 1 / 12) < 0.002
    e = draws.exponential(3, torch.arange(4000), 50, stream=2)
    assert abs(e.mean().item() - 1) < 0.01 and e.dtype == torch.float32


# -- AWM -----------------------------------------------------------------------------------------

def _keep(scores_BN, ratio, index):
    """AWM's selection for a planted momentum score map."""
    from types import SimpleNamespace

    awm = SimpleNamespace(kind="attention", ratio=ratio)
    return keep_patches(awm, scores_BN.shape[1], scores_BN, (11, index))


def test_awm_drops_patches_with_the_inclusion_probabilities_of_its_definition():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.0])      # N = 8, drop 2
    w = awm_weights(scores[None])[0].tolist()
    assert w[0] == 0 and w[7] == 1
    trials = 40000
    kept = _keep(scores.expand(trials, -1), 0.3, torch.arange(trials))
    assert kept.shape == (trials, 6) and bool((kept[:, 1:] > kept[:, :-1]).all())
    dropped = torch.ones(trials, 8).scatter_(1, kept, 0.0).sum(0)
    assert dropped[0] == 0                                 # the best patch is never dropped
    assert_frequencies(dropped, trials, inclusion_probabilities(w, 2))


def test_awm_keeps_a_planted_person_and_drops_the_background():
    person = torch.zeros(4, 12)          # 12 patches; 8 person patches scored high
    person[:, [1, 2, 5, 6, 9, 10, 4, 7]] = 1.0
    scores = person + 0.01 * torch.rand(4, 12, generator=torch.Generator().manual_seed(0))
    kept = _keep(scores, 0.34, torch.arange(4))                  # drop floor(0.34 * 12) = 4
    for row in kept.tolist():
        assert set(row) == {1, 2, 4, 5, 6, 7, 9, 10}
    # random dropping at the same ratio: any patch goes
    assert kept_indices(torch.tensor([[0, 3]]), torch.tensor([[True, True]]), 5).tolist() == \
        [[1, 2, 4]]


# -- AGM -----------------------------------------------------------------------------------------

def test_agm_layer_aggregation_is_the_exponential_weighting():
    rows = torch.rand(3, 4, 9, generator=torch.Generator().manual_seed(1))
    beta = 0.5
    want = beta ** 3 * rows[:, 0] + sum((1 - beta) * beta ** (3 - l) * rows[:, l] for l in (1, 2, 3))
    torch.testing.assert_close(aggregate_layers(rows, beta), want)


def test_agm_draws_ceil_ratio_words_with_its_law():
    # captions: [SOT, w1..w5, EOS, pad, pad]; scores over the words
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 2, 0, 0]])
    eos = torch.tensor([6])
    score = torch.tensor([[0.3, 0.05, 0.1, 0.2, 0.4, 0.15, 0.5, 0.9, 0.9]])
    trials = 30000
    ids_T, eos_T, score_T = ids.expand(trials, -1), eos.expand(trials), score.expand(trials, -1)
    noise = draws.exponential(5, torch.arange(trials), 9, stream=draws.AGM)
    masked, labels = sampled_mlm_mask(ids_T, eos_T, score_T, ratio=0.3, mask_id=3,
                                      vocab_size=20, special_ids=[0, 1, 2, 3],
                                      generator=torch.Generator().manual_seed(0),
                                      noise_BL=noise)
    chosen = labels != -100
    assert bool((chosen.sum(1) == math.ceil(0.3 * 5)).all())          # k = 2 of 5 words
    assert not chosen[:, [0, 6, 7, 8]].any()                          # never SOT, EOS, pad
    w = (score[0, 1:6] / score[0, 1:6].sum()).tolist()
    assert_frequencies(chosen[:, 1:6].sum(0), trials, inclusion_probabilities(w, 2))
    # 80 / 10 / 10 at the chosen positions
    n = chosen.sum().item()
    as_mask = ((masked == 3) & chosen).sum().item() / n
    kept = ((masked == ids_T) & chosen).sum().item() / n
    assert abs(as_mask - 0.8) < 0.01 and 0.09 < kept < 0.12          # kept: 10 % + random hits
    assert bool((word_positions(ids_T, eos_T) | ~chosen).all())


# -- ITM's hard negatives --------------------------------------------------------------------------

def test_itm_negatives_never_share_the_identity_and_follow_the_softmax():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    keys = F.normalize(torch.randn(6, 8), dim=-1)
    pid = torch.tensor([0, 1, 2])
    key_ids = torch.tensor([0, 0, 1, 2, 2, 2])          # query 2 has only ids 0 and 1 to pick
    trials = 20000
    noise = draws.exponential(1, torch.arange(trials * 3), 6, stream=draws.ITM_TEXT)
    picks, found = losses.itm_negatives(q.repeat(trials, 1), keys, pid.repeat(trials), key_ids,
                                        tau=0.5, noise_BN=noise)
    assert bool(found.all())
    assert bool((key_ids[picks] != pid.repeat(trials)).all())
    for i in range(3):
        allowed = key_ids != pid[i]
        p = torch.where(allowed, ((q[i] @ keys.T) / 0.5).exp(), 0.0)
        counts = torch.bincount(picks[i::3], minlength=6).float()
        assert_frequencies(counts, trials, (p / p.sum()).tolist())
    # no key of another identity anywhere: found False
    _, none = losses.itm_negatives(q[:1], keys[:2], pid[:1], key_ids[:2], tau=0.5,
                                   noise_BN=torch.ones(1, 2))
    assert not none.any()


# -- the similarity terms against float64 formulas ------------------------------------------------

def _setup(n=6, d=5):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    txt = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    pid = torch.tensor([0, 1, 0, 2, 1, 3])
    return img, txt, pid, g


def _p_q(a, b, pid, tau):
    s = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    pos = (pid[:, None] == pid[None]).double()
    return s, torch.softmax(s / tau, dim=1), pos / pos.sum(1, keepdim=True), pos


def test_itc_with_distillation_equals_its_float64_formula():
    img, txt, pid, g = _setup()
    m_img, m_txt = torch.randn(6, 5, dtype=torch.float64, generator=g), \
        torch.randn(6, 5, dtype=torch.float64, generator=g)
    tau, alpha = 0.07, 0.4
    keys = losses.GatheredKeys(img, txt)
    i2t, t2i = losses.bidirectional(img, txt, pid, keys, pid, kind="itc", tau=tau, alpha=alpha,
                                    momentum_img_nD=m_img, momentum_txt_nD=m_txt,
                                    momentum_img_keys_ND=m_img, momentum_txt_keys_ND=m_txt)
    got = (i2t + t2i).sum()
    want = 0
    for a, b, ma, mb in ((img, txt, m_img, m_txt), (txt, img, m_txt, m_img)):
        _, p, q, _ = _p_q(a, b, pid, tau)
        _, pm, _, _ = _p_q(ma, mb, pid, tau)
        target = alpha * pm + (1 - alpha) * q
        want = want - (target * torch.log(p)).sum()
    torch.testing.assert_close(got, want)
    for gx, wx in zip(torch.autograd.grad(got, (img, txt)), torch.autograd.grad(want, (img, txt))):
        torch.testing.assert_close(gx, wx)


def test_bsdm_and_waf_with_pair_weights_equal_their_float64_formulas():
    from tbps.trainer.recipe.losses import reduce as _reduce

    img, txt, pid, g = _setup()
    w = torch.rand(6, dtype=torch.float64, generator=g)           # e.g. clean probabilities
    tau, lam, eps, gamma = 0.1, 0.7, 1e-8, 2.0
    keys = losses.GatheredKeys(img, txt)
    bsdm = sum(losses.bidirectional(img, txt, pid, keys, pid, kind="bsdm", tau=tau, lam=lam,
                                    eps=eps))
    waf = sum(losses.bidirectional(img, txt, pid, keys, pid, kind="waf", tau=tau, gamma=gamma))
    got = _reduce(bsdm, w, "mean") + _reduce(waf, w, "mean")
    want_b, want_w = 0, 0
    for a, b in ((img, txt), (txt, img)):
        _, p, q, pos = _p_q(a, b, pid, tau)
        kl_pq = (p * (torch.log(p) - torch.log(q + eps))).sum(1)
        kl_qp = (q * (torch.log(q + eps) - torch.log(p))).sum(1)
        want_b = want_b + kl_pq + lam * kl_qp
        P = (p * pos).sum(1)
        want_w = want_w - (1 - P) ** gamma * torch.log(P)
    want = (w * want_b).mean() + (w * want_w).mean()
    torch.testing.assert_close(got, want)
    for gx, wx in zip(torch.autograd.grad(got, (img, txt)), torch.autograd.grad(want, (img, txt))):
        torch.testing.assert_close(gx, wx)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tbps.data_pipeline.tokenizer import PROBE, CaptionTokenizer, train_word_level

    path = tmp_path_factory.mktemp("tok")
    train_word_level([PROBE, "a man with a green bag", "the man wears blue jeans"] * 2, path)
    return CaptionTokenizer.from_pretrained(path, context_length=16)


SMALL = ["model.image_size=[32, 16]", "model.vision_width=32", "model.text_width=32",
         "model.embed_dim=16", "model.vision_layers=1", "model.text_layers=1",
         "model.vision_heads=2", "model.text_heads=2", "model.context_length=16",
         "model.cross_heads=2"]


def small_model(tok, overrides, num_samples=8):
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.model.weights import build_model

    torch.manual_seed(0)
    cfg = load_config(None, SMALL + list(overrides))
    return build_model(cfg, tok, num_classes=4, num_samples=num_samples).double(), cfg


def small_batch(tok, n=8):
    from tbps.data_pipeline.tokenizer import PROBE

    g = torch.Generator().manual_seed(2)
    caps = [PROBE, "a man with a green bag", "the man wears blue jeans", "a man"]
    return {"image": torch.randn(n, 3, 32, 16, generator=g, dtype=torch.float64),
            "input_ids": torch.from_numpy(tok.encode_batch([caps[i % 4] for i in range(n)])),
            "pid": torch.tensor([0, 1, 2, 0, 3, 1, 2, 3][:n]), "index": torch.arange(n)}


@pytest.mark.parametrize("kind", ["bsdm", "waf"])
def test_the_recipe_weights_each_pair_by_its_clean_probability(tok, kind):
    from tbps.trainer.recipe.consensus_division import set_weights
    from tbps.trainer.recipe.step import Recipe, StepInfo

    model, cfg = small_model(tok, [f"recipe.losses=[{{kind: {kind}}}]", "loss.tau_start=null",
                              "recipe.weighting.kind=consensus", "recipe.weighting.use=probability"])
    w = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.1], dtype=torch.float64)
    set_weights(model, torch.arange(8), w)
    batch = small_batch(tok)
    out = model(Recipe(cfg, tok).train_losses, batch, StepInfo(0, 0, 0.1, torch.Generator()))
    enc = model.encoder
    img, txt = enc.encode_image(batch["image"]).embeds_BE, enc.encode_text(batch["input_ids"]).embeds_BE
    per = sum(losses.bidirectional(img, txt, batch["pid"], losses.GatheredKeys(img, txt),
                                   batch["pid"], kind=kind, tau=0.1))
    torch.testing.assert_close(out["loss"], (w * per).mean())
    torch.testing.assert_close(out[kind], per.mean())
    assert out["mean_weight"].item() == pytest.approx(w.mean().item())
