from pathlib import Path

import pytest

from tbps.trainer.common.config import Config
from tbps.trainer.common.config_files import load_config, parse_overrides

STUDY_FILES = ("noise_study", "_ablations")      # study and method files, not training configs
CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "launch" / "configs").glob("*.yaml")
                 if not any(s in p.name for s in STUDY_FILES))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and (cfg.method is None or cfg.method in path.name)


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


# -- recipes from parts ---------------------------------------------------------------------------

def test_presets_are_recipes_and_parts_override_them():
    rde = load_config(None, ["method=rde"]).recipe
    assert rde.branches == ("bge", "tse") and [t.kind for t in rde.losses] == ["tal"]
    assert rde.losses[0].reduction == "sum" and rde.weighting.kind == "consensus"
    mixed = load_config(None, ["method=rde", "recipe.image_tokens.kind=random",
                               "recipe.losses[0].weight=0.5", "recipe.weighting.use=probability"])
    r = mixed.recipe
    assert r.image_tokens.kind == "random" and r.losses[0].weight == 0.5
    assert r.losses[0].branches == ("bge", "tse") and r.weighting.use == "probability"
    # the same list element by dotted index; a whole list replaces the preset's
    assert load_config(None, ["recipe.losses.1.weight=3"]).recipe.losses[1].weight == 3
    r = load_config(None, ["recipe.losses=[{kind: bsdm, lam: 0.5}, {kind: waf}]"]).recipe
    assert [(t.kind, t.param("lam")) for t in r.losses] == [("bsdm", 0.5), ("waf", None)]
    assert load_config(None, ["method=null"]).recipe.kinds() == {"sdm", "id", "mlm"}


@pytest.mark.parametrize("overrides, fields", [
    (["recipe.losses=[{kind: tal, branches: [tse]}]"], ["recipe.losses[0].branches", "tse",
                                                       "recipe.branches"]),
    (["recipe.losses=[{kind: sdm, margin: 0.2}]"], ["recipe.losses[0].margin", "sdm"]),
    (["recipe.losses=[{kind: focal}]"], ["recipe.losses[0].kind"]),
    (["recipe.losses=[{weight: 1}]"], ["recipe.losses[0]", "kind must be given"]),
    (["recipe.losses=[{kind: mlm, branches: [bge]}]"], ["recipe.losses[0].branches"]),
    (["method=rde", "recipe.losses=[{kind: id, branches: [tse]}]"], ["recipe.losses[0].branches"]),
    (["recipe.enrich.kind=argmax", "recipe.losses=[{kind: sdm}]"], ["recipe.enrich.kind", "mlm"]),
    (["recipe.caption_mask.kind=attention", "recipe.losses=[{kind: sdm}]"],
     ["recipe.caption_mask.kind"]),
    (["recipe.weighting.kind=consensus", "recipe.losses=[{kind: sdm, weighted: false}]"],
     ["recipe.weighting.kind"]),
    (["recipe.image_tokens.kind=attention", "ema.enabled=false"],
     ["ema.enabled", "recipe.image_tokens.kind=attention"]),
    (["recipe.losses=[{kind: itc}]", "ema.enabled=false"], ["ema.enabled", "recipe.losses[0]"]),
    (["recipe.branches=[tse]"], ["recipe.branches"]),
    (["recipe.cross.residual=true", "recipe.losses=[{kind: sdm}]"], ["recipe.cross.residual"]),
    (["recipe.cross.attention_init=identity", "recipe.losses=[{kind: sdm}]"],
     ["recipe.cross.attention_init"]),
    (["recipe.cross.attention_init=eye"], ["recipe.cross.attention_init"]),
    (["loss.mlm=0"], ["loss.mlm", "recipe.losses"]),
    (["rde.tse_dim=3"], ["'rde'", "recipe.tse"]),
    (["recipe.losses.5.weight=1"], ["recipe.losses.5.weight"]),
])
def test_impossible_combinations_name_their_fields(overrides, fields):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    for f in fields:
        assert f in str(err.value), str(err.value)


def test_itc_without_momentum_targets_needs_no_momentum_model():
    cfg = load_config(None, ["recipe.losses=[{kind: itc, alpha: 0}]", "ema.enabled=false"])
    assert not cfg.needs_momentum()
    assert load_config(None, ["recipe.losses=[{kind: itc}]"]).needs_momentum()


def test_a_saved_config_reloads_to_the_same_recipe(tmp_path):
    from tbps.trainer.common.config_files import save_config

    cfg = load_config(None, ["method=rde", "recipe.caption_mask.kind=attention",
                             "recipe.losses=[{kind: tal, branches: [bge, tse]}, {kind: mlm}]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_old_style_configs_are_read_as_the_recipe_they_meant(tmp_path):
    import yaml

    (tmp_path / "irra.yaml").write_text(yaml.safe_dump(
        {"method": "irra", "loss": {"sdm": 1.0, "id": 0.0, "mlm": 2.0, "mlm_prob": 0.2,
                                    "tau": 0.05}}))
    r = load_config(tmp_path / "irra.yaml").recipe
    assert [(t.kind, t.weight) for t in r.losses] == [("sdm", 1.0), ("mlm", 2.0)]
    assert r.caption_mask.ratio == 0.2
    (tmp_path / "rde.yaml").write_text(yaml.safe_dump(
        {"method": "rde", "loss": {"sdm": 0, "id": 0, "mlm": 0, "margin": 0.2},
         "rde": {"ccd": False, "tse_dim": 64, "ccd_warmup_epochs": 2}}))
    r = load_config(tmp_path / "rde.yaml").recipe
    assert r.weighting.kind == "none" and r.tse.dim == 64 and r.losses[0].margin == 0.2
    assert r.weighting.warmup_epochs == 2 and r.losses[0].reduction == "sum"


def test_the_similarity_kinds_are_the_kernels_kinds():
    """Which kind reads which parameter is said once (config.TERM_PARAMS); the kernels compute
    exactly the similarity kinds it lists."""
    from tbps.kernels.similarity_loss import KINDS
    from tbps.trainer.common.config import SIMILARITY_KINDS, TERM_KINDS, TERM_PARAMS

    assert set(KINDS) == set(SIMILARITY_KINDS) and set(TERM_PARAMS) == set(TERM_KINDS)
