"""The evaluation report a person reads, and the pictures of search results.

    tbps evaluate runs/irra-synth/best --split test --report runs/irra-synth/report

writes into the report folder:
  metrics.json     the metrics per similarity (as `tbps.trainer.inference.evaluate` prints them) and the CMC curves
  cmc.png          the CMC curve, rank 1 to 50, one line per similarity the recipe scores with
  retrieval.png    sampled queries (seeded) with their top 10: correct images framed green, wrong red
  worst.png        the queries whose first correct image ranks lowest, with that image at the end
  report.html      one page with all of it: the metrics table, the curve, both grids, and every
                   shown query's caption, person id and rank of its first correct image. No script,
                   no network: inline style and the PNGs beside it, by relative name.
Grids rank by the first similarity (the one checkpoints are chosen on), as the metrics do: the
gallery sorted by descending similarity, ties in gallery order.
"""
from __future__ import annotations

import html
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tbps.trainer.inference.metrics import retrieval_metrics
from tbps.trainer.running import dist

CMC_RANKS = 50
GREEN, RED, GREY = (34, 139, 34), (214, 39, 40), (150, 150, 150)


# -- pictures --------------------------------------------------------------------------------


@dataclass
class Tile:
    image: np.ndarray | None          # uint8 H x W x 3; None: unreadable (drawn as a grey box)
    label: str
    frame: tuple[int, int, int] = GREY
    apart: bool = False               # set apart from the tiles before it (a gap with "...")


def _font(size: int):
    try:
        from matplotlib import font_manager

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
    from tbps.trainer.inference.gallery import Item, load_images

    wanted = sorted({h.position for hits in results for h in hits})
    items = [Item(**{c: index.rows[c][p] for c in ("key", "path", "id", "source")})
             for p in wanted]
    images = dict(zip(wanted, load_images(gallery, items)))
    rows = [(q, [Tile(images[h.position], f"{h.rank}: {h.score:.3f}") for h in hits])
            for q, hits in zip(queries, results)]
    return draw_rows(rows, out)


