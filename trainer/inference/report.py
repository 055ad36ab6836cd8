"""The evaluation report a person reads, drawn from what `evaluate` computed (it evaluates nothing).

    tbps evaluate runs/irra-synth/best --split test --report runs/irra-synth/report

writes into the report folder:
  metrics.json     the metrics per similarity (as `tbps evaluate` prints them, the ITM re-ranked
                   row included), the CMC curves and the command's options
  cmc.png          the CMC curve, rank 1 to 50, one line per similarity (re-ranked included)
  retrieval.png    sampled queries (seeded) with their top 10: correct images framed green, wrong red
  worst.png        the queries whose first correct image ranks lowest, with that image at the end
  report.html      one page with all of it: the options, the metrics table, the curve, both grids,
                   and every shown query's caption, person id and rank of its first correct image.
                   No script, no network: inline style and the PNGs beside it, by relative name.
Grids rank by the first similarity (the one checkpoints are chosen on), as the metrics do: the
gallery sorted by descending similarity, ties in gallery order.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from tbps.data_pipeline.manifest import read_manifest
from tbps.trainer.inference.drawing import GREEN, RED, Tile, draw_rows, plot_cmc
from tbps.trainer.inference.gallery import list_gallery, load_images
from tbps.trainer.inference.metrics import Evaluation

CMC_RANKS = 50


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


def write_report(evaluation: Evaluation, out_dir: Path, *, title: str = "", queries: int = 8,
                 worst: int = 8, top_k: int = 10, seed: int = 0, options: dict | None = None
                 ) -> Path:
    """Write the report folder of an evaluation (rank 0's: it holds the matrices); options:
    {option as typed: value} of the command, shown as given. Returns the folder."""
    ev = evaluation
    if ev.similarities is None:
        raise ValueError("this evaluation holds no similarities (not rank 0's): write the report "
                         "on rank 0")
    q_pids, g_pids = ev.query_pids.cpu(), ev.gallery_pids.cpu()
    first = {name: ranked(s, q_pids, g_pids) for name, s in ev.similarities.items()}
    out = Path(out_dir)
    _write_folder(out, ev, title or ev.split, first, q_pids, g_pids, queries, worst, top_k, seed,
                  options or {})
    return out


def _split_rows(shards: Path, split: str, n_queries: int, n_gallery: int):
    """Query captions and gallery items of a split, in the order `embed` returns them."""
    table = read_manifest(shards, columns=["index", "caption", "pid"], split=split).to_pylist()
    captions = [r["caption"] for r in sorted(table, key=lambda r: r["index"])]
    items, _ = list_gallery(shards, split)
    if len(captions) != n_queries or len(items) != n_gallery:
        raise ValueError(f"{shards} ({split}) lists {len(captions)} captions and {len(items)} "
                         f"images but {n_queries} and {n_gallery} were embedded: some samples are "
                         f"unreadable; run `tbps verify {shards}`")
    return captions, items


def _write_folder(out: Path, ev: Evaluation, title, first, q_pids, g_pids, n_queries, n_worst,
                  top_k, seed, options) -> None:
    shards, sims = Path(ev.shards), ev.similarities
    captions, items = _split_rows(shards, ev.split, len(q_pids), len(g_pids))
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
    report = {"split": ev.split, "metrics": ev.metrics, "cmc": cmc, "similarity": main,
              "sampled": [row(q) for q in sampled], "worst": [row(q) for q in worst],
              "queries": Q, "gallery": len(items), "seed": seed,
              "itm_rerank": _rerank_note(ev), "options": _plain(options)}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    (out / "report.html").write_text(render_html(title, report))


def _rerank_note(ev: Evaluation) -> str | None:
    """What became of ITM re-ranking: its metrics row, or why there is none."""
    if not ev.itm_rerank:
        return None
    rows = [name for name in ev.metrics if name.endswith(f"+ITM@{ev.itm_rerank}")]
    if not rows:
        return (f"re-ranking of the top {ev.itm_rerank} was asked for, but the recipe has no ITM "
                "head: no re-ranked row")
    return (f"each query's top {ev.itm_rerank} by {next(iter(ev.metrics))} re-ranked by the ITM "
            f"head: row {rows[0]} (with its cost: seconds, queries/s)")


def _plain(options: dict) -> dict:
    """The options as JSON holds them (paths as text)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in options.items()}


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if i >= numeric_from else ''}'>{html.escape(str(c))}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, report: dict) -> str:
    metrics = report["metrics"]
    cols = list(dict.fromkeys(c for m in metrics.values() for c in m))   # re-ranking adds its cost
    mtable = _table(["similarity", *cols],
                    [[n, *(f"{m[c]:.2f}" if c in m else "" for c in cols)]
                     for n, m in metrics.items()])
    otable = _table(["option", "value"], [[k, "" if v is None else v]
                                          for k, v in report["options"].items()], numeric_from=2)
    rerank = ("" if report["itm_rerank"] is None
              else f'<p class="note">ITM re-ranking: {html.escape(report["itm_rerank"])}.</p>')

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
<h2>Options</h2>
{otable}
<h2>Metrics (%)</h2>
{mtable}
{rerank}
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
