"""A synthetic person-retrieval dataset, written in the CUHK-PEDES file format.

The real datasets cannot be downloaded here, so this module draws pedestrians with PIL and writes
them in CUHK-PEDES's layout; synthetic data then takes the same path as real data (reader,
sharding, noise injection, loader):

    OUT/reid_raw.json                 [{"split", "captions", "file_path", "processed_tokens", "id"}]
    OUT/imgs/synth/00001/00001_0.jpg  one JPEG per image (quality 95, RGB, 96 x 32 by default)
    OUT/synth_meta.json               the config and each identity's attributes (beyond the format)

An identity is a combination of attributes (gender, skin tone, hair length and colour, hat, upper
garment and colour, lower garment and colour, shoe colour, bag and colour; 11 colour names), unique
across train, val and test, so every caption has one right answer. Ids run 1..N: train ids first,
then val, then test, as in CUHK-PEDES. Each image of an identity varies pose, position, scale, body
width, background, clutter, occlusion, flip, brightness, colours and noise; each image gets captions
from five templates with synonyms and clause reordering. Every identity's and image's random
numbers come from (seed, id, image number), so the output is byte-identical for a seed whatever
the number of worker processes.

Commands (the default is 1300 ids x 4 images at 96 x 32, a few seconds on 2 cores):

    tbps synth --out data/synth --seed 0     # the CLI calls generate()

From Python (a tiny run, well under a second):

    from tbps.data_pipeline.synthetic import SynthConfig, generate, preview
    cfg = SynthConfig(seed=0, num_train_ids=20, num_val_ids=4, num_test_ids=4)
    generate("data/synth-tiny", cfg, workers=2)
    preview("data/synth-tiny", "data/synth-tiny.png")   # contact sheet to look at

Difficulty knobs (fields of SynthConfig). A prototype of this design, a small CLIP trained from
scratch on 2 CPU cores, reached Rank-1 54 in 6 epochs on the default sizes and did not saturate.
- num_test_ids: the size of the gallery (chance Rank-1 is 1 / num_test_ids).
- drop_attribute_prob: share of captions that leave one attribute out, so they match several ids.
- occlusion_prob: share of images with a block hiding part of the figure.
- colour_jitter: per-image shift of each colour (+-, 0-255 units); large values blur colour names.
- noise_std, brightness: image-level Gaussian noise and brightness change.
- pose_jitter: scales all geometric variation (position, scale, width, leg and arm spread); 0 draws
  every image of an identity in the same pose.
- clutter: the most background rectangles per image.

Population knobs: a second population for pretraining, shifted from the benchmark as web photos
are from pedestrian-camera crops (`pretrain_config()`, CLI `synth --population pretrain`):
- caption_style: "pedestrian" (the benchmark's five templates) or "web" (four others, other
  synonyms; tbps.data_pipeline.synth_captions).
- background: "street" (random colour, floor band, clutter) or "studio" (a light gradient
  backdrop and a floor shadow, no clutter).
- attribute_profile: "pedestrian" (uniform colours and upper garments, the benchmark's rates of
  bags, hair and lower garments) or "web" (black, white and blue first; t-shirts, skirts and
  handbags more often).
- figure_zoom: a per-image range of figure scale (web photos frame people closer or farther; a
  close one loses its feet at the bottom edge); pose_jitter and hat_prob above.
- disjoint_from: the config of a population whose identities this one must not repeat. Two
  synthetic identities are equal when their attribute tuples (`Identity.attributes()`) are: they
  then look and read alike whatever their ids. The excluded tuples are recomputed from that config
  (the benchmark's own draw), so the exclusion holds for every identity of every split.
The new knobs at their defaults leave the benchmark's output byte-identical (they are written to
synth_meta.json only when set). `vocabulary()` lists every token either caption style can write,
and `train_shared_tokenizer()` builds one word-level tokenizer on it, so a model pretrained on one
population reads the other's captions (`shard --tokenizer synthetic-vocab` puts it beside shards).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tbps.data_pipeline.synth_captions import STYLES, make_captions, style_words, tokenize
from tbps.data_pipeline.synth_captions import pick as _pick
from tbps.data_pipeline.workers import init_worker, stop_pool

ANNOTATION_FILE = "reid_raw.json"
META_FILE = "synth_meta.json"
IMAGE_SUBDIR = "synth"  # file_path prefix, under OUT/imgs/

# The tokenizer check embeds this sentence: its words must be in the vocabulary.
PROBE_CAPTION = "a woman in a red coat carrying a black backpack"

COLOURS = {
    "black": (28, 28, 30), "white": (236, 236, 236), "grey": (128, 128, 128),
    "red": (206, 32, 36), "orange": (245, 132, 22), "yellow": (240, 214, 42),
    "green": (40, 150, 56), "blue": (36, 72, 206), "purple": (126, 46, 166),
    "pink": (245, 146, 192), "brown": (120, 72, 36),
}
HAIR_COLOURS = {"black": (22, 20, 20), "brown": (98, 58, 28), "blond": (232, 202, 92),
                "grey": (168, 168, 162)}
SKIN_TONES = {"light": (240, 206, 176), "tan": (204, 150, 106), "dark": (112, 70, 44)}
UPPER_TYPES = ("tshirt", "shirt", "jacket", "coat")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAG_TYPES = ("backpack", "handbag")

# Attribute frequencies per profile; None: uniform (the "pedestrian" draw, kept as it was).
ATTRIBUTE_PROFILES = {
    "pedestrian": {"colours": None, "upper": None,
                   "bag_woman": (0.35, 0.35, 0.3), "bag_man": (0.45, 0.4, 0.15),
                   "hair_woman": (0.3, 0.7), "hair_man": (0.85, 0.15),
                   "hair_colour": (0.35, 0.3, 0.2, 0.15),
                   "lower_woman": (0.5, 0.2, 0.3), "lower_man": (0.7, 0.3, 0.0)},
    "web": {"colours": (0.2, 0.16, 0.1, 0.07, 0.04, 0.04, 0.06, 0.14, 0.04, 0.08, 0.07),
            "upper": (0.4, 0.25, 0.2, 0.15),
            "bag_woman": (0.2, 0.3, 0.5), "bag_man": (0.5, 0.45, 0.05),
            "hair_woman": (0.25, 0.75), "hair_man": (0.8, 0.2),
            "hair_colour": (0.3, 0.35, 0.25, 0.1),
            "lower_woman": (0.35, 0.25, 0.4), "lower_man": (0.6, 0.4, 0.0)},
}
BACKGROUNDS = ("street", "studio")
PRETRAIN_SEED = 101

# Design canvas: figures are laid out in units of a 96 x 32 image and drawn at scale.
_DESIGN_H, _DESIGN_W = 96, 32


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What to generate and how hard it is; see the module docstring for the difficulty knobs."""

    seed: int = 0
    """Master seed; every identity and image derives its own generator from (seed, id, image)."""
    num_train_ids: int = 1000
    """Identities in the train split (ids 1..num_train_ids)."""
    num_val_ids: int = 100
    """Identities in the val split (the ids after train). May be 0."""
    num_test_ids: int = 200
    """Identities in the test split (the last ids): the retrieval gallery."""
    images_per_id: int = 4
    """Images drawn per identity."""
    captions_per_image: int = 2
    """Captions per image; CUHK-PEDES has 2. Each comes from a different template (up to 5)."""
    height: int = 96
    """Image height in pixels. Figures are drawn at scale, not upscaled."""
    width: int = 32
    """Image width in pixels."""
    hat_prob: float = 0.2
    """Share of identities wearing a hat."""
    occlusion_prob: float = 0.2
    """Share of images with a block (from below or one side) hiding part of the figure."""
    drop_attribute_prob: float = 0.35
    """Share of captions that leave out one of the identity's attributes."""
    colour_jitter: float = 25.0
    """Largest per-image, per-channel shift of each drawn colour, in 0-255 units."""
    noise_std: float = 6.0
    """Standard deviation of the Gaussian pixel noise, in 0-255 units."""
    brightness: float = 0.25
    """Largest relative brightness change per image (0.25: factor in [0.75, 1.25])."""
    pose_jitter: float = 1.0
    """Scales the geometric variation between images: position, scale, width, leg and arm spread."""
    clutter: int = 3
    """Most background clutter rectangles per image (0 to clutter, uniform)."""
    flip_prob: float = 0.5
    """Share of images mirrored left-right."""
    jpeg_quality: int = 95
    """JPEG quality of the written images."""
    caption_style: str = "pedestrian"
    """Caption templates and synonyms: "pedestrian" (the benchmark) or "web"."""
    background: str = "street"
    """Scene behind the figure: "street" (the benchmark) or "studio"."""
    attribute_profile: str = "pedestrian"
    """Attribute frequencies: "pedestrian" (the benchmark) or "web" (ATTRIBUTE_PROFILES)."""
    figure_zoom: tuple[float, float] = (1.0, 1.0)
    """Range of an extra per-image scale of the figure; (1, 1): the benchmark's framing."""
    disjoint_from: SynthConfig | None = None
    """A population (its config) whose identities this one never repeats; None: no exclusion."""

    def __post_init__(self):
        ints = {
            "seed": (0, 2**63 - 1), "num_train_ids": (1, 99_999), "num_val_ids": (0, 99_999),
            "num_test_ids": (1, 99_999), "images_per_id": (1, 1000), "captions_per_image": (1, 20),
            "height": (48, 4096), "width": (16, 4096), "clutter": (0, 100),
            "jpeg_quality": (1, 100),
        }
        numbers = {
            "hat_prob": (0.0, 1.0), "occlusion_prob": (0.0, 1.0), "drop_attribute_prob": (0.0, 1.0),
            "flip_prob": (0.0, 1.0), "colour_jitter": (0.0, 128.0), "noise_std": (0.0, 128.0),
            "brightness": (0.0, 0.9), "pose_jitter": (0.0, 2.0),
        }
        for name, (lo, hi) in {**ints, **numbers}.items():
            value = getattr(self, name)
            kinds, what = (int, "an integer") if name in ints else ((int, float), "a number")
            if not isinstance(value, kinds) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(
                    f"SynthConfig.{name} must be {what} in [{lo}, {hi}], got {value!r}")
        if self.num_ids > 99_999:  # file paths hold the id in 5 digits
            raise ValueError("SynthConfig.num_train_ids + num_val_ids + num_test_ids must be at "
                             f"most 99999, got {self.num_ids}")
        choices = {"caption_style": tuple(STYLES), "background": BACKGROUNDS,
                   "attribute_profile": tuple(ATTRIBUTE_PROFILES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SynthConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        zoom = self.figure_zoom
        if (not isinstance(zoom, tuple) or len(zoom) != 2
                or not all(isinstance(z, (int, float)) for z in zoom)
                or not 0.5 <= zoom[0] <= zoom[1] <= 2.0):
            raise ValueError("SynthConfig.figure_zoom must be a tuple (low, high) with "
                             f"0.5 <= low <= high <= 2, got {zoom!r}")
        if self.disjoint_from is not None and not isinstance(self.disjoint_from, SynthConfig):
            raise ValueError("SynthConfig.disjoint_from must be a SynthConfig or None, "
                             f"got {type(self.disjoint_from).__name__}")

    def to_json(self) -> dict:
        """The fields as JSON; population knobs left at their defaults are omitted (so the
        benchmark's synth_meta.json reads as it did before they existed)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _POPULATION_KNOBS and value == f.default:
                continue
            out[f.name] = value.to_json() if isinstance(value, SynthConfig) else \
                list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: dict) -> SynthConfig:
        """Inverse of to_json (e.g. the config in a dataset's synth_meta.json)."""
        data = dict(data)
        if data.get("disjoint_from") is not None:
            data["disjoint_from"] = cls.from_json(data["disjoint_from"])
        if "figure_zoom" in data:
            data["figure_zoom"] = tuple(data["figure_zoom"])
        return cls(**data)

    @property
    def num_ids(self) -> int:
        return self.num_train_ids + self.num_val_ids + self.num_test_ids

    def split_of(self, pid: int) -> str:
        if pid <= self.num_train_ids:
            return "train"
        return "val" if pid <= self.num_train_ids + self.num_val_ids else "test"


_POPULATION_KNOBS = ("caption_style", "background", "attribute_profile", "figure_zoom",
                     "disjoint_from")


def pretrain_config(*, disjoint_from: SynthConfig | None = None, **changes) -> SynthConfig:
    """A pretraining population: web captions, studio backgrounds, web attribute frequencies,
    closer and farther framing, more varied poses, its own seed, and no identity of
    `disjoint_from` (default: the default benchmark, `SynthConfig()`). `changes` override."""
    preset = dict(seed=PRETRAIN_SEED, caption_style="web", background="studio",
                  attribute_profile="web", figure_zoom=(0.85, 1.3), pose_jitter=1.6,
                  hat_prob=0.35, occlusion_prob=0.05, drop_attribute_prob=0.5,
                  disjoint_from=disjoint_from if disjoint_from is not None else SynthConfig())
    return SynthConfig(**{**preset, **changes})


@dataclass(frozen=True)
class Identity:
    """One person: the attributes every image and caption of the id shows. None means absent."""

    id: int
    split: str
    gender: str  # "man" | "woman"
    skin: str  # key of SKIN_TONES
    hair_length: str  # "short" | "long"
    hair_colour: str  # key of HAIR_COLOURS
    hat_colour: str | None
    upper: str  # one of UPPER_TYPES
    upper_colour: str
    lower: str  # one of LOWER_TYPES
    lower_colour: str
    shoes_colour: str
    bag: str | None  # one of BAG_TYPES
    bag_colour: str | None

    def attributes(self) -> tuple:
        """Everything that identifies the person (not id or split); unique across the dataset."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self)[2:])


def _draw_attributes(rng: np.random.Generator, config: SynthConfig) -> dict:
    f = ATTRIBUTE_PROFILES[config.attribute_profile]
    gender = _pick(rng, ("man", "woman"))
    sex = "woman" if gender == "woman" else "man"
    colours, pc = list(COLOURS), f["colours"]
    bag = _pick(rng, (None, *BAG_TYPES), p=f[f"bag_{sex}"])
    return {
        "gender": gender,
        "skin": _pick(rng, SKIN_TONES),
        "hair_length": _pick(rng, ("short", "long"), p=f[f"hair_{sex}"]),
        "hair_colour": _pick(rng, HAIR_COLOURS, p=f["hair_colour"]),
        "hat_colour": _pick(rng, colours, pc) if rng.random() < config.hat_prob else None,
        "upper": _pick(rng, UPPER_TYPES, p=f["upper"]),
        "upper_colour": _pick(rng, colours, pc),
        "lower": _pick(rng, LOWER_TYPES, p=f[f"lower_{sex}"]),
        "lower_colour": _pick(rng, colours, pc),
        "shoes_colour": _pick(rng, colours, pc),
        "bag": bag,
        "bag_colour": _pick(rng, colours, pc) if bag else None,
    }


def sample_identities(config: SynthConfig) -> list[Identity]:
    """All identities, ids 1..N in order, with attribute combinations unique across the splits
    and absent from the population `config.disjoint_from` (if any).

    Sequential on purpose: whether an id's first draw collides depends on the ids before it. An id
    redraws from its own generator until unique, so the result depends on the config alone.
    """
    seen: set[tuple] = set()
    if config.disjoint_from is not None:
        seen = {i.attributes() for i in sample_identities(config.disjoint_from)}
    identities = []
    for pid in range(1, config.num_ids + 1):
        rng = np.random.default_rng([config.seed, 0, pid])
        for _ in range(10_000):
            ident = Identity(id=pid, split=config.split_of(pid), **_draw_attributes(rng, config))
            if ident.attributes() not in seen:
                break
        else:
            raise ValueError(f"no new attribute combination for id {pid} in 10000 draws: the "
                             "population is too large for its attribute frequencies")
        seen.add(ident.attributes())
        identities.append(ident)
    return identities


# ---------------------------------------------------------------------------------------------
# Drawing


class _Pen:
    """ImageDraw in design units (one unit = one pixel of a 96 x 32 image) at a pixel scale."""

    def __init__(self, image: Image.Image, scale: float):
        self.draw = ImageDraw.Draw(image)
        self.s = scale

    def _box(self, x0, y0, x1, y1):
        s = self.s
        px0, py0 = round(x0 * s), round(y0 * s)
        return px0, py0, max(px0, round(x1 * s) - 1), max(py0, round(y1 * s) - 1)

    def rect(self, x0, y0, x1, y1, fill):
        self.draw.rectangle(self._box(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0, y0, x1, y1, fill):
        self.draw.ellipse(self._box(x0, y0, x1, y1), fill=fill)

    def poly(self, points, fill):
        self.draw.polygon([(x * self.s, y * self.s) for x, y in points], fill=fill)

    def line(self, points, fill, width):
        self.draw.line([(x * self.s, y * self.s) for x, y in points], fill=fill,
                       width=max(1, round(width * self.s)))


def _shade(rgb, factor):
    return tuple(int(min(255, max(0, c * factor))) for c in rgb)


def _lerp(a, b, t):
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _limb(top_l, top_r, bot_l, bot_r, t0, t1):
    """The part of a limb quad between fractions t0 and t1 of its length (sleeves, shorts)."""
    return [_lerp(top_l, bot_l, t0), _lerp(top_r, bot_r, t0),
            _lerp(top_r, bot_r, t1), _lerp(top_l, bot_l, t1)]


def _draw_figure(pen: _Pen, ident: Identity, col: dict, pose: dict):
    """The pedestrian, front view, back to front. col: jittered colours; pose: this image's pose."""
    cx, top, H, wf = pose["cx"], pose["top"], pose["height"], pose["width"]

    def y(t):  # a fraction of the figure's height -> y
        return top + t * H

    woman = ident.gender == "woman"
    sw = (0.105 if woman else 0.125) * H * wf  # half shoulder width
    hw = (0.095 if woman else 0.088) * H * wf  # half hip width
    leg_w, arm_w = 0.92 * hw, 0.052 * H * wf
    head_w, head_h = 0.10 * H, 0.125 * H
    shoulder, waist, ankle = y(0.155), y(0.50), y(0.94)
    skin, upper, lower = col["skin"], col["upper"], col["lower"]

    if ident.bag == "backpack":  # the pack itself shows beside the body, on the side it is slung
        side = pose["bag_side"]
        x_in, x_out = cx + side * (sw - 0.03 * H), cx + side * (sw + 0.07 * H)
        pen.rect(min(x_in, x_out), y(0.18), max(x_in, x_out), y(0.46), col["bag"])

    legs = []
    for side in (-1, 1):
        hip_x = cx + side * hw / 2
        foot_x = hip_x + side * pose["leg"] * 0.07 * H
        legs.append(((hip_x - leg_w / 2, waist), (hip_x + leg_w / 2, waist),
                     (foot_x - leg_w / 2, ankle), (foot_x + leg_w / 2, ankle), foot_x))
    for tl, tr, bl, br, foot_x in legs:
        pen.poly([tl, tr, br, bl], lower if ident.lower == "trousers" else skin)
        if ident.lower == "shorts":
            pen.poly(_limb(tl, tr, bl, br, 0.0, 0.38), lower)
        pen.ellipse(foot_x - 0.65 * leg_w, y(0.925), foot_x + 0.65 * leg_w, y(1.0), col["shoes"])
    if ident.lower == "skirt":
        pen.poly([(cx - hw, waist - 0.01 * H), (cx + hw, waist - 0.01 * H),
                  (cx + 1.45 * hw, y(0.72)), (cx - 1.45 * hw, y(0.72))], lower)

    pen.rect(cx - 0.028 * H, y(0.11), cx + 0.028 * H, shoulder + 0.02 * H, skin)  # neck
    _draw_upper(pen, ident, col, cx, y, H, sw, hw)
    if ident.bag == "backpack":  # straps over the shoulders
        for side in (-1, 1):
            x = cx + side * sw * 0.55
            pen.line([(x, shoulder), (x, y(0.36))], col["bag"], 0.028 * H)

    sleeve = 0.3 if ident.upper == "tshirt" else 0.86
    hands = {}
    for side in (-1, 1):
        x_out = cx + side * sw
        x_in = x_out - side * arm_w
        hand_x = hands[side] = cx + side * (sw - arm_w / 2 + pose["arm"] * 0.08 * H)
        top_l, top_r = (x_out, shoulder), (x_in, shoulder + 0.01 * H)
        bot_l, bot_r = (hand_x + side * arm_w / 2, y(0.53)), (hand_x - side * arm_w / 2, y(0.53))
        pen.poly([top_l, top_r, bot_r, bot_l], skin)
        pen.poly(_limb(top_l, top_r, bot_l, bot_r, 0.0, sleeve), upper)
    _draw_head(pen, ident, col, pose, cx, y, H, head_w, head_h)

    if ident.bag == "handbag":  # hangs from the hand on its side, strap to the shoulder
        side = pose["bag_side"]
        bag_x = hands[side]
        strap = [(cx + side * sw * 0.6, shoulder), (bag_x, y(0.47))]
        pen.line(strap, _shade(col["bag"], 0.7), 0.014 * H)
        pen.rect(bag_x - 0.05 * H, y(0.46), bag_x + 0.05 * H, y(0.585), col["bag"])


def _draw_upper(pen: _Pen, ident: Identity, col: dict, cx, y, H, sw, hw):
    """Torso garment: the type shows as length, width and details (collar, zip, belt, neckline)."""
    upper, dark = col["upper"], _shade(col["upper"], 0.62)
    shoulder = y(0.155)
    bottom, hem = {"tshirt": (y(0.50), hw * 1.05), "shirt": (y(0.505), hw * 1.05),
                   "jacket": (y(0.525), hw * 1.18), "coat": (y(0.74), hw * 1.45)}[ident.upper]
    bulk = 1.08 if ident.upper in ("jacket", "coat") else 1.0
    pen.poly([(cx - sw * bulk, shoulder), (cx + sw * bulk, shoulder),
              (cx + hem, bottom), (cx - hem, bottom)], upper)
    if ident.upper == "tshirt":  # round neckline
        pen.ellipse(cx - 0.035 * H, shoulder - 0.02 * H, cx + 0.035 * H, shoulder + 0.025 * H,
                    col["skin"])
    elif ident.upper == "shirt":  # light collar and a button line
        light = _shade(upper, 1.35) if sum(upper) < 500 else _shade(upper, 0.8)
        for side in (-1, 1):
            pen.poly([(cx, shoulder + 0.05 * H), (cx + side * 0.065 * H, shoulder),
                      (cx + side * 0.015 * H, shoulder - 0.015 * H)], light)
        pen.line([(cx, shoulder + 0.04 * H), (cx, bottom)], dark, 0.012 * H)
    elif ident.upper == "jacket":  # zip, hem band, drawstrings
        pen.line([(cx, shoulder), (cx, bottom)], dark, 0.016 * H)
        pen.rect(cx - hem, bottom - 0.025 * H, cx + hem, bottom, dark)
        for side in (-1, 1):
            pen.line([(cx + side * 0.03 * H, shoulder), (cx + side * 0.03 * H, y(0.27))],
                     _shade(upper, 1.4) if sum(upper) < 450 else dark, 0.01 * H)
    else:  # coat: lapels, buttons, belt
        for side in (-1, 1):
            pen.poly([(cx, shoulder + 0.12 * H), (cx + side * 0.06 * H, shoulder),
                      (cx + side * 0.02 * H, shoulder)], dark)
        pen.line([(cx, shoulder + 0.12 * H), (cx, bottom)], dark, 0.012 * H)
        pen.rect(cx - hem * 0.85, y(0.47), cx + hem * 0.85, y(0.49), dark)


def _draw_head(pen: _Pen, ident: Identity, col: dict, pose: dict, cx, y, H, head_w, head_h):
    hair = col["hair"]
    x0, x1 = cx - head_w / 2, cx + head_w / 2
    if ident.hair_length == "long":  # falls past the shoulders on both sides of the face
        pen.rect(x0 - 0.02 * H, y(-0.005), x1 + 0.02 * H, y(0.09), hair)
        pen.rect(x0 - 0.025 * H, y(0.05), x0 + 0.012 * H, y(0.30), hair)
        pen.rect(x1 - 0.012 * H, y(0.05), x1 + 0.025 * H, y(0.30), hair)
    pen.ellipse(x0, y(0.0), x1, y(0.0) + head_h, col["skin"])
    if ident.hat_colour:  # cap with a brim to one side
        pen.rect(x0 - 0.008 * H, y(-0.02), x1 + 0.008 * H, y(0.045), col["hat"])
        bx = x1 if pose["brim_side"] > 0 else x0
        pen.rect(min(bx, bx + pose["brim_side"] * 0.055 * H), y(0.03),
                 max(bx, bx + pose["brim_side"] * 0.055 * H), y(0.055), col["hat"])
    else:
        pen.rect(x0 - 0.005 * H, y(-0.012), x1 + 0.005 * H, y(0.04), hair)
        pen.rect(x0 - 0.005 * H, y(0.0), x0 + 0.015 * H, y(0.075), hair)
        pen.rect(x1 - 0.015 * H, y(0.0), x1 + 0.005 * H, y(0.075), hair)


def _image_colours(ident: Identity, rng: np.random.Generator, jitter: float) -> dict:
    """This image's colours: every element's base colour shifted per channel by up to +-jitter."""
    base = {"skin": SKIN_TONES[ident.skin], "hair": HAIR_COLOURS[ident.hair_colour],
            "hat": COLOURS.get(ident.hat_colour, (0, 0, 0)), "upper": COLOURS[ident.upper_colour],
            "lower": COLOURS[ident.lower_colour], "shoes": COLOURS[ident.shoes_colour],
            "bag": COLOURS.get(ident.bag_colour, (0, 0, 0))}
    shifted = np.clip(np.array(list(base.values())) + rng.uniform(-jitter, jitter, (len(base), 3)),
                      0, 255)
    return {k: tuple(int(v) for v in rgb) for k, rgb in zip(base, shifted, strict=True)}


def _draw_scene(pen: _Pen, rng: np.random.Generator, w: float, h: float, clutter: int):
    """Background colour, an optional floor band and clutter rectangles (canvas w x h units)."""
    bg = rng.integers(30, 226, 3)
    pen.rect(0, 0, w, h, tuple(int(v) for v in bg))
    if rng.random() < 0.5:
        floor = np.clip(bg * rng.uniform(0.6, 0.9) + rng.integers(-30, 31, 3), 0, 255)
        pen.rect(0, h * rng.uniform(0.75, 0.92), w, h, tuple(int(v) for v in floor))
    for _ in range(int(rng.integers(0, clutter + 1))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(0, 1.0) * h
        pen.rect(x0, y0, x0 + rng.uniform(0.1, 0.5) * w, y0 + rng.uniform(0.03, 0.25) * h,
                 tuple(int(v) for v in rng.integers(0, 256, 3)))


def _draw_studio(pen: _Pen, rng: np.random.Generator, w: float, h: float):
    """A light backdrop, darker towards the floor, in bands (a product-photo look)."""
    top = rng.integers(175, 250, 3).astype(float)
    bottom = top * rng.uniform(0.72, 0.92)
    bands = 12
    for i in range(bands):
        c = top + (bottom - top) * i / (bands - 1)
        pen.rect(0, h * i / bands, w, h * (i + 1) / bands, tuple(int(v) for v in c))


def _draw_shadow(pen: _Pen, pose: dict):
    cx, feet, half = pose["cx"], pose["top"] + pose["height"], 0.17 * pose["height"]
    pen.ellipse(cx - half, feet - 0.03 * pose["height"], cx + half, feet + 0.02 * pose["height"],
                (96, 96, 100))


def _draw_occluder(pen: _Pen, rng: np.random.Generator, w: float, h: float):
    """A block in front of the figure: from below (a bench, a car) or from one side (a pole)."""
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        x0 = rng.uniform(-0.2, 0.3) * w
        pen.rect(x0, rng.uniform(0.62, 0.85) * h, x0 + rng.uniform(0.6, 1.2) * w, h, fill)
    else:
        cover = rng.uniform(0.22, 0.42) * w
        x0 = 0.0 if rng.random() < 0.5 else w - cover
        pen.rect(x0, rng.uniform(0.0, 0.5) * h, x0 + cover, h, fill)


def render_image(ident: Identity, k: int, config: SynthConfig) -> Image.Image:
    """Image k of an identity: RGB, config.height x config.width, from rng (seed, 1, id, k)."""
    rng = np.random.default_rng([config.seed, 1, ident.id, k])
    scale = min(config.height / _DESIGN_H, config.width / _DESIGN_W)
    w, h = config.width / scale, config.height / scale  # canvas in design units
    j = config.pose_jitter
    image = Image.new("RGB", (config.width, config.height))
    pen = _Pen(image, scale)
    if config.background == "street":
        _draw_scene(pen, rng, w, h, config.clutter)
    else:
        _draw_studio(pen, rng, w, h)
    colours = _image_colours(ident, rng, config.colour_jitter)
    fig_h = 86.0 * (1.0 - 0.16 * j * rng.uniform())
    bottom = h - 1.5 - j * rng.uniform(0, 4)
    pose = {"height": fig_h, "top": bottom - fig_h, "cx": w / 2 + j * rng.uniform(-3.5, 3.5),
            "width": 1.0 + j * rng.uniform(-0.15, 0.15), "leg": j * rng.uniform(),
            "arm": j * rng.uniform(), "bag_side": _pick(rng, (-1, 1)),
            "brim_side": _pick(rng, (-1, 1))}
    if config.figure_zoom != (1.0, 1.0):   # the head stays in place; a close figure loses its feet
        pose["height"] = fig_h * rng.uniform(*config.figure_zoom)
    if config.background == "studio":
        _draw_shadow(pen, pose)
    _draw_figure(pen, ident, colours, pose)
    if rng.random() < config.occlusion_prob:
        _draw_occluder(pen, rng, w, h)
    if rng.random() < config.flip_prob:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * (1.0 + rng.uniform(-config.brightness, config.brightness))
    if config.noise_std > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(config.noise_std)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# One vocabulary for every population


def vocabulary(styles=tuple(STYLES)) -> list[str]:
    """Every token a caption in these styles can contain (words, "," and "."), sorted."""
    words = {w for name in styles for w in style_words(name)}
    return sorted(words | set(COLOURS) | set(HAIR_COLOURS))


def train_shared_tokenizer(out_dir: str | os.PathLike):
    """A word-level tokenizer over `vocabulary()` (every style), saved in out_dir: the same ids
    for every synthetic population. Judged by a few captions of each style."""
    from tbps.data_pipeline.tokenizer import train_word_level

    probe = []
    for name in STYLES:
        config = SynthConfig(num_train_ids=4, num_val_ids=0, num_test_ids=1, caption_style=name)
        probe += [c for ident in sample_identities(config) for c in make_captions(ident, 0, config)]
    return train_word_level(vocabulary(), out_dir, probe=probe)


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def file_path(pid: int, k: int) -> str:
    return f"{IMAGE_SUBDIR}/{pid:05d}/{pid:05d}_{k}.jpg"


def _render_chunk(out_dir: str, config: SynthConfig, identities: list[Identity]) -> list[dict]:
    """Write the images of some identities; return their annotation records (worker task)."""
    images = Path(out_dir) / "imgs"
    records = []
    for ident in identities:
        (images / IMAGE_SUBDIR / f"{ident.id:05d}").mkdir(parents=True, exist_ok=True)
        for k in range(config.images_per_id):
            path = file_path(ident.id, k)
            render_image(ident, k, config).save(images / path, "JPEG", quality=config.jpeg_quality)
            captions = make_captions(ident, k, config)
            records.append({"split": ident.split, "captions": captions, "file_path": path,
                            "processed_tokens": [tokenize(c) for c in captions], "id": ident.id})
    return records


def _write_json_list(path: Path, items: list) -> None:
    """A JSON list, one item per line: readable, diffable and byte-stable; written atomically."""
    text = "[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a folder")
    existing = [p for p in (out / ANNOTATION_FILE, out / "imgs" / IMAGE_SUBDIR) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({', '.join(str(p) for p in existing)}); choose "
            "another output folder or pass overwrite=True (CLI: --overwrite) to replace it")
    if (out / ANNOTATION_FILE).exists() and not (out / META_FILE).exists():
        raise FileExistsError(
            f"{out / ANNOTATION_FILE} was not written by this generator (no {META_FILE} beside "
            "it), so it is not replaced, even with --overwrite; choose another output folder")
    for p in (out / ANNOTATION_FILE, out / META_FILE):
        p.unlink(missing_ok=True)  # first, so a failed run leaves no annotation file behind
    shutil.rmtree(out / "imgs" / IMAGE_SUBDIR, ignore_errors=True)
    (out / "imgs" / IMAGE_SUBDIR).mkdir(parents=True)


def _render_all(out: Path, config: SynthConfig, identities: list[Identity], workers: int,
                progress: bool, console) -> list[dict]:
    """Render in chunks of identities, in a pool when workers > 1; records come back in id order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    size = max(1, min(50, len(identities) // (8 * workers)))
    chunks = [identities[i:i + size] for i in range(0, len(identities), size)]
    task = _Task(str(out), config)
    # The pool starts before the progress bar's refresh thread: forking beside a thread can
    # deadlock. Fork (where there is one) needs no importable __main__, unlike spawn.
    methods = multiprocessing.get_all_start_methods()
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(workers, initializer=init_worker, initargs=(os.getpid(),))
    columns = (TextColumn("synthetic ids"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    records = []
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            bar_task = bar.add_task("ids", total=len(identities))
            results = pool.imap(task, chunks) if pool else map(task, chunks)  # imap keeps order
            for chunk, chunk_records in zip(chunks, results, strict=True):
                records.extend(chunk_records)
                bar.advance(bar_task, len(chunk))
    except BaseException:
        if pool:
            stop_pool(pool)
        raise
    if pool:
        pool.close()
        pool.join()
    return records


class _Task:
    """_render_chunk with its fixed arguments bound; picklable for Pool.imap."""

    def __init__(self, out_dir: str, config: SynthConfig):
        self.out_dir, self.config = out_dir, config

    def __call__(self, identities: list[Identity]) -> list[dict]:
        return _render_chunk(self.out_dir, self.config, identities)


def generate(out_dir: str | os.PathLike, config: SynthConfig, *, workers: int = 1,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Write the dataset to out_dir; return a summary (counts per split, vocabulary size, seconds).

    The output depends on the config alone, not on workers. Images are written as they are drawn,
    reid_raw.json last, so its presence means the folder is complete. An out_dir that already holds
    a dataset raises FileExistsError unless overwrite=True. progress: print the config, a progress
    bar and the summary (to stderr).
    """
    from rich.console import Console

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    console = Console(stderr=True)
    if progress:
        console.print(f"synthetic: {config} -> {out} ({workers} worker(s))")
    identities = sample_identities(config)
    records = _render_all(out, config, identities, workers, progress, console)
    meta = [{"generator": "data_pipeline.synthetic", "config": config.to_json()}]
    _write_json_list(out / META_FILE, meta + [dataclasses.asdict(i) for i in identities])
    _write_json_list(out / ANNOTATION_FILE, records)
    summary = _summarize(records, out, time.perf_counter() - start)
    if progress:
        console.print(f"synthetic: {summary}")
    return summary


def _summarize(records: list[dict], out: Path, seconds: float) -> dict:
    ids = {s: set() for s in ("train", "val", "test")}
    images = dict.fromkeys(ids, 0)
    captions = dict.fromkeys(ids, 0)
    vocab, longest = set(), 0
    for r in records:
        ids[r["split"]].add(r["id"])
        images[r["split"]] += 1
        captions[r["split"]] += len(r["captions"])
        for tokens in r["processed_tokens"]:
            vocab.update(tokens)
            longest = max(longest, len(tokens))
    return {"out_dir": str(out), "ids": {s: len(v) for s, v in ids.items()}, "images": images,
            "captions": captions, "vocab_size": len(vocab), "max_caption_tokens": longest,
            "seconds": round(seconds, 3)}


def preview(dataset_dir: str | os.PathLike, path: str | os.PathLike, n_ids: int = 6,
            per_id: int = 4) -> Path:
    """Write a PNG contact sheet: one row per identity (spread over all ids), its images side by
    side, upscaled with nearest neighbour, and the first caption beside them. Returns the path."""
    root = Path(dataset_dir)
    by_id: dict[int, list[dict]] = {}
    for record in json.loads((root / ANNOTATION_FILE).read_text(encoding="utf-8")):
        by_id.setdefault(record["id"], []).append(record)
    ids = sorted(by_id)
    spread = np.linspace(0, len(ids) - 1, min(n_ids, len(ids))).round().astype(int)
    rows = sorted({ids[i] for i in spread})
    w, h = Image.open(root / "imgs" / by_id[ids[0]][0]["file_path"]).size
    zoom = max(1, 288 // h)
    tile_w, tile_h, gap, text_w = w * zoom, h * zoom, 4, 300
    sheet_size = (per_id * (tile_w + gap) + text_w, len(rows) * (tile_h + gap))
    sheet = Image.new("RGB", sheet_size, "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    for row, pid in enumerate(rows):
        y = row * (tile_h + gap)
        for col, record in enumerate(by_id[pid][:per_id]):
            with Image.open(root / "imgs" / record["file_path"]) as img:
                tile = img.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST)
            sheet.paste(tile, (col * (tile_w + gap), y))
        first = by_id[pid][0]
        text = f"id {pid} ({first['split']})\n" + "\n".join(textwrap.wrap(first["captions"][0], 38))
        draw.multiline_text((per_id * (tile_w + gap) + 6, y + 6), text, fill="black", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
