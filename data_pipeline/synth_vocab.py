"""One vocabulary for every synthetic population, and a tokenizer over it.

`vocabulary()` lists every token either caption style can write; `train_shared_tokenizer()`
builds one word-level tokenizer on it, so a model pretrained on one population reads the other's
captions (`shard --tokenizer synthetic-vocab` puts it beside the shards).
"""
from __future__ import annotations

import os

from tbps.data_pipeline.synth_captions import STYLES, make_captions, style_words
from tbps.data_pipeline.synth_population import COLOURS, HAIR_COLOURS, SynthConfig, sample_identities
from tbps.data_pipeline.tokenizer import PROBE, train_word_level

# The tokenizer check embeds this sentence: its words must be in the vocabulary.
PROBE_CAPTION = PROBE


def vocabulary(styles=tuple(STYLES)) -> list[str]:
    """Every token a caption in these styles can contain (words, "," and "."), sorted."""
    words = {w for name in styles for w in style_words(name)}
    return sorted(words | set(COLOURS) | set(HAIR_COLOURS))


def train_shared_tokenizer(out_dir: str | os.PathLike):
    """A word-level tokenizer over `vocabulary()` (every style), saved in out_dir: the same ids
    for every synthetic population. Judged by a few captions of each style."""
    probe = []
    for name in STYLES:
        config = SynthConfig(num_train_ids=4, num_val_ids=0, num_test_ids=1, caption_style=name)
        probe += [c for ident in sample_identities(config) for c in make_captions(ident, 0, config)]
    return train_word_level(vocabulary(), out_dir, probe=probe)
