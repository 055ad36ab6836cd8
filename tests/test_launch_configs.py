"""Every accelerate config in launch/ is one accelerate itself accepts."""
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_reads_it(path):
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2
    if "zero" in path.name and "deepspeed_config_file" not in cfg.deepspeed_config:
        assert cfg.deepspeed_config["zero3_save_16bit_model"] is True
