"""A pretraining population beside the benchmark: the default output unchanged, determinism,
disjoint identities, a real shift, and one vocabulary for both.

    python -m pytest -q tests/data_pipeline/test_populations.py
"""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tbps.data_pipeline.cli import main
from tbps.data_pipeline.synth_captions import STYLES, style_words
from tbps.data_pipeline.synthetic import (
    ANNOTATION_FILE,
    COLOURS,
    LOWER_TYPES,
    META_FILE,
    UPPER_TYPES,
    SynthConfig,
    generate,
    make_captions,
    pretrain_config,
    render_image,
    sample_identities,
    train_shared_tokenizer,
    vocabulary,
)

SMALL = {"num_train_ids": 12, "num_val_ids": 4, "num_test_ids": 4, "images_per_id": 3}
TINY = {"num_train_ids": 6, "num_val_ids": 2, "num_test_ids": 2, "images_per_id": 2}
# sha256 of reid_raw.json + synth_meta.json + the raw pixels of image 1 of every 5th identity,
# for SynthConfig(**SMALL), recorded from the generator before the population knobs existed
DEFAULT_DIGEST = "426d4eb45d39958661279238607fe7803f7900a6a70fb891e3f576f6f98c4db9"


def _digest(out: Path, cfg: SynthConfig) -> str:
    h = hashlib.sha256()
    for name in (ANNOTATION_FILE, META_FILE):
        h.update((out / name).read_bytes())
    for ident in sample_identities(cfg)[::5]:
        h.update(render_image(ident, 1, cfg).tobytes())
    return h.hexdigest()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _captions(cfg: SynthConfig, images: int = 2) -> list[str]:
    return [c for i in sample_identities(cfg) for k in range(images) for c in make_captions(i, k, cfg)]


def test_default_benchmark_output_is_unchanged(tmp_path):
    cfg = SynthConfig(**SMALL)
    generate(tmp_path, cfg, progress=False)
    assert _digest(tmp_path, cfg) == DEFAULT_DIGEST
    assert set(json.loads((tmp_path / META_FILE).read_text())[0]["config"]).isdisjoint(
        {"caption_style", "background", "attribute_profile", "figure_zoom", "disjoint_from"})


