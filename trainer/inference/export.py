"""Export the trained encoders and tokenizer as a transformers CLIP folder (safetensors).

    tbps export runs/irra-synth/best runs/irra-synth/hf

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

Beside the weights it writes README.md, the model card: what the model is, the recipe and its
parts, the data it was trained on, the test metrics (from the evaluation.json of
`tbps evaluate` in the weights folder, or the run's metrics.json above it), and how
to load and query it.
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
import yaml
from transformers import CLIPModel
from transformers.utils import logging as hf_logging

from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.transforms import prepare_batch
from tbps.trainer.common import dist, errors
from tbps.trainer.inference.embedder import loader_batch
from tbps.trainer.inference.evaluate import EVALUATION_FILE
from tbps.trainer.inference.model_calls import embed_batch, similarity
from tbps.trainer.model.weights import load_weights_folder

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
    (out_dir / "README.md").write_text(model_card(Path(weights_dir), cfg, tokenizer, model, info,
                                                  find_metrics(Path(weights_dir))))
    if not exact:
        log.warning("the %dx%d patch grid has no exact square form: the exported position "
                    "embedding is approximate", *encoder.grid_hw)
    return info


def find_metrics(weights_dir: Path) -> dict | None:
    """{"split", "metrics": {similarity: {R1, ...}}, "source"} of the weights, or None: the
    folder's own evaluation.json (`tbps evaluate`; metrics.json where an older version wrote
    it), else the run's metrics.json (`best`/`final`)."""
    own = next((weights_dir / n for n in (EVALUATION_FILE, "metrics.json")
                if (weights_dir / n).is_file()), weights_dir / EVALUATION_FILE)
    run = weights_dir.parent / "metrics.json"
    try:
        if own.is_file():
            data = json.loads(own.read_text())
            return {"split": data["split"], "metrics": data["metrics"], "source": own.name}
        if run.is_file():
            data = json.loads(run.read_text())
            if weights_dir.name in data:
                return {"split": data.get("split", "test"), "metrics": data[weights_dir.name],
                        "source": f"../{run.name} ({weights_dir.name})"}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("metrics.json beside %s is unreadable (%s): the model card has no metrics",
                    weights_dir, exc)
    return None


