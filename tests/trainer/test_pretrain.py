"""trainer/tools/pretrain.py: a tiny backbone made once, reused, refused with
other settings, loadable as model.pretrained, evaluated zero-shot once."""
import json

import pytest
import torch

from tbps.data_pipeline.sharding import ShardOptions, shard_dataset
from tbps.data_pipeline.synthetic import SynthConfig, generate
from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.trainer.common.config import ModelConfig
from tbps.trainer.model.encoder import DualEncoder
from tbps.trainer.tools import pretrain

from .conftest import TINY_MODEL


class Ran(Exception):
    pass


def _no_run(cmd, log=None):
    raise Ran(" ".join(str(c) for c in cmd))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate(root / "synth", SynthConfig(seed=3, num_train_ids=12, num_val_ids=4,
                                         num_test_ids=6), progress=False)
    shard_dataset("cuhk-pedes", root / "synth", root / "shards",
                  ShardOptions(shard_size=16, tokenizer="synthetic-vocab"), progress=False)
    return root


def test_backbone_is_made_once_reused_refused_with_other_settings(bench, tmp_path, monkeypatch):
    settings = pretrain.PretrainSettings(
        benchmark=str(bench / "synth"), train_ids=16, val_ids=4, shard_size=32,
        overrides=(*TINY_MODEL, "train.epochs=1", "train.max_steps=3"))
    backbone = pretrain.ensure_backbone(tmp_path / "bb", settings)
    info = json.loads((backbone / "backbone.json").read_text())
    assert info["settings"]["train_ids"] == 16 and info["pretrain_split"] == "val"
    # model.pretrained loads it, with its tokenizer: the benchmark's words are known
    tok = CaptionTokenizer.from_pretrained(backbone)
    enc = DualEncoder.from_pretrained(str(backbone), ModelConfig(image_size=(96, 32)),
                                      vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    assert enc.grid_hw == (12, 4)
    caption = json.loads((bench / "synth" / "reid_raw.json").read_text())[0]["captions"][0]
    ids = torch.from_numpy(tok.encode_batch([caption]))
    assert tok.unk_id is None or not bool((ids == tok.unk_id).any())
    # its zero-shot metrics on the benchmark, evaluated once per shards folder
    first = pretrain.zero_shot(backbone, bench / "shards")
    assert set(first) == {"t2i"} and 0 <= first["t2i"]["R1"] <= 100
    # the second call reuses everything without running anything
    monkeypatch.setattr(pretrain, "_run", _no_run)
    assert pretrain.ensure_backbone(tmp_path / "bb", settings) == backbone
    assert pretrain.zero_shot(backbone, bench / "shards") == first
    # other settings: refused, naming the difference; --overwrite remakes from the first stage
    other = pretrain.PretrainSettings(**{**settings.__dict__, "train_ids": 20})
    with pytest.raises(ValueError, match="train_ids: 16 -> 20"):
        pretrain.ensure_backbone(tmp_path / "bb", other)
    with pytest.raises(Ran, match="data_pipeline.cli synth"):
        pretrain.ensure_backbone(tmp_path / "bb", other, overwrite=True)
    assert not (tmp_path / "bb" / "backbone").exists()
    record = json.loads((tmp_path / "bb" / "pretrain.json").read_text())
    assert record["settings"]["train_ids"] == 20
