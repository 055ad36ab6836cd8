from pathlib import Path

import pytest

from trainer.config import Config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parents[2] / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.method in path.name


def test_overrides_are_typed():
    cfg = load_config(CONFIGS[0], parse_overrides(
        ["--optim.lr", "1e-3", "train.epochs=3", "--model.image_size=[64, 32]",
         "loss.tau_start=null", "--data.augment", "false"]))
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 3
    assert cfg.model.image_size == (64, 32) and cfg.loss.tau_start is None
    assert cfg.data.augment is False


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config field 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("nothing.x=1", "unknown config field 'nothing'"),
    ("train.epochs=2.5", "invalid config field 'train.epochs': expected int"),
    ("train.epochs=0", "invalid config field 'train.epochs'"),
    ("data.augment=1", "invalid config field 'data.augment': expected bool"),
    ("model.image_size=[96]", "invalid config field 'model.image_size': expected 2 values"),
    ("model.image_size=[90, 32]", "invalid config field 'model.image_size'"),
    ("train.precision=fp8", "invalid config field 'train.precision'"),
    ("method=clip", "invalid config field 'method'"),
    ("optim=3", "invalid config field 'optim': expected a mapping"),
])
def test_bad_fields_are_named(override, message):
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS[0], [override])
    assert message in str(err.value)


def test_bad_command_line_and_missing_file():
    with pytest.raises(ValueError, match="cannot read argument"):
        parse_overrides(["optim.lr"])
    with pytest.raises(FileNotFoundError):
        load_config("no/such/file.yaml")