def _branches(cfg, tokenizer, model) -> tuple[list[str], list[str]]:
    """Branch names and similarity names of the trained model, from one dummy pass."""
    ids = tokenizer.encode_batch(["a person"])
    image = torch.zeros(1, *cfg.model.image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        img = embed_batch(model, prepare_batch(loader_batch(ids, image), "cpu"), "image")
        txt = embed_batch(model, prepare_batch(loader_batch(ids), "cpu"), "text")
        sims = similarity(model, txt, img)
    return sorted(img), list(sims)


def _config_yaml(weights_dir: Path, sections: tuple[str, ...]) -> str:
    try:
        raw = yaml.safe_load((weights_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    keep = {k: v for k, v in raw.items() if k in sections}
    return yaml.safe_dump(keep, sort_keys=False).strip()


def _data_lines(cfg) -> list[str]:
    lines = [f"- shards: `{Path(cfg.data.shards).name}` (as `data.shards` named them)"]
    try:
        meta = read_meta(cfg.data.shards)
    except (OSError, ValueError):
        return lines + ["- (the shard manifest was not readable at export time)"]
    opts = meta.get("options", {})
    lines.append(f"- dataset format: {meta.get('format', '?')}; training identities: "
                 f"{meta.get('num_classes', '?')}")
    for split, info in sorted(meta.get("splits", {}).items()):
        lines.append(f"- {split}: {info.get('num_samples', '?')} image-caption pairs")
    if opts.get("noise_rate"):
        index = meta.get("noise_index") or {}
        source = (f"from the noise index file {Path(index['file']).name}" if index.get("file")
                  else f"noise seed {opts.get('noise_seed')}")
        lines.append(f"- noisy correspondence: {opts['noise_rate']:.1%} of the training captions "
                     f"swapped ({source})")
    if opts.get("resize"):
        lines.append(f"- images resized at shard time to {opts['resize']}")
    return lines


def model_card(weights_dir: Path, cfg, tokenizer, model, info: dict, metrics: dict | None) -> str:
    """The README.md of an export."""
    clip = model.encoder.clip.config
    v, t = clip.vision_config, clip.text_config
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    branches, sims = _branches(cfg, tokenizer, model)
    parts = [f"`{name}` ({sum(p.numel() for p in m.parameters()):,} parameters)"
             for name, m in model.named_children() if name != "encoder"]
    h, w = info["image_size"]
    method = getattr(cfg, "method", None)
    lines = [
        "# Text-to-image person retrieval: a CLIP dual encoder", "",
        "Given a sentence describing a person (\"a woman in a red coat carrying a black "
        "backpack\"), the model ranks a gallery of person images by the cosine similarity of "
        "their embeddings. Trained with tbps-trainer and exported in the transformers CLIP "
        "format (safetensors).", "",
        "## Model", "",
        f"- image encoder: ViT, {v.num_hidden_layers} layers of width {v.hidden_size}, patch "
        f"{v.patch_size}, trained on {h} x {w} images (height x width)",
        f"- text encoder: transformer, {t.num_hidden_layers} layers of width {t.hidden_size}, "
        f"{info['context_length']} tokens, vocabulary of {tokenizer.vocab_size}",
        f"- joint embedding: {clip.projection_dim} dimensions; {n_enc:,} parameters in the two "
        "encoders",
        f"- position grid: {'exact' if info['exact_position_grid'] else 'approximate'} (see "
        "`tbps_export.json`)", "",
        "## Recipe", "",
        f"- method: {method or 'as config.yaml composes it'}",
        f"- branches the recipe embeds with: {', '.join(branches)}; similarities it reports: "
        f"{', '.join(sims)} (the first chose the checkpoint)",
        f"- training-only parts, not in this export: {', '.join(parts) or 'none'}",
        "- this export holds the two encoders, i.e. the global branch (`bge`): its similarity is "
        "the dot product of the normalised image and text embeddings", ""]
    recipe_yaml = _config_yaml(weights_dir, ("method", "recipe", "loss", "rde", "ema"))
    if recipe_yaml:
        lines += ["The recipe's settings (from the run's `config.yaml`):", "", "```yaml",
                  recipe_yaml, "```", ""]
    lines += ["## Training data", "", *_data_lines(cfg),
              f"- {cfg.train.epochs} epochs, global batch {cfg.data.batch_size}, seed "
              f"{cfg.train.seed}, precision {cfg.train.precision}", "",
              "## Test metrics", ""]
    if metrics:
        cols = list(next(iter(metrics["metrics"].values())))
        lines += [f"On the {metrics['split']} split (percent; from `{metrics['source']}`; every "
                  "caption a query over every image):", "",
                  "| similarity | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + " |"
                  for name, m in metrics["metrics"].items()]
        lines.append("")
        if len(metrics["metrics"]) > 1:
            lines += ["Only the global branch's row (BGE, or t2i) applies to this export; the "
                      "others need the trained model's own weights folder.", ""]
    else:
        lines += ["No metrics were found beside the weights: run `tbps evaluate "
                  "WEIGHTS --split test` and export again.", ""]
    lines += ["## How to use", "", "With transformers alone:", "", "```python",
              "import torch", "from transformers import AutoTokenizer, CLIPModel", "",
              'model = CLIPModel.from_pretrained("THIS_FOLDER").eval()',
              'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")',
              f"# images: float B x 3 x {h} x {w}, RGB in [0, 1], normalised with image_mean and "
              "image_std of tbps_export.json",
              "img = model.get_image_features(pixel_values=images, interpolate_pos_encoding=True)",
              f"# captions: [SOT] tokens [EOT] then padding, {info['context_length']} ids "
              f"(sot {info['sot_id']}, eot {info['eot_id']}, pad {info['pad_id']})",
              "txt = model.get_text_features(input_ids=ids)",
              "# (transformers 5 returns an output object: take .pooler_output)",
              "scores = torch.nn.functional.normalize(txt, dim=-1) @ "
              "torch.nn.functional.normalize(img, dim=-1).T", "```", "",
              "With tbps-trainer, index a folder of images and query it:", "", "```bash",
              "tbps search index THIS_FOLDER photos/ --out photos.idx",
              'tbps search query photos.idx "a woman in a red coat" --top-k 10',
              "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weights folder of a run (best/ or final/)")
    p.add_argument("out", help="folder to write the transformers model into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    dist.quiet_third_party()

    def run() -> int:
        errors.check_output(args.out, {"weights folder": args.weights},
                            own_marker="tbps_export.json", flag="out")
        hf_logging.disable_progress_bar()
        print(json.dumps(export_hf(Path(args.weights), Path(args.out))))
        return 0

    return errors.guard(run, on_stop="the export may be incomplete; run it again")


if __name__ == "__main__":
    sys.exit(main())
