"""The synthetic person population: its config, attribute vocabulary and identities.

An identity is a combination of attributes (gender, skin tone, hair length and colour, hat, upper
garment and colour, lower garment and colour, shoe colour, bag and colour; 11 colour names), unique
across train, val and test, so every caption has one right answer. Ids run 1..N: train ids first,
then val, then test, as in CUHK-PEDES. Each identity's random numbers come from (seed, 0, id).

SynthConfig's fields are the knobs. Difficulty: num_test_ids (the gallery; chance Rank-1 is
1 / num_test_ids), drop_attribute_prob, occlusion_prob, colour_jitter, noise_std, brightness,
pose_jitter, clutter (on the default sizes, a prototype, a small CLIP trained from scratch on 2
CPU cores, reached Rank-1 54 in 6 epochs and did not saturate). Population: caption_style, background,
attribute_profile, figure_zoom and disjoint_from shift a second population for pretraining from
the benchmark, as web photos are from pedestrian-camera crops (`pretrain_config()`, CLI
`synth --population pretrain`); at their defaults they leave the benchmark's output
byte-identical (they are written to synth_meta.json only when set).

disjoint_from: two identities are equal when their attribute tuples (`Identity.attributes()`)
are, as they then look and read alike whatever their ids; the excluded tuples are recomputed
from that config, so the exclusion holds for every identity of every split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tbps.data_pipeline.synth_captions import STYLES
from tbps.data_pipeline.synth_captions import pick as _pick

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

