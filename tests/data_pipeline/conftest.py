import shutil

import pytest

from tbps.data_pipeline.sharding import ShardOptions, shard_dataset
from tbps.data_pipeline.synthetic import SynthConfig, generate

SMALL = dict(num_train_ids=30, num_val_ids=6, num_test_ids=8, images_per_id=4)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset in the CUHK-PEDES format: 240 train pairs, 48 val, 64 test."""
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(seed=3, **SMALL), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory, synth_root):
    """Its shards: 16 samples a shard, so the train split has 15 shards."""
    out = tmp_path_factory.mktemp("shards") / "out"
    shard_dataset("cuhk-pedes", synth_root, out, ShardOptions(shard_size=16), progress=False)
    return out


@pytest.fixture
def shard_copy(tmp_path, shard_root):
    """A private copy of the shards that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(shard_root, dst)
    return dst


@pytest.fixture(scope="session")
def tokenizer(shard_root):
    from tbps.data_pipeline.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_pretrained(shard_root / "tokenizer")
