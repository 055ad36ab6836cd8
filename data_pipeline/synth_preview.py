"""A PNG contact sheet of a synthetic dataset: a few identities, their images and a caption."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tbps.data_pipeline.synth_writer import ANNOTATION_FILE


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
