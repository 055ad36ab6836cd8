"""Pictures of retrieval results: rows of framed, labelled images, and the CMC curve.

    draw_rows([(caption, [Tile(image, "1: id 3", GREEN), ...]), ...], "grid.png")
    draw_search_grid(gallery, index, queries, hits, "hits.png")   # `tbps search query --grid`
    plot_cmc({"t2i": curve}, "cmc.png", "CMC")
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tbps.trainer.inference.gallery import Item, load_images

GREEN, RED, GREY = (34, 139, 34), (214, 39, 40), (150, 150, 150)


@dataclass
class Tile:
    image: np.ndarray | None          # uint8 H x W x 3; None: unreadable (drawn as a grey box)
    label: str
    frame: tuple[int, int, int] = GREY
    apart: bool = False               # set apart from the tiles before it (a gap with "...")


def _font(size: int):
    try:
        from matplotlib import font_manager  # here: matplotlib stays off start-up

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def _box_size(tiles: list[Tile], height: int) -> tuple[int, int]:
    aspects = [t.image.shape[1] / t.image.shape[0] for t in tiles if t.image is not None]
    aspect = float(np.median(aspects)) if aspects else 0.5
    return height, int(round(height * min(max(aspect, 1 / 3), 1.5)))


def _fit(image: np.ndarray | None, box_hw: tuple[int, int]) -> Image.Image:
    """The image scaled into the box, centred on white; a grey box when there is none."""
    h, w = box_hw
    canvas = Image.new("RGB", (w, h), (255, 255, 255) if image is not None else (210, 210, 210))
    if image is not None:
        im = Image.fromarray(image)
        scale = min(w / im.width, h / im.height)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.BILINEAR)
        canvas.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
    return canvas


def draw_rows(rows: list[tuple[str, list[Tile]]], out: Path, *, title: str = "",
              height: int = 144, caption_px: int = 340) -> Path:
    """One row per query: its caption on the left, then its tiles, each framed and labelled."""
    border, gap, label_px, pad, apart = 5, 8, 20, 10, 28
    bh, bw = _box_size([t for _, tiles in rows for t in tiles], height)
    font, small, bold = _font(14), _font(12), _font(16)
    n = max((len(t) for _, t in rows), default=1)
    row_h = bh + 2 * border + label_px + gap
    top = 36 if title else pad
    width = caption_px + n * (bw + 2 * border + gap) + pad + apart + 40
    sheet = Image.new("RGB", (width, top + len(rows) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 8), title, fill=(0, 0, 0), font=bold)
    for r, (caption, tiles) in enumerate(rows):
        y = top + r * row_h
        lines = textwrap.wrap(caption, width=max(10, (caption_px - 2 * pad) // 8))
        draw.multiline_text((pad, y + 4), "\n".join(lines[:9]), fill=(0, 0, 0), font=font,
                            spacing=3)
        x = caption_px
        for tile in tiles:
            if tile.apart:
                draw.text((x + 2, y + bh // 2), "...", fill=(0, 0, 0), font=bold)
                x += apart
            draw.rectangle([x, y, x + bw + 2 * border - 1, y + bh + 2 * border - 1],
                           fill=tile.frame)
            sheet.paste(_fit(tile.image, (bh, bw)), (x + border, y + border))
            draw.text((x, y + bh + 2 * border + 3), tile.label, fill=(0, 0, 0), font=small)
            x += bw + 2 * border + gap
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def draw_search_grid(gallery: Path, index, queries: list[str], results, out: Path) -> Path:
    """Each query with its hits (rank, score), from the index's own gallery."""
    wanted = sorted({h.position for hits in results for h in hits})
    items = [Item(**{c: index.rows[c][p] for c in ("key", "path", "id", "source")})
             for p in wanted]
    images = dict(zip(wanted, load_images(gallery, items)))
    rows = [(q, [Tile(images[h.position], f"{h.rank}: {h.score:.3f}") for h in hits])
            for q, hits in zip(queries, results)]
    return draw_rows(rows, out)


def plot_cmc(cmc: dict[str, list[float]], out: Path, title: str) -> Path:
    import matplotlib  # here: matplotlib stays off start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ranks = np.arange(1, len(next(iter(cmc.values()))) + 1)
    for name, curve in cmc.items():
        ax.plot(ranks, curve, marker="o", markersize=2.5, linewidth=1.6,
                label=f"{name} (R1 {curve[0]:.1f}, R10 {curve[min(9, len(curve) - 1)]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("queries with a correct image within the rank (%)")
    ax.set_xlim(1, ranks[-1])
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
