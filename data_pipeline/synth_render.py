"""Drawing one image of a synthetic person with PIL: scene, figure, occluder, flip, noise.

Image k of an identity draws its pose, position, scale, body width, background, clutter,
occlusion, flip, brightness, colours and noise from its own generator (seed, 1, id, k), so an
image is the same whichever process draws it and in whatever order.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from tbps.data_pipeline.synth_captions import pick as _pick
from tbps.data_pipeline.synth_population import (
    COLOURS,
    HAIR_COLOURS,
    SKIN_TONES,
    Identity,
    SynthConfig,
)

# Design canvas: figures are laid out in units of a 96 x 32 image and drawn at scale.
_DESIGN_H, _DESIGN_W = 96, 32


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

