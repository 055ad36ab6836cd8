"""RDE's caption augmentation (trainer/recipe/caption_augment.py) against a plain loop written
as the authors' txt_data_aug (2024-CVPR-RDE/datasets/bases.py), its rates against the binomial
spread, its rules exactly, its keyed draws, the config and the step's wiring."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tbps.trainer.common.config import CaptionAugmentConfig
from tbps.trainer.common.config_files import load_config
from tbps.trainer.recipe import caption_augment as ca
from tbps.trainer.recipe.step import Recipe, StepInfo

SOT, EOT, MASK, UNK = 1, 2, 3, 4          # a small vocabulary's special ids
V = 50
SPECIAL = (0, SOT, EOT, MASK, UNK)        # 0: the pad id of a word-level tokenizer
WORDS = [i for i in range(V) if i not in SPECIAL]
RULE = dict(prob=0.2, mask=0.6, random=0.2, eot_id=EOT, mask_id=MASK, vocab_size=V,
            special_ids=SPECIAL)


def reference(row, u, pick, *, prob, mask, random, eot_id, pad_id, mask_id, vocab_size,
              special_ids):
    """The authors' loop over one caption, with its draws given: a word (after the start token,
    before the first end token, not special) with u < prob is masked / replaced / dropped by
    u / prob against mask and mask + random; the rest kept; padding fills the end."""
    words = [i for i in range(vocab_size) if i not in special_ids]
    eos = row.index(eot_id)
    out = []
    for i, token in enumerate(row):
        if 0 < i < eos and token not in special_ids and u[i] < prob:
            p = u[i] / prob
            if p < mask:
                out.append(mask_id)
            elif p < mask + random:
                out.append(words[int(pick[i] * len(words))])
            # else: deleted
        else:
            out.append(token)
    return out + [pad_id] * (len(row) - len(out))


def captions(n, L, *, pad_id, seed=0):
    """n captions of 0 .. L-2 words (ids from WORDS, a special one now and then), padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(0, L - 1, (1,), generator=g))
        ids = [WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g)]
        ids = [UNK if int(torch.randint(10, (1,), generator=g)) == 0 else t for t in ids]
        row = [SOT, *ids, EOT]
        rows.append(row + [pad_id] * (L - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("pad_id", [0, EOT])          # word-level <pad>; CLIP pads with EOT
@pytest.mark.parametrize("L", [8, 77])
def test_matches_the_authors_loop(pad_id, L):
    ids = captions(300, L, pad_id=pad_id)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(ids.shape, generator=g, dtype=torch.float64)
    u = torch.where(u < 0.5, u * 0.4, u)                # more chosen words: every branch met often
    pick = torch.rand(ids.shape, generator=g, dtype=torch.float64)
    got = ca.augment_ids(ids, u, pick, pad_id=pad_id, **RULE)
    for b in range(ids.shape[0]):
        want = reference(ids[b].tolist(), u[b].tolist(), pick[b].tolist(), pad_id=pad_id, **RULE)
        assert got[b].tolist() == want, (ids[b].tolist(), got[b].tolist(), want)
    assert not torch.equal(got, ids)


def test_rules_on_a_written_example():
    #            SOT  w   w   unk  w   EOT pad pad        (pad = 0)
    ids = torch.tensor([[SOT, 10, 11, UNK, 12, EOT, 0, 0]])
    u = torch.tensor([[0.0, 0.01, 0.19, 0.0, 0.13, 0.0, 0.0, 0.0]])   # 10 masked, 11 deleted,
    pick = torch.zeros_like(u)                                         # 12 replaced, rest never
    got = ca.augment_ids(ids, u, pick, pad_id=0, **RULE)
    assert got.tolist() == [[SOT, MASK, UNK, WORDS[0], EOT, 0, 0, 0]]
    # a full caption (EOS last): a deletion moves EOS left and pads the end; a caption can lose
    # every word
    full = torch.tensor([[SOT, 10, 11, 12, EOT]])
    got = ca.augment_ids(full, torch.tensor([[0.0, 0.5, 0.18, 0.5, 0.0]]),
                         torch.zeros(1, 5), pad_id=EOT, **RULE)
    assert got.tolist() == [[SOT, 10, 12, EOT, EOT]]
    gone = ca.augment_ids(full, torch.full((1, 5), 0.19), torch.zeros(1, 5), pad_id=0, **RULE)
    assert gone.tolist() == [[SOT, EOT, 0, 0, 0]]


def test_random_words_are_every_non_special_id_uniformly():
    """word_id maps rank r to the r-th non-special id: equal steps of u give each word once."""
    special = torch.tensor(sorted(SPECIAL))
    n = len(WORDS)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    assert ca.word_id(u, V, special).tolist() == WORDS
    special = torch.tensor([0, 7, 8, 49])                # specials at both ends and side by side
    allowed = [i for i in range(V) if i not in (0, 7, 8, 49)]
    u = (torch.arange(len(allowed), dtype=torch.float64) + 0.5) / len(allowed)
    assert ca.word_id(u, V, special).tolist() == allowed


def _augment(prob=0.2, mask=0.6, random=0.2, pad_id=0, seed=3):
    cfg = CaptionAugmentConfig(kind="rde", prob=prob, mask=mask, random=random)
    return ca.CaptionAugment(cfg, seed=seed, eot_id=EOT, pad_id=pad_id, mask_id=MASK,
                             vocab_size=V, special_ids=SPECIAL)


def test_rates_within_the_binomial_spread():
    """Captions of one repeated word w: masks, other words and the EOS shift count the three
    outcomes. Each token is an independent draw, so each count is binomial(N words, p); the
    bound is 5 standard deviations (a false alarm about once in 3.5 million)."""
    n, L, w = 4000, 32, 10
    ids = torch.full((n, L), 0)
    ids[:, 0], ids[:, 1:L - 1], ids[:, L - 1] = SOT, w, EOT
    N = n * (L - 2)
    out = _augment()(ids, torch.arange(n), epoch=2, stage=ca.TRAIN)
    eos = (out == EOT).int().argmax(dim=1)
    body = torch.arange(L)[None] < eos[:, None]
    counts = {"mask": int((out == MASK).sum()),
              "random": int((body & (out != MASK) & (out != w)).sum()) - n,   # minus SOT
              "delete": int((L - 1 - eos).sum())}
    # a random word equal to w looks unchanged: (n_words - 1) / n_words of them show
    want = {"mask": 0.2 * 0.6, "random": 0.2 * 0.2 * (len(WORDS) - 1) / len(WORDS),
            "delete": 0.2 * 0.2}
    for k, p in want.items():
        sd = math.sqrt(N * p * (1 - p))
        assert abs(counts[k] - N * p) <= 5 * sd, (k, counts[k] / N, p)
    assert bool((out[:, 0] == SOT).all())


def test_draws_follow_the_sample_not_the_batch():
    """A caption gets the same augmentation in any batch, on any rank (half a batch), in any
    order; another epoch or the division's pass draws anew."""
    aug = _augment()
    ids = captions(64, 20, pad_id=0, seed=4)
    index = torch.arange(100, 164)
    whole = aug(ids, index, epoch=1, stage=ca.TRAIN)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    rank1 = order[32:]                                   # the second rank's share, shuffled
    assert torch.equal(aug(ids[rank1], index[rank1], epoch=1, stage=ca.TRAIN), whole[rank1])
    assert not torch.equal(aug(ids, index, epoch=2, stage=ca.TRAIN), whole)
    assert not torch.equal(aug(ids, index, epoch=1, stage=ca.DIVISION), whole)


@pytest.mark.parametrize("field, value", [("kind", "bert"), ("prob", 0.0), ("prob", 1.5),
                                          ("mask", 1.2), ("random", 0.5), ("random", -0.1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"'recipe\.caption_augment\.{field}'"):
        load_config(None, ["method=rde", f"recipe.caption_augment.{field}={value}"])


def test_off_in_every_preset_on_in_the_authors_rde_config():
    from tbps.trainer.common.config import presets

    for method in presets():
        assert load_config(None, [f"method={method}"]).recipe.caption_augment.kind == "none"
    authors = load_config(Path(__file__).parents[2] / "launch/configs/rde.yaml").recipe.caption_augment
    assert (authors.kind, authors.prob, authors.mask, authors.random, authors.division) == \
        ("rde", 0.2, 0.6, 0.2, True)


def test_the_summary_names_the_part(tmp_path):
    from tbps.trainer.running.monitor import run_summary

    info = {"run": {"num_processes": 1, "device": "cpu"}, "steps_per_epoch": 1, "total_steps": 1,
            "parameters": 1e6, "global_batch": 8, "micro_batch": 8, "precision_reason": "fp32"}
    on = load_config(None, ["method=rde", "recipe.caption_augment.kind=rde"])
    line = run_summary(on, {}, info, tmp_path)[0]
    assert "caption augment rde 0.2 (mask 0.6, random 0.2, delete 0.2; division too)" in line
    assert "caption augment" not in run_summary(load_config(None, ["method=rde"]), {}, info,
                                                tmp_path)[0]


class _Seen(Exception):
    pass


def test_the_step_encodes_augmented_captions_and_the_division_its_own():
    """The recipe's text encoder reads the augmented captions in training (train draws), the
    plain ones in eval mode; division_batch augments with the division's draws, or not at all
    when recipe.caption_augment.division is false."""
    tok = SimpleNamespace(eot_id=EOT, pad_id=0, mask_id=MASK, vocab_size=V,
                          special_ids=list(SPECIAL))
    seen = []

    def encode_text(ids, **_):
        seen.append(ids)
        raise _Seen

    model = SimpleNamespace(encoder=SimpleNamespace(encode_text=encode_text),
                            attention_rows="none", training=True)
    ids, index = captions(16, 12, pad_id=0, seed=5), torch.arange(40, 56)
    batch = {"input_ids": ids, "index": index, "pid": torch.zeros(16, dtype=torch.long)}
    cfg = load_config(None, ["method=rde", "recipe.caption_augment.kind=rde", "train.seed=9"])
    recipe = Recipe(cfg, tok)
    aug = ca.CaptionAugment(cfg.recipe.caption_augment, seed=9, eot_id=EOT, pad_id=0,
                            mask_id=MASK, vocab_size=V, special_ids=SPECIAL)
    step = StepInfo(epoch=3, step=7, tau=0.02, generator=torch.Generator())
    for training in (True, False):
        model.training = training
        with pytest.raises(_Seen):
            recipe.train_losses(model, batch, step)
    want = aug(ids, index, epoch=3, stage=ca.TRAIN)
    assert torch.equal(seen[0], want) and not torch.equal(want, ids)
    assert torch.equal(seen[1], ids)
    division = recipe.division_batch(batch, 3)["input_ids"]
    assert torch.equal(division, aug(ids, index, epoch=3, stage=ca.DIVISION))
    off = load_config(None, ["method=rde", "recipe.caption_augment.kind=rde",
                             "recipe.caption_augment.division=false"])
    assert Recipe(off, tok).division_batch(batch, 3) is batch
    assert Recipe(load_config(None, ["method=rde"]), tok).augment is None