def plot_cmc(cmc: dict[str, list[float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# -- numbers ---------------------------------------------------------------------------------


def ranked(sim_QG: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, chunk: int = 1024
           ) -> torch.Tensor:
    """Rank (1-based) of each query's first correct gallery item, ranked as the metrics do."""
    out = []
    for q0 in range(0, sim_QG.shape[0], chunk):
        order = torch.argsort(sim_QG[q0:q0 + chunk].float(), dim=1, descending=True, stable=True)
        match = g_pids.to(order.device)[order] == q_pids[q0:q0 + chunk, None].to(order.device)
        out.append(torch.argmax(match.int(), dim=1) + 1)
    return torch.cat(out).cpu()


def cmc_curve(first_rank: torch.Tensor, ranks: int = CMC_RANKS) -> list[float]:
    """Percent of queries whose first correct item is within rank r, r = 1..ranks."""
    r = torch.arange(1, ranks + 1)
    return (first_rank[None, :] <= r[:, None]).float().mean(1).mul(100).tolist()


# -- the report ------------------------------------------------------------------------------


def write_report(model, cfg, tokenizer, split: str, device, out_dir: Path, *,
                 title: str = "", queries: int = 8, worst: int = 8, top_k: int = 10,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Evaluate on `split` and write the report folder; {similarity: metrics} on every rank."""
    from tbps.trainer.inference.evaluate import embed

    was_training = model.training
    model.eval()
    text, q_pids = embed(model, cfg, tokenizer, split, "text", device)
    image, g_pids = embed(model, cfg, tokenizer, split, "image", device)
    model.train(was_training)
    result = None
    if dist.rank() == 0:
        sims = getattr(model, "module", model).recipe.similarity(text, image)
        result = {name: retrieval_metrics(s, q_pids, g_pids) for name, s in sims.items()}
        first = {name: ranked(s, q_pids, g_pids) for name, s in sims.items()}
        _write_folder(Path(out_dir), cfg, split, title or split, sims, result, first,
                      q_pids.cpu(), g_pids.cpu(), queries, worst, top_k, seed)
    return dist.broadcast_object(result)


def _split_rows(shards: Path, split: str, n_queries: int, n_gallery: int):
    """Query captions and gallery items of a split, in the order `embed` returns them."""
    from tbps.data_pipeline.manifest import read_manifest
    from tbps.trainer.inference.gallery import list_gallery

    table = read_manifest(shards, columns=["index", "caption", "pid"], split=split).to_pylist()
    captions = [r["caption"] for r in sorted(table, key=lambda r: r["index"])]
    items, _ = list_gallery(shards, split)
    if len(captions) != n_queries or len(items) != n_gallery:
        raise ValueError(f"{shards} ({split}) lists {len(captions)} captions and {len(items)} "
                         f"images but {n_queries} and {n_gallery} were embedded: some samples are "
                         f"unreadable; run `tbps verify {shards}`")
    return captions, items


def _write_folder(out: Path, cfg, split, title, sims, metrics, first, q_pids, g_pids,
                  n_queries, n_worst, top_k, seed) -> None:
    from tbps.trainer.inference.gallery import load_images

    shards = Path(cfg.data.shards)
    captions, items = _split_rows(shards, split, len(q_pids), len(g_pids))
    main = next(iter(sims))
    rank1 = first[main]
    Q = len(captions)
    rng = np.random.default_rng(seed)
    sampled = sorted(rng.choice(Q, size=min(n_queries, Q), replace=False).tolist())
    worst = torch.argsort(rank1, descending=True, stable=True)[:min(n_worst, Q)].tolist()
    order = {}
    for q in sorted(set(sampled) | set(worst)):
        order[q] = torch.argsort(sims[main][q].float(), descending=True, stable=True)[:top_k].tolist()
    firsts = {}
    for q in worst:                                  # the first correct image of a worst query
        ranking = torch.argsort(sims[main][q].float(), descending=True, stable=True)
        firsts[q] = int(ranking[int(rank1[q]) - 1])
    wanted = sorted({g for q in order for g in order[q]} | set(firsts.values()))
    images = dict(zip(wanted, load_images(shards, [items[g] for g in wanted])))

    def tiles(q):
        return [Tile(images[g], f"{r + 1}: id {items[g].id}",
                     GREEN if int(g_pids[g]) == int(q_pids[q]) else RED)
                for r, g in enumerate(order[q])]

    def row(q):
        return {"query": q, "caption": captions[q], "pid": int(q_pids[q]),
                "first_correct_rank": int(rank1[q])}

    out.mkdir(parents=True, exist_ok=True)
    cmc = {name: cmc_curve(r) for name, r in first.items()}
    plot_cmc(cmc, out / "cmc.png", f"CMC, {title}")
    draw_rows([(f"[{q}] {captions[q]} (id {int(q_pids[q])}, first correct at {int(rank1[q])})",
                tiles(q)) for q in sampled], out / "retrieval.png",
              title=f"sampled queries (seed {seed}), top {top_k} by {main}: green correct, red wrong")
    draw_rows([(f"[{q}] {captions[q]} (id {int(q_pids[q])})",
                tiles(q) + [Tile(images[firsts[q]], f"{int(rank1[q])}: id {items[firsts[q]].id}",
                                 GREEN, apart=True)])
               for q in worst], out / "worst.png",
              title=f"worst queries by the rank of their first correct image ({main}); after "
                    f"the top {top_k}, that image")
    report = {"split": split, "metrics": metrics, "cmc": cmc, "similarity": main,
              "sampled": [row(q) for q in sampled], "worst": [row(q) for q in worst],
              "queries": Q, "gallery": len(items), "seed": seed}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    (out / "report.html").write_text(render_html(title, report))


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if i >= numeric_from else ''}'>{html.escape(str(c))}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, report: dict) -> str:
    metrics = report["metrics"]
    cols = list(next(iter(metrics.values())))
    mtable = _table(["similarity", *cols],
                    [[n, *(f"{m[c]:.2f}" for c in cols)] for n, m in metrics.items()])

    def qtable(rows):
        return _table(["query", "caption", "person id", "first correct at"],
                      [[r["query"], r["caption"], r["pid"], r["first_correct_rank"]] for r in rows],
                      numeric_from=2)

    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:24px auto;padding:0 16px;"
             "color:#222}table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid "
             "#ccc;padding:4px 10px;text-align:left;vertical-align:top}td.num{text-align:right;"
             "font-variant-numeric:tabular-nums}th{background:#f3f3f3}img{max-width:100%;"
             "border:1px solid #ddd}.note{color:#555}")
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {t}</title>
<style>{style}</style></head><body>
<h1>Evaluation: {t}</h1>
<p class="note">{report['queries']} text queries over {report['gallery']} gallery images of the
{html.escape(report['split'])} split. Grids and ranks use the <b>{html.escape(report['similarity'])}</b>
similarity; the numbers are in <a href="metrics.json">metrics.json</a>.</p>
<h2>Metrics (%)</h2>
{mtable}
<h2>CMC curve</h2>
<img src="cmc.png" alt="CMC curve, rank 1 to {CMC_RANKS}">
<h2>Sampled queries</h2>
<p class="note">{len(report['sampled'])} queries drawn with seed {report['seed']}, each with its top
images: framed green where the person is the query's, red where not.</p>
{qtable(report['sampled'])}
<img src="retrieval.png" alt="retrieval grid of the sampled queries">
<h2>Worst queries</h2>
<p class="note">The queries whose first correct image ranks lowest; the last image of each row is
that first correct image.</p>
{qtable(report['worst'])}
<img src="worst.png" alt="retrieval grid of the worst queries">
</body></html>
"""
