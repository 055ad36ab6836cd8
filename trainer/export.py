"""Export the trained encoders and tokenizer as a transformers CLIP folder (safetensors).

    python -m trainer.export runs/irra-synth/best runs/irra-synth/hf

The folder loads with transformers alone:

    model = CLIPModel.from_pretrained("runs/irra-synth/hf")
    tok = AutoTokenizer.from_pretrained("runs/irra-synth/hf")
    img = model.get_image_features(pixel_values=x, interpolate_pos_encoding=True)  # x: B,3,H,W
    txt = model.get_text_features(input_ids=ids)   # ids: [SOT] caption [EOT] padding

and gives the same embeddings as the trained model (CLIP normalisation of the images,
`tbps_export.json` records the image size). transformers keeps a square position grid and
resamples it bicubically to the image's patch grid; the exported grid is S x S with S a common
multiple of the grid's sides such that every trained position lands on an exact source point of
that resampling (S / side odd: the bicubic weights are then exactly 0, 1, 0, 0), and the other
points are filled by bilinear interpolation. Where no such S exists the export says so and
reports the error of the approximate grid.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from trainer.build import load_weights_folder

log = logging.getLogger(__name__)


def square_grid(table_PD: torch.Tensor, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """(1 + gh*gw) x D table -> (1 + S*S) x D table, and whether the resampling is exact."""
    gh, gw = grid_hw
    side = gh * gw // math.gcd(gh, gw)
    exact = (side // gh) % 2 == 1 and (side // gw) % 2 == 1
    if not exact:
        side = max(gh, gw)
    cls, patches = table_PD[:1], table_PD[1:].reshape(gh, gw, -1)
    grid = patches.permute(2, 0, 1)[None].float()
    dense = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[0]
    if exact:
        rh, rw = side // gh, side // gw
        rows = torch.arange(gh) * rh + (rh - 1) // 2
        cols = torch.arange(gw) * rw + (rw - 1) // 2
        dense[:, rows[:, None], cols[None, :]] = grid[0]
    flat = dense.permute(1, 2, 0).reshape(side * side, -1).to(table_PD.dtype)
    return torch.cat([cls, flat]), exact


def export_hf(weights_dir: Path, out_dir: Path) -> dict:
    cfg, tokenizer, model = load_weights_folder(weights_dir)
    encoder = model.encoder
    clip = encoder.clip
    config = clip.config
    patch = config.vision_config.patch_size
    table, exact = square_grid(clip.vision_model.embeddings.position_embedding.weight.data,
                               encoder.grid_hw)
    side = int(round((table.shape[0] - 1) ** 0.5))
    config.vision_config.image_size = side * patch
    config.text_config.eos_token_id = tokenizer.eot_id
    hf = CLIPModel(config)
    state = {k: v for k, v in clip.state_dict().items()
             if k != "vision_model.embeddings.position_embedding.weight"}
    state["vision_model.embeddings.position_embedding.weight"] = table
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"export does not fit CLIPModel: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save(out_dir)
    info = {"image_size": list(cfg.model.image_size), "interpolate_pos_encoding": True,
            "exact_position_grid": exact, "context_length": tokenizer.context_length,
            "sot_id": tokenizer.sot_id, "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "method": cfg.method}
    (out_dir / "tbps_export.json").write_text(json.dumps(info, indent=1))
    if not exact:
        log.warning("the %dx%d patch grid has no exact square form: the exported position "
                    "embedding is approximate", *encoder.grid_hw)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weights folder of a run (best/ or final/)")
    p.add_argument("out", help="folder to write the transformers model into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        print(json.dumps(export_hf(Path(args.weights), Path(args.out))))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