def test_pretrain_population_is_deterministic_and_self_describing(tmp_path):
    cfg = pretrain_config(**TINY)
    generate(tmp_path / "a", cfg, workers=1, progress=False)
    generate(tmp_path / "b", cfg, workers=2, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert SynthConfig.from_json(meta[0]["config"]) == cfg
    assert cfg.seed != SynthConfig().seed and cfg.disjoint_from == SynthConfig()
    # the CLI preset, excluding a benchmark given by its folder, is the same population
    bench = SynthConfig(seed=4, **TINY)
    generate(tmp_path / "bench", bench, progress=False)
    assert main(["synth", "--out", str(tmp_path / "c"), "--population", "pretrain",
                 "--disjoint-from", str(tmp_path / "bench"), "--train-ids", "6", "--val-ids", "2",
                 "--test-ids", "2", "--images-per-id", "2", "--quiet"]) == 0
    got = json.loads((tmp_path / "c" / META_FILE).read_text())[0]["config"]
    assert SynthConfig.from_json(got) == pretrain_config(disjoint_from=bench, **TINY)


def test_no_pretraining_identity_equals_a_benchmark_identity():
    """Equal = the same attribute tuple. The exclusion itself: a population drawn with the
    benchmark's very seed and sizes repeats every identity unless told to avoid them."""
    benchmark = {i.attributes() for i in sample_identities(SynthConfig())}
    pretrain = [i.attributes() for i in sample_identities(pretrain_config(num_train_ids=3000))]
    assert len(set(pretrain)) == len(pretrain) and benchmark.isdisjoint(pretrain)
    same = SynthConfig(seed=0, **SMALL)
    twin = {i.attributes() for i in sample_identities(same)}
    assert {i.attributes() for i in sample_identities(SynthConfig(seed=0, **SMALL))} == twin
    avoided = {i.attributes() for i in sample_identities(
        SynthConfig(seed=0, disjoint_from=same, **SMALL))}
    assert len(avoided) == same.num_ids and avoided.isdisjoint(twin)


def _distribution(values, keys) -> np.ndarray:
    counts = Counter(values)
    return np.array([counts[k] for k in keys], float) / len(values)


def test_the_shift_is_real():
    bench = SynthConfig(num_train_ids=1500, num_val_ids=0, num_test_ids=1)
    pre = pretrain_config(num_train_ids=1500, num_val_ids=0, num_test_ids=1)
    ids_b, ids_p = sample_identities(bench), sample_identities(pre)
    # attribute frequencies: total variation distance of garment and colour distributions
    for field, keys in (("upper", UPPER_TYPES), ("upper_colour", list(COLOURS)),
                        ("lower", LOWER_TYPES)):
        tv = 0.5 * np.abs(_distribution([getattr(i, field) for i in ids_b], keys)
                          - _distribution([getattr(i, field) for i in ids_p], keys)).sum()
        assert tv > 0.1, field
    # captions: other templates and synonyms
    web_only = style_words("web") - style_words("pedestrian") - {"grey", "purple"}
    small_b = SynthConfig(num_train_ids=100, num_val_ids=0, num_test_ids=1)
    small_p = pretrain_config(num_train_ids=100, num_val_ids=0, num_test_ids=1)
    words_b = [set(re.findall(r"[a-z]+", c)) for c in _captions(small_b)]
    words_p = [set(re.findall(r"[a-z]+", c)) for c in _captions(small_p)]
    assert not any(w & web_only for w in words_b)
    assert np.mean([bool(w & web_only) for w in words_p]) > 0.95
    # backgrounds: the studio backdrop is light, the street one any colour
    def top_rows(cfg, identities):
        return np.mean([np.asarray(render_image(i, 0, cfg))[:2].mean() for i in identities[:30]])
    assert top_rows(pre, ids_p) > top_rows(bench, ids_b) + 40


def test_one_vocabulary_covers_both_populations(tmp_path):
    """vocabulary() is exactly what the captions of both styles contain (as the tokenizer splits
    them), and the shared tokenizer reads both populations without an unknown word."""
    seen = set()
    captions = {}
    for name, cfg in (("pedestrian", SynthConfig(num_train_ids=300, num_val_ids=0, num_test_ids=1)),
                      ("web", pretrain_config(num_train_ids=300, num_val_ids=0, num_test_ids=1))):
        captions[name] = _captions(cfg, images=4)
        words = {w for c in captions[name] for w in re.findall(r"\w+|[^\w\s]+", c)}
        assert words == set(vocabulary((name,))), name
        seen |= words
    assert seen == set(vocabulary()) and set(STYLES) == {"pedestrian", "web"}
    tok = train_shared_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == len(vocabulary()) + 5
    for name, caps in captions.items():
        assert tok.unk_id not in tok.encode_batch(caps[:500]), name


def test_shards_of_both_populations_share_the_tokenizer(tmp_path):
    from tbps.data_pipeline.sharding import ShardOptions, shard_dataset
    from tbps.data_pipeline.tokenizer import CaptionTokenizer

    vocabs = []
    for name, cfg in (("b", SynthConfig(**TINY)), ("p", pretrain_config(**TINY))):
        generate(tmp_path / name, cfg, progress=False)
        shard_dataset("cuhk-pedes", tmp_path / name, tmp_path / f"{name}-shards",
                      ShardOptions(shard_size=8, tokenizer="synthetic-vocab"), progress=False)
        tok = CaptionTokenizer.from_pretrained(tmp_path / f"{name}-shards" / "tokenizer")
        vocabs.append(tok.hf.get_vocab())
    assert vocabs[0] == vocabs[1]
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        ShardOptions(tokenizer="bpe")
