"""A synthetic person-retrieval dataset, written in the CUHK-PEDES file format.

The real datasets cannot be downloaded here, so pedestrians are drawn with PIL and written in
CUHK-PEDES's layout; synthetic data then takes the same path as real data (reader, sharding,
noise injection, loader). Every identity's and image's random numbers come from (seed, id, image
number), so the output is byte-identical for a seed whatever the number of worker processes.

    tbps synth --out data/synth --seed 0     # 1300 ids x 4 images at 96 x 32, a few seconds

    from tbps.data_pipeline.synthetic import SynthConfig, generate, preview
    cfg = SynthConfig(seed=0, num_train_ids=20, num_val_ids=4, num_test_ids=4)
    generate("data/synth-tiny", cfg, workers=2)          # well under a second
    preview("data/synth-tiny", "data/synth-tiny.png")   # contact sheet to look at

This module gathers the generator's names; the parts live in
- synth_population: SynthConfig (its difficulty and population knobs), the attribute vocabulary,
  the identities (`sample_identities`), `pretrain_config()`;
- synth_render: drawing one image (`render_image`);
- synth_captions: the captions, in two styles;
- synth_vocab: one vocabulary and tokenizer for every population;
- synth_writer: the dataset in CUHK-PEDES's layout (`generate`); synth_preview: a contact sheet.
"""
from __future__ import annotations

from tbps.data_pipeline.synth_captions import make_captions, tokenize
from tbps.data_pipeline.synth_population import (
    ATTRIBUTE_PROFILES,
    BACKGROUNDS,
    BAG_TYPES,
    COLOURS,
    HAIR_COLOURS,
    LOWER_TYPES,
    PRETRAIN_SEED,
    SKIN_TONES,
    UPPER_TYPES,
    Identity,
    SynthConfig,
    pretrain_config,
    sample_identities,
)
from tbps.data_pipeline.synth_preview import preview
from tbps.data_pipeline.synth_render import render_image
from tbps.data_pipeline.synth_vocab import PROBE_CAPTION, train_shared_tokenizer, vocabulary
from tbps.data_pipeline.synth_writer import ANNOTATION_FILE, IMAGE_SUBDIR, META_FILE, file_path, generate

__all__ = ["ANNOTATION_FILE", "ATTRIBUTE_PROFILES", "BACKGROUNDS", "BAG_TYPES", "COLOURS",
           "HAIR_COLOURS", "IMAGE_SUBDIR", "LOWER_TYPES", "META_FILE", "PRETRAIN_SEED",
           "PROBE_CAPTION", "SKIN_TONES", "UPPER_TYPES", "Identity", "SynthConfig", "file_path",
           "generate", "make_captions", "pretrain_config", "preview", "render_image",
           "sample_identities", "tokenize", "train_shared_tokenizer", "vocabulary"]
