"""Pictures a person checks: what AMNS's AWM drops and what AGA's AGM masks and TEM rewrites.

    tbps pictures runs/amns-synth/best --out runs/amns-synth/pictures
    tbps pictures runs/aga-synth/final --split val --n 8 --out DIR [--shards DIR]

For the first N training pairs (the loader's order at epoch 0, no augmentation) it writes:
- awm.png: each image, its patch score map (the cosine of each projected patch token with the
  paired caption's embedding, or the CLS attention row when the recipe's AWM scores so), and the
  image with the patches one AWM draw drops at the recipe's ratio greyed out, under the caption;
- agm.png: each caption as a strip of words coloured by the probability that AGM masks the word
  (k = ceil(ratio n) draws without replacement from the layer-aggregated EOS attention; the
  share of 2,000 keyed draws), and below it the caption TEM makes from one draw: the masked words
  replaced by the MLM head's argmax, changed words marked;
- pictures.json: the same numbers.
A weights folder holds the online model only, so it stands in for the momentum model that
scored and enriched in training (at the end of training the two are close: the momentum rises
to 1). TEM needs an MLM head (an mlm term); without one agm.png shows the masking alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tbps.data_pipeline.loader import EvalLoader, LoaderConfig, TrainLoader
from tbps.data_pipeline.transforms import normalize_images
from tbps.trainer.model.encoder import word_positions
from tbps.trainer.model.weights import load_weights_folder
from tbps.trainer.recipe.caption_masking import enrich, mask_captions
from tbps.trainer.recipe.token_selection import awm_weights, drop_patches, patch_scores

log = logging.getLogger(__name__)
DRAWS = 2000


@torch.no_grad()
def awm_view(model, batch: dict, ratio: float, score: str, seed: int = 0) -> dict:
    """Per pair: the patch scores (grid), the AWM drop weights, and the kept patches of one draw
    (the model standing in for the momentum model)."""
    enc = model.encoder
    img = enc.encode_image(batch["image"], rows="last")
    txt = enc.encode_text(batch["input_ids"], rows="none")
    scores = patch_scores(score, img, txt.embeds_BE)
    weights = awm_weights(scores)
    keep = drop_patches(weights, math.floor(ratio * scores.shape[1]), seed, batch["index"])
    return {"scores": scores, "weights": weights, "keep": keep, "grid": enc.grid_hw,
            "patch": enc.patch_size}


@torch.no_grad()
def agm_view(model, tokenizer, batch: dict, ratio: float, beta: float, seed: int = 0) -> dict:
    """Per caption: each word's AGM mask probability (share of DRAWS keyed draws), and one
    draw's masked positions with TEM's argmax replacements (when the model has an MLM head)."""
    txt = model.encoder.encode_text(batch["input_ids"], rows="all")
    ids, eos = txt.input_ids_BL, txt.eos_B
    B, L = ids.shape
    agm = SimpleNamespace(kind="attention", ratio=ratio, beta=beta)
    opts = dict(generator=None, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                special_ids=tuple(tokenizer.special_ids))
    rep = lambda t: t.repeat_interleave(DRAWS, dim=0)           # noqa: E731
    many = SimpleNamespace(input_ids_BL=rep(ids), eos_B=rep(eos), attn_rows_BlL=rep(txt.attn_rows_BlL))
    index = torch.arange(B * DRAWS, device=ids.device)
    _, labels = mask_captions(agm, many, keys=(seed, index), **opts)
    prob = (labels != -100).float().view(B, DRAWS, L).mean(1)
    one = (seed + 1, index[::DRAWS])
    masked, labels1 = mask_captions(agm, txt, keys=one, **opts)
    enriched = None
    if model.mlm_head is not None:
        img = model.encoder.encode_image(batch["image"], rows="none")
        enriched, _ = enrich(model, SimpleNamespace(kind="argmax", prob=1.0), ids, masked, labels1,
                             img.tokens_BTE, one, opts["special_ids"])
    return {"ids": ids, "eos": eos, "words": word_positions(ids, eos), "prob": prob,
            "chosen": labels1 != -100, "enriched": enriched}


def _words(tokenizer, ids) -> list[str]:
    return tokenizer.hf.convert_ids_to_tokens([int(i) for i in ids])


def draw_awm(batch, view, captions: list[str], path: Path) -> None:
    import matplotlib  # plots only: kept off start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')

    B = batch["image"].shape[0]
    gh, gw = view["grid"]
    p = view["patch"]
    fig, axes = plt.subplots(1, 3 * B, figsize=(1.6 * 3 * B, 4.2))
    for b in range(B):
        image = batch["image"][b].cpu().numpy()
        grey = image.copy()
        kept = set(view["keep"][b].tolist())
        for j in range(gh * gw):
            if j not in kept:
                r, c = divmod(j, gw)
                patch = grey[r * p:(r + 1) * p, c * p:(c + 1) * p]
                grey[r * p:(r + 1) * p, c * p:(c + 1) * p] = (0.25 * patch + 0.75 * 128).astype(
                    np.uint8)
        score = view["scores"][b].float().view(gh, gw).cpu().numpy()
        panels = [(image, "image"), (score, "score"), (grey, f"kept {len(kept)}/{gh * gw}")]
        for k, (data, title) in enumerate(panels):
            ax = axes[3 * b + k]
            ax.imshow(data, cmap="viridis" if k == 1 else None, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        axes[3 * b + 1].text(0.5, -0.08, _wrap(captions[b], 28), transform=axes[3 * b + 1].transAxes,
                             ha="center", va="top", fontsize=5.5)
    fig.suptitle("AWM: patch scores and the patches one draw drops (grey)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_agm(tokenizer, view, path: Path) -> list[dict]:
    import matplotlib  # plots only: kept off start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')

    rows, lines = [], []
    cmap = matplotlib.colormaps["Reds"]
    for b in range(view["ids"].shape[0]):
        pos = [j for j in range(view["ids"].shape[1]) if view["words"][b, j]]
        words = _words(tokenizer, view["ids"][b, pos])
        probs = view["prob"][b, pos].tolist()
        new = (_words(tokenizer, view["enriched"][b, pos]) if view["enriched"] is not None
               else None)
        chosen = view["chosen"][b, pos].tolist()
        rows.append({"words": words, "mask_probability": [round(q, 4) for q in probs],
                     "masked_in_one_draw": chosen, "tem": new})
        lines.append((words, probs, chosen, new))
    fig = plt.figure(figsize=(12, 1.1 * len(lines) + 0.8))
    renderer = fig.canvas.get_renderer()
    width_px = fig.get_figwidth() * fig.dpi
    y = 1.0 - 0.5 / fig.get_figheight()
    step = 0.33 / fig.get_figheight()
    top = max(probs_max for probs_max in (max(r[1], default=0) for r in lines)) or 1.0
    for words, probs, chosen, new in lines:
        x = 0.01
        for k, w in enumerate(words):
            t = fig.text(x, y, w, fontsize=8, va="center", ha="left",
                         bbox=dict(boxstyle="square,pad=0.15", lw=0,
                                   fc=cmap(0.08 + 0.8 * probs[k] / top)))
            advance = t.get_window_extent(renderer).width / width_px + 0.006
            if new is not None and chosen[k]:
                changed = new[k] != w
                fig.text(x, y - step, new[k], fontsize=8, va="center", ha="left",
                         color="tab:blue" if changed else "grey",
                         fontweight="bold" if changed else "normal")
            x += advance
            if x > 0.93 and k + 1 < len(words):             # wrap a long caption
                x, y = 0.01, y - 2 * step
        y -= 3 * step
    fig.text(0.01, 1.0 - 0.18 / fig.get_figheight(),
             f"AGM: each word's mask probability (darker red: more likely; max {top:.2f}); "
             "below, TEM's word at one draw's masked positions (blue: changed)", fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return rows


def _wrap(text: str, width: int) -> str:

    return "\n".join(textwrap.wrap(text, width))


def first_pairs(cfg, tokenizer, split: str, n: int) -> dict:

    lc = LoaderConfig(batch_size=n, image_size=tuple(cfg.model.image_size), num_workers=0,
                      augment=None)
    if split == "train":
        return next(iter(TrainLoader(cfg.data.shards, tokenizer, lc).epoch(0)))
    images = next(iter(EvalLoader(cfg.data.shards, tokenizer, lc, split=split, modality="image")))
    texts = next(iter(EvalLoader(cfg.data.shards, tokenizer, lc, split=split, modality="text")))
    return {**images, "input_ids": texts["input_ids"][: images["image"].shape[0]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps pictures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weights folder (best/ or final/)")
    p.add_argument("--out", required=True, help="folder for awm.png, agm.png, pictures.json")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=6, help="pairs to show (default 6)")
    p.add_argument("--shards", help="shard folder (default: the one the run trained on)")
    p.add_argument("--score", choices=("text", "cls"),
                   help="AWM's patch score (default: the recipe's recipe.image_tokens.score)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.n < 1:
            raise ValueError("--n must be at least 1")
        overrides = [f"data.shards={args.shards}"] if args.shards else []
        cfg, tokenizer, model = load_weights_folder(Path(args.weights), overrides)
        raw = first_pairs(cfg, tokenizer, args.split, args.n)
    except (FileNotFoundError, ValueError, StopIteration) as exc:
        print(f"error: {exc or 'the split has no samples'}", file=sys.stderr)
        return 2
    model.eval()
    batch = {**raw, "image": normalize_images(raw["image"])}
    rc = cfg.recipe
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captions = [tokenizer.hf.decode([int(i) for i in ids if i != tokenizer.pad_id],
                                    skip_special_tokens=True) for ids in raw["input_ids"]]
    score = args.score or rc.image_tokens.score
    awm = awm_view(model, batch, rc.image_tokens.ratio, score)
    draw_awm(raw, awm, captions, out / "awm.png")
    agm = agm_view(model, tokenizer, batch, rc.caption_mask.ratio, rc.caption_mask.beta)
    rows = draw_agm(tokenizer, agm, out / "agm.png")
    info = {"weights": str(args.weights), "split": args.split,
            "awm": {"ratio": rc.image_tokens.ratio, "score": score,
                    "kept": awm["keep"].tolist(), "scores": awm["scores"].tolist()},
            "agm": {"ratio": rc.caption_mask.ratio, "beta": rc.caption_mask.beta,
                    "captions": rows}}
    (out / "pictures.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out / 'awm.png'}, {out / 'agm.png'}, {out / 'pictures.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
