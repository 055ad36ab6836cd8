"""Configs from YAML experiments, presets and dotted overrides; configs back to YAML.

    cfg = load_config("launch/configs/irra_synth.yaml", ["optim.lr=3e-4", "train.epochs=2"])
    cfg = load_config(None, ["method=rde", "recipe.image_tokens.kind=attention"])

An experiment YAML mirrors the dataclasses of trainer/common/config.py (`method:`, `model:`,
`data:`, `recipe:`, `loss:`, `optim:`, `train:`, `eval:`, `ema:`). `method: irra|rde|...` is a
preset of the recipe's parts (trainer/recipe/presets/), and what `recipe:` sets goes on top. An
override is `section.field=value` (or `--section.field value` on the command line; a list
element is `recipe.losses[0].weight=2`); the value is read as YAML and converted to the field's
type. An unknown field, a bad value or a combination of parts that cannot work raises
ValueError naming the fields.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
import types
import typing
from pathlib import Path

import yaml

from tbps.trainer.common.config import PRESET_DIR, Config, presets

log = logging.getLogger(__name__)

DEFAULT_METHOD = "irra"
# fields of configs written before recipes were composed from parts, and where they went
MOVED = {"loss.sdm": "a term of kind sdm in recipe.losses", "loss.id": "a term of kind id in "
         "recipe.losses", "loss.mlm": "a term of kind mlm in recipe.losses",
         "loss.mlm_prob": "recipe.caption_mask.ratio",
         "loss.margin": "the margin of a tal term in recipe.losses, and recipe.weighting.margin",
         "rde": "recipe.tse, recipe.weighting and recipe.losses (method: rde is the preset)"}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A Config from a YAML file (or the defaults) and dotted overrides.

    Order: the file; its `method` (or an override of it) picks the preset, which goes under the
    file's `recipe:`; then the overrides. A file written before recipes were made of parts (old
    `loss.sdm` ... and `rde:` fields) is read as the recipe it meant."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        pairs.append((key.strip().lstrip("-"), yaml.safe_load(value)))
    for key, value in pairs:
        if key == "method":
            tree["method"] = value
    tree = with_preset(upgrade_legacy(tree))
    for key, value in pairs:
        if key != "method":
            _set_dotted(tree, key, value)
    return from_dict(Config, tree)


def with_preset(tree: dict) -> dict:
    """The tree with its method's preset under its `recipe:` section."""
    tree = dict(tree)
    method = tree.setdefault("method", DEFAULT_METHOD)
    if method is None:
        return tree
    if method not in presets():
        raise ValueError(f"invalid config field 'method': {method!r} is not a preset; one of "
                         f"{presets()} or null")
    preset = yaml.safe_load((PRESET_DIR / f"{method}.yaml").read_text()) or {}
    tree["recipe"] = _merge(preset.get("recipe", {}), tree.get("recipe") or {})
    return tree


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def upgrade_legacy(tree: dict) -> dict:
    """A config tree of the old form (`method: irra|rde` with weights in `loss:` and an `rde:`
    section) as the recipe parts it meant; other trees are returned as they are."""
    loss = tree.get("loss") or {}
    old_loss = {k: loss[k] for k in ("sdm", "id", "mlm", "mlm_prob", "margin") if k in loss}
    if "rde" not in tree and not old_loss:
        return tree
    tree = copy.deepcopy(tree)
    tree["loss"] = {k: v for k, v in loss.items() if k not in old_loss}
    rde = tree.pop("rde", None) or {}
    margin = old_loss.get("margin", 0.1)
    method = tree.get("method", DEFAULT_METHOD)
    if method == "rde":
        recipe = {
            "branches": ["bge", "tse"],
            "losses": [{"kind": "tal", "branches": ["bge", "tse"], "reduction": "sum",
                        "margin": margin}],
            "tse": {"ratio": rde.get("select_ratio", 0.3), "dim": rde.get("tse_dim", 1024),
                    "authors_bn_eval": rde.get("authors_bn_eval", False)},
            "weighting": {"kind": "consensus" if rde.get("ccd", True) else "none",
                          "warmup_epochs": rde.get("ccd_warmup_epochs", 0), "margin": margin,
                          "gmm_max_iter": rde.get("gmm_max_iter", 10),
                          "gmm_tol": rde.get("gmm_tol", 1e-2),
                          "gmm_reg_covar": rde.get("gmm_reg_covar", 5e-4),
                          "threshold": rde.get("clean_threshold", 0.5),
                          "plots": rde.get("ccd_plots", True)}}
    else:
        terms = [{"kind": k, "weight": old_loss.get(k, 1.0)} for k in ("sdm", "id", "mlm")
                 if old_loss.get(k, 1.0) > 0]
        recipe = {"branches": ["bge"], "losses": terms,
                  "caption_mask": {"kind": "random", "ratio": old_loss.get("mlm_prob", 0.15)}}
    tree["recipe"] = _merge(tree.get("recipe") or {}, recipe)
    log.info("read a config written before recipes were composed from parts: method %s as %s",
             method, recipe)
    return tree


def parse_overrides(args: list[str]) -> list[str]:
    """['--optim.lr', '1e-4', 'train.epochs=3', '--x.y=1'] -> ['optim.lr=1e-4', ...]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if "=" in a:
            out.append(a.lstrip("-"))
            i += 1
        elif a.startswith("--") and i + 1 < len(args):
            out.append(f"{a[2:]}={args[i + 1]}")
            i += 2
        else:
            raise ValueError(f"cannot read argument {a!r}: use --section.field value")
    return out


def _set_dotted(tree: dict, key: str, value) -> None:
    """tree[a][b][c] = value for "a.b.c"; a list element is "losses.0" or "losses[0]"."""
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key) if p]
    node = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ValueError(f"override {key!r}: {p!r} is not an index of a list of "
                                 f"{len(node)}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ValueError(f"override {key!r}: {parts[i - 1]!r} is not a section")


def from_dict(cls, data: dict, prefix: str = ""):
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"invalid config field '{where}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            moved = MOVED.get(f"{prefix}{key}")
            if moved:
                raise ValueError(f"config field '{prefix}{key}' is no longer read: it is now "
                                 f"{moved} (README: Recipes from parts)")
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config field '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ValueError(f"invalid config field '{where}': {', '.join(required)} must be given")
    return cls(**kwargs)


def _coerce(tp, value, name: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"invalid config field '{name}': expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"invalid config field '{name}': expected {len(args)} values, "
                             f"got {value!r}")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value))
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        if tp is str and not isinstance(value, str):
            raise TypeError
        if tp in (int, float) and isinstance(value, bool):
            raise TypeError
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid config field '{name}': expected {tp.__name__}, "
                         f"got {value!r}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
