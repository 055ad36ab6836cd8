"""Captions of the synthetic persons, in two styles, and the words each style can write.

- "pedestrian", the benchmark's (CUHK-PEDES-like): five templates ("a woman in a red coat ...",
  "the woman is wearing ...", "this lady has ...", ...), with synonyms and clause reordering.
- "web", a pretraining population's (alt-text and photo-caption-like): four other templates
  ("photo of a young woman wearing ...", "street style, ... on a woman ...", tag lists, "full body
  shot of a man walking, dressed in ..."), other synonyms for people, garments, shoes, hats, bags
  and skin, and "gray" / "violet" beside "grey" / "purple".

Both styles name the same attributes with the same colour names, so a model that learned one
reads the other once both share a vocabulary: `style_words()` lists every word and punctuation
token a style's templates and synonyms can write (`synth_vocab.vocabulary()` adds the colour names).

    from tbps.data_pipeline.synth_captions import make_captions
    make_captions(identity, k, config)     # config.caption_style picks the style
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


def pick(rng: np.random.Generator, options, p=None):
    """One of options, uniform or with weights p, from one uniform draw (rng.choice is 20x slower;
    the draws are most of the serial time in sample_identities)."""
    options = list(options)
    u = rng.random()
    if p is None:
        return options[min(int(u * len(options)), len(options) - 1)]
    for option, weight in zip(options, p, strict=True):
        if u < weight:
            return option
        u -= weight
    return options[-1]


@dataclass(frozen=True)
class CaptionStyle:
    """The words and templates of one caption style."""

    nouns: dict[str, tuple[str, ...]]
    upper: dict[str, tuple[str, ...]]
    lower: dict[str, tuple[str, ...]]
    shoes: tuple[str, ...]
    hats: tuple[str, ...]
    bags: dict[str, tuple[str, ...]]
    skin: dict[str, tuple[str, ...]]
    colours: dict[str, tuple[str, ...]]
    """Other names of some colours ({}: every colour by its own name, and no draw for it)."""
    templates: tuple
    fixed_words: str
    """Every other word the templates write (checked against sampled captions by the tests)."""


PRONOUNS = {"man": ("he", "his"), "woman": ("she", "her")}
_HAIR_LENGTH = ("long", "long", "shoulder length")
_WEARABLES = ("upper", "lower", "shoes", "hat")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _bare(phrase: str) -> str:
    return phrase.removeprefix("a ").removeprefix("an ")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _colour(name: str, rng: np.random.Generator, style: CaptionStyle) -> str:
    return pick(rng, style.colours[name]) if name in style.colours else name


def _phrases(ident, rng: np.random.Generator, drop_prob: float, style: CaptionStyle
             ) -> dict[str, str]:
    """Noun phrase per attribute the identity has; with probability drop_prob one is left out."""
    length = "short"
    if ident.hair_length == "long":
        length = pick(rng, _HAIR_LENGTH)
    hair_colour = _colour(ident.hair_colour, rng, style)
    hair = [length, hair_colour] if rng.random() < 0.8 else [hair_colour, length]
    lower = f"{_colour(ident.lower_colour, rng, style)} {pick(rng, style.lower[ident.lower])}"
    p = {
        "hair": " ".join(hair) + " hair",
        "skin": f"{pick(rng, style.skin[ident.skin])} skin",
        "upper": _a(f"{_colour(ident.upper_colour, rng, style)} "
                    f"{pick(rng, style.upper[ident.upper])}"),
        "lower": _a(lower) if ident.lower == "skirt" else lower,
        "shoes": f"{_colour(ident.shoes_colour, rng, style)} {pick(rng, style.shoes)}",
    }
    if ident.hat_colour:
        p["hat"] = _a(f"{_colour(ident.hat_colour, rng, style)} {pick(rng, style.hats)}")
    if ident.bag:
        p["bag"] = _a(f"{_colour(ident.bag_colour, rng, style)} "
                      f"{pick(rng, style.bags[ident.bag])}")
    if rng.random() < drop_prob:
        del p[pick(rng, p)]
    return p


def _wear_and_features(p: dict, rng: np.random.Generator) -> tuple[list[str], str]:
    """Garments in a shuffled order (the upper one first more often) and 'hair and skin' text."""
    wear = [k for k in _WEARABLES if k in p]
    rng.shuffle(wear)
    if "upper" in wear and rng.random() < 0.5:
        wear.remove("upper")
        wear.insert(0, "upper")
    feats = [p[k] for k in ("hair", "skin") if k in p]
    return [p[k] for k in wear], " and ".join(feats)


# -- the pedestrian style ------------------------------------------------------------------------


def _t_in(s: dict, p: dict, rng) -> str:
    # a woman in a red coat and black trousers, with long brown hair, carrying a black backpack.
    wear, feats = _wear_and_features(p, rng)
    extras = [f"with {feats}"] if feats else []
    if "bag" in p:
        extras.append(f"{pick(rng, ('carrying', 'holding', 'with'))} {p['bag']}")
    rng.shuffle(extras)
    return ", ".join([f"a {s['noun']} in {_join(wear)}"] + extras) + "."


def _t_sentences(s: dict, p: dict, rng) -> str:
    # the woman is wearing a red coat and black trousers. she has long brown hair. she carries ...
    wear, feats = _wear_and_features(p, rng)
    verb = pick(rng, ("is wearing", "wears", "is dressed in"))
    rest = [f"{s['he']} has {feats}"] if feats else []
    if "bag" in p:
        rest.append(f"{s['he']} {pick(rng, ('is carrying', 'carries', 'has'))} {p['bag']}")
    rng.shuffle(rest)
    first = f"{pick(rng, ('the', 'this'))} {s['noun']} {verb} {_join(wear)}"
    return ". ".join([first] + rest) + "."


def _t_with(s: dict, p: dict, rng) -> str:
    # a woman with long brown hair wears a red coat and black trousers and carries a black backpack.
    wear, feats = _wear_and_features(p, rng)
    verb = pick(rng, ("wears", "is wearing", "is dressed in"))
    carry = f"{pick(rng, ('carrying', 'holding'))} {p['bag']}" if "bag" in p else ""
    if carry and (not feats or rng.random() < 0.5):  # the bag in the subject, the looks at the end
        text = f"a {s['noun']} {carry} {verb} {_join(wear)}"
        return text + (f". {s['he']} has {feats}." if feats else ".")
    text = f"a {s['noun']}" + (f" with {feats}" if feats else "") + f" {verb} {_join(wear)}"
    return text + (f" and is {carry}." if carry else ".")


def _t_has(s: dict, p: dict, rng) -> str:
    # this lady has long brown hair. her shoes are white. she wears a red coat. a black backpack
    # is on her back.
    wear_keys = [k for k in _WEARABLES if k in p]
    rest = []
    if "shoes" in p and rng.random() < 0.5:
        rest.append(f"{s['his']} {pick(rng, s['style'].shoes)} are {s['shoes_colour']}")
        wear_keys.remove("shoes")
    if wear_keys:
        rng.shuffle(wear_keys)
        rest.append(f"{s['he']} {pick(rng, ('wears', 'is wearing', 'has on'))} "
                    f"{_join([p[k] for k in wear_keys])}")
    if "bag" in p:
        where = "is on {his} back" if s["bag"] == "backpack" else "hangs from {his} shoulder"
        rest.append(pick(rng, (f"{p['bag']} {where.format(his=s['his'])}",
                               f"{s['he']} {pick(rng, ('carries', 'holds'))} {p['bag']}")))
    rng.shuffle(rest)
    feats = _wear_and_features(p, rng)[1]
    first = f"this {s['noun']} has {feats}" if feats else f"this is a {s['noun']}"
    return ". ".join([first] + rest) + "."


def _t_fragment(s: dict, p: dict, rng) -> str:
    # woman wearing a red coat, black trousers and white shoes, carrying a black backpack.
    wear, feats = _wear_and_features(p, rng)
    extras = [f"with {feats}"] if feats else []
    if "bag" in p:
        extras.append(f"{pick(rng, ('carrying', 'with'))} {p['bag']}")
    rng.shuffle(extras)
    return ", ".join([f"{s['noun']} {pick(rng, ('wearing', 'in'))} {_join(wear)}"] + extras) + "."


# -- the web style -------------------------------------------------------------------------------


def _w_photo(s: dict, p: dict, rng) -> str:
    # photo of a young woman wearing a red trench coat and black jeans, carrying a black tote bag.
    wear, feats = _wear_and_features(p, rng)
    extras = [f"with {feats}"] if feats else []
    if "bag" in p:
        extras.append(f"{pick(rng, ('carrying', 'holding'))} {p['bag']}")
    rng.shuffle(extras)
    head = (f"{pick(rng, ('photo of', 'a photo of', 'picture of', 'image of'))} "
            f"{_a(s['noun'])} {pick(rng, ('wearing', 'in'))} {_join(wear)}")
    return ", ".join([head] + extras) + "."


def _w_look(s: dict, p: dict, rng) -> str:
    # street style, a red trench coat, black jeans and white sneakers on a woman with long brown
    # hair, a black tote bag in hand.
    wear, feats = _wear_and_features(p, rng)
    text = (f"{pick(rng, ('street style', 'casual look', 'outfit idea', 'everyday look'))}, "
            f"{_join(wear)} on {_a(s['noun'])}")
    text += f" with {feats}" if feats else ""
    if "bag" in p:
        text += f", {p['bag']} {pick(rng, ('in hand', 'over the shoulder'))}"
    return text + "."


def _w_tags(s: dict, p: dict, rng) -> str:
    # woman, red trench coat, black jeans, white sneakers, long brown hair, black tote bag.
    tags = [_bare(v) for v in p.values()]
    rng.shuffle(tags)
    return ", ".join([s["noun"]] + tags) + "."


def _w_shot(s: dict, p: dict, rng) -> str:
    # full body shot of a man walking, dressed in a blue windbreaker and gray shorts. he has short
    # black hair. he holds a green knapsack.
    wear, feats = _wear_and_features(p, rng)
    rest = [f"{s['he']} has {feats}"] if feats else []
    if "bag" in p:
        rest.append(f"{s['he']} {pick(rng, ('carries', 'holds'))} {p['bag']}")
    rng.shuffle(rest)
    first = (f"{pick(rng, ('full body shot of', 'candid shot of', 'portrait of'))} "
             f"{_a(s['noun'])} {pick(rng, ('standing', 'walking', 'posing'))}, "
             f"{pick(rng, ('dressed in', 'wearing'))} {_join(wear)}")
    return ". ".join([first] + rest) + "."


STYLES = {
    "pedestrian": CaptionStyle(
        nouns={"man": ("man", "man", "guy", "gentleman"),
               "woman": ("woman", "woman", "lady", "girl")},
        upper={"tshirt": ("tee shirt", "tee", "short sleeved top"),
               "shirt": ("shirt", "long sleeved shirt", "button down shirt"),
               "jacket": ("jacket", "zip up jacket", "zipped jacket"),
               "coat": ("coat", "long coat", "overcoat")},
        lower={"trousers": ("trousers", "pants", "long pants"),
               "shorts": ("shorts", "short pants"),
               "skirt": ("skirt", "knee length skirt")},
        shoes=("shoes", "sneakers", "trainers"),
        hats=("hat", "cap", "baseball cap"),
        bags={"backpack": ("backpack", "backpack", "rucksack"),
              "handbag": ("handbag", "purse", "shoulder bag")},
        skin={"light": ("light", "fair", "pale"), "tan": ("tan", "olive"),
              "dark": ("dark", "brown")},
        colours={},
        templates=(_t_in, _t_sentences, _t_with, _t_has, _t_fragment),
        fixed_words="a an and in with carrying holding the this is wearing wears dressed has "
                    "carries are on back hangs from shoulder holds he she his her",
    ),
    "web": CaptionStyle(
        nouns={"man": ("man", "male", "young man", "adult man"),
               "woman": ("woman", "female", "young woman", "lady")},
        upper={"tshirt": ("t shirt", "tshirt", "short sleeve tee"),
               "shirt": ("dress shirt", "collared shirt", "long sleeve shirt"),
               "jacket": ("windbreaker", "bomber jacket", "light jacket"),
               "coat": ("trench coat", "winter coat", "overcoat")},
        lower={"trousers": ("jeans", "slacks", "pants"),
               "shorts": ("shorts", "bermuda shorts"),
               "skirt": ("midi skirt", "skirt")},
        shoes=("sneakers", "boots", "footwear"),
        hats=("beanie", "bucket hat", "cap"),
        bags={"backpack": ("backpack", "knapsack", "daypack"),
              "handbag": ("tote bag", "purse", "handbag")},
        skin={"light": ("fair", "light"), "tan": ("olive", "tan"), "dark": ("dark", "deep")},
        colours={"grey": ("grey", "gray"), "purple": ("purple", "violet")},
        templates=(_w_photo, _w_look, _w_tags, _w_shot),
        fixed_words="a an and of photo picture image wearing in with carrying holding street "
                    "style casual look outfit idea everyday on hand over the shoulder full body "
                    "shot candid portrait standing walking posing dressed has carries holds he she",
    ),
}


def make_captions(ident, k: int, config) -> list[str]:
    """config.captions_per_image captions of image k, each from a different template when it can,
    in config.caption_style.

    From rng (seed, 2, id, k), apart from the image's, so changing captions leaves images alone.
    """
    style = STYLES[config.caption_style]
    rng = np.random.default_rng([config.seed, 2, ident.id, k])
    n = config.captions_per_image
    templates = rng.choice(len(style.templates), size=n, replace=n > len(style.templates))
    captions = []
    he, his = PRONOUNS[ident.gender]
    for t in templates:
        # the subject, and what a template words other than as a noun phrase
        s = {"noun": pick(rng, style.nouns[ident.gender]), "he": he, "his": his,
             "bag": ident.bag, "shoes_colour": ident.shoes_colour, "style": style}
        p = _phrases(ident, rng, config.drop_attribute_prob, style)
        captions.append(style.templates[int(t)](s, p, rng))
    return captions


def style_words(style_name: str) -> set[str]:
    """Every token a style can write apart from colour names: words, "," and "."."""
    st = STYLES[style_name]
    phrases = [*st.shoes, *st.hats, *_HAIR_LENGTH, "short hair skin", *st.fixed_words.split()]
    for table in (st.nouns, st.upper, st.lower, st.bags, st.skin, st.colours):
        phrases += [w for options in table.values() for w in options]
    return {w for phrase in phrases for w in phrase.split()} | {",", "."}


def tokenize(caption: str) -> list[str]:
    """The processed_tokens of a caption: its lower-case words, punctuation dropped."""
    return re.findall(r"[a-z]+", caption.lower())
