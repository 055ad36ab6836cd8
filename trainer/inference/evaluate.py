"""Text-to-image evaluation: distributed embedding of queries and gallery, then the metrics.

    tbps evaluate runs/irra-synth/best                 # test split, one process
    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m tbps.trainer.inference.evaluate \
        runs/irra-synth/best --split val

Every test caption is a query over every test image (one per image). Each rank embeds its share
of both (the eval loaders split samples so each is embedded exactly once), the embeddings are
gathered by sample index, and rank 0 computes the similarity per branch (the recipe names them:
"t2i", or RDE's BGE / TSE / BGE+TSE) and `retrieval_metrics`. Prints a table and writes
evaluation.json beside the weights (or into --out): its own file, never a run's metrics.json.

    tbps evaluate runs/irra-synth/best --split test --report runs/irra-synth/report

also writes the report a person reads into that folder (trainer/inference/report.py), drawn from
this evaluation (`run_evaluation` returns an `Evaluation`: metrics, matrices, ids), the ITM
re-ranked row included: a CMC curve, a retrieval grid of sampled queries, the worst queries, the
options, and report.html showing all of it.

ITM re-ranking (`eval.itm_rerank=K`, a recipe with an itm term, AGA's): each query's top K
images by the first similarity are re-scored by the ITM head on the cross-modal encoder and put
first in that order, the rest keep theirs; reported as an extra similarity "<name>+ITM@K" with
its cost (seconds, queries/s). Every rank takes part: the projected tokens of the queries and the
gallery are gathered, the query list is cut into one share per rank, each rank scores its share
in batches of pairs (the same number of forwards on every rank, as ZeRO-3 needs), and the scores
are gathered.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tbps.data_pipeline.loader import EvalLoader, LoaderConfig
from tbps.data_pipeline.transforms import prepare_batch
from tbps.trainer.common import collective, dist, errors
from tbps.trainer.inference.metrics import Evaluation, retrieval_metrics
from tbps.trainer.inference.model_calls import embed_batch, has_itm_head, itm_scores, similarity
from tbps.trainer.inference.report import write_report
from tbps.trainer.model.weights import load_weights_folder

log = logging.getLogger(__name__)
EVALUATION_FILE = "evaluation.json"          # what `tbps evaluate` writes


def _dummy_batch(modality: str, cfg, tokenizer, device) -> dict:
    ids = torch.full((1, cfg.model.context_length), tokenizer.pad_id, dtype=torch.long)
    ids[0, 0], ids[0, 1] = tokenizer.sot_id, tokenizer.eot_id
    batch = {"input_ids": ids.to(device)}
    if modality == "image":
        batch["image"] = torch.zeros(1, *cfg.model.image_size, 3, dtype=torch.uint8,
                                     device=device)
    return batch


@torch.no_grad()
def embed(model, cfg, tokenizer, split: str, modality: str, device, mode: str | None = None
          ) -> tuple[dict, torch.Tensor]:
    """All embeddings of a split's queries (text) or gallery (image), in sample-index order, on
    every rank, with their person ids. Every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively in each one). mode: the model's forward mode (default the
    modality; "image_tokens" / "text_tokens" give the projected tokens)."""
    loader = EvalLoader(cfg.data.shards, tokenizer,
                        LoaderConfig(batch_size=cfg.data.eval_batch_size,
                                     image_size=tuple(cfg.model.image_size),
                                     num_workers=min(cfg.data.num_workers, 2), augment=None),
                        split=split, modality=modality, rank=collective.rank(),
                        world_size=collective.world_size())
    feats, pids, index, dims = {}, [], [], {}
    it = iter(loader)
    while True:
        batch = next(it, None)
        more = torch.tensor([batch is not None], dtype=torch.long, device=device)
        if collective.world_size() > 1:
            torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
        if not bool(more):
            break
        real = batch is not None
        if not real:
            batch = _dummy_batch(modality, cfg, tokenizer, device)
        batch = prepare_batch(batch, device)
        out = embed_batch(model, batch, mode or modality)
        dims = {name: tuple(f.shape[1:]) for name, f in out.items()}
        if real:
            for name, f in out.items():
                feats.setdefault(name, []).append(f.float())
            pids.append(batch["pid"])
            index.append(batch["index"])
    empty = torch.zeros(0, dtype=torch.long, device=device)
    local_idx = torch.cat(index) if index else empty
    order = torch.argsort(collective.gather_varlen(local_idx))
    out = {}
    for name, dim in sorted(dims.items()):
        local = torch.cat(feats[name]) if name in feats else torch.zeros(0, *dim, device=device)
        out[name] = collective.gather_varlen(local)[order]
    return out, collective.gather_varlen(torch.cat(pids) if pids else empty)[order]


def evaluate(model, cfg, tokenizer, split: str, device) -> dict[str, dict[str, float]]:
    """{similarity name: metrics}; the same dict on every rank."""
    return run_evaluation(model, cfg, tokenizer, split, device).metrics


def run_evaluation(model, cfg, tokenizer, split: str, device) -> Evaluation:
    """Embed, score and measure `split` once (ITM re-ranking when cfg.eval.itm_rerank is set and
    the recipe has an ITM head); the metrics on every rank, the matrices on rank 0."""
    was_training = model.training
    model.eval()
    text, q_pids = embed(model, cfg, tokenizer, split, "text", device)
    image, g_pids = embed(model, cfg, tokenizer, split, "image", device)
    k = cfg.eval.itm_rerank or 0
    sims = rerank = None
    if k and has_itm_head(model):
        sims = similarity(model, text, image)
        name, first = next(iter(sims.items()))
        rerank = (f"{name}+ITM@{k}", *itm_rerank(model, cfg, tokenizer, split, device, first, k))
    model.train(was_training)
    result = Evaluation(split, str(cfg.data.shards), k, {})
    metrics = None
    if collective.rank() == 0:
        sims = dict(sims or similarity(model, text, image))
        if rerank is not None:
            sims[rerank[0]] = rerank[1]
        metrics = {name: retrieval_metrics(s, q_pids, g_pids) for name, s in sims.items()}
        if rerank is not None:
            metrics[rerank[0]].update(rerank[2])
        result.similarities, result.query_pids, result.gallery_pids = sims, q_pids, g_pids
    result.metrics = collective.broadcast_object(metrics)
    return result


@torch.no_grad()
def itm_rerank(model, cfg, tokenizer, split: str, device, sims_QG: torch.Tensor, k: int,
               pairs_per_batch: int = 256) -> tuple[torch.Tensor, dict]:
    """The query x gallery scores after ITM re-ranking of each query's top k (see the module
    docstring), and its cost. Every rank returns the same matrix."""
    t0 = time.time()
    k = min(k, sims_QG.shape[1])
    top_Qk = sims_QG.topk(k, dim=1).indices
    text, _ = embed(model, cfg, tokenizer, split, "text", device, mode="text_tokens")
    image, _ = embed(model, cfg, tokenizer, split, "image", device, mode="image_tokens")
    Q, world, rank = sims_QG.shape[0], collective.world_size(), collective.rank()
    share = math.ceil(Q / world)
    mine = torch.arange(rank * share, min(Q, (rank + 1) * share), device=device)
    q_P = mine.repeat_interleave(k)
    g_P = top_Qk[mine].reshape(-1)
    n_batches = math.ceil(share * k / pairs_per_batch)
    scores = []
    for b in range(n_batches):                      # the same count on every rank
        sl = slice(b * pairs_per_batch, (b + 1) * pairs_per_batch)
        q, g = q_P[sl], g_P[sl]
        if q.numel() == 0:                          # this rank's share is done: a dummy pair
            q, g = torch.zeros(1, dtype=torch.long, device=device), q.new_zeros(1)
        batch = {"text_tokens": text["tokens"][q], "eos": text["eos"][q].long(),
                 "image_tokens": image["tokens"][g]}
        out = itm_scores(model, batch)
        if q_P[sl].numel():
            scores.append(out.float())
    local = torch.cat(scores) if scores else torch.zeros(0, device=device)
    every = collective.gather_varlen(local).view(Q, k)
    reranked = sims_QG.clone().float()
    reranked.scatter_(1, top_Qk, 1e4 + every)       # the top k first, in ITM order
    seconds = time.time() - t0
    return reranked, {"rerank_seconds": round(seconds, 3),
                      "rerank_queries_per_s": round(Q / max(seconds, 1e-9), 1)}


def format_table(results: dict, title: str):
    table = Table(title=title)
    table.add_column("similarity")
    cols = list(next(iter(results.values())))
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in results.items():
        table.add_row(name, *(f"{m[c]:.2f}" for c in cols))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weights folder of a run (best/ or final/)")
    p.add_argument("--split", default="test")
    p.add_argument("--shards", help="shard folder (default: the one the run trained on)")
    p.add_argument("--out", help=f"folder to write {EVALUATION_FILE} into (default: the weights "
                                 "folder)")
    p.add_argument("--report", metavar="DIR", help="also write the evaluation report (report.html, "
                   "cmc.png, retrieval.png, worst.png, metrics.json) into DIR")
    p.add_argument("--report-queries", type=int, default=8, metavar="N",
                   help="queries sampled for the report's retrieval grid (default 8)")
    p.add_argument("--report-worst", type=int, default=8, metavar="N",
                   help="worst queries the report shows (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the report's query sample")
    p.add_argument("--itm-rerank", type=int, metavar="K", help="re-rank each query's top K by "
                   "the ITM head (a recipe with an itm term); default: the run's eval.itm_rerank")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dist.quiet_third_party()
    return errors.guard(lambda: _main(args), on_stop="nothing was written; run it again")


def _main(args) -> int:
    if args.report is not None and min(args.report_queries, args.report_worst) < 1:
        raise ValueError("--report-queries and --report-worst must be at least 1")
    overrides = [f"data.shards={args.shards}"] if args.shards else []
    if args.itm_rerank is not None:
        overrides.append(f"eval.itm_rerank={args.itm_rerank}")
    cfg, tokenizer, model = load_weights_folder(Path(args.weights), overrides)
    if args.report is not None:
        errors.check_output(args.report, {"shards": cfg.data.shards}, flag="--report")
    acc = dist.local_accelerator()
    model = acc.prepare(model)
    evaluation = run_evaluation(model, cfg, tokenizer, args.split, acc.device)
    results = evaluation.metrics
    if args.report is not None and acc.is_main_process:
        options = {"weights": args.weights, **{f"--{k.replace('_', '-')}": v for k, v in
                                               vars(args).items() if k != "weights"},
                   "--shards": evaluation.shards, "--itm-rerank": evaluation.itm_rerank or None}
        write_report(evaluation, Path(args.report), title=f"{args.weights} on {args.split}",
                     queries=args.report_queries, worst=args.report_worst, seed=args.seed,
                     options=options)
    if acc.is_main_process:
        Console().print(format_table(results, f"{args.weights} on {args.split}"))
        out = Path(args.out or args.weights) / EVALUATION_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"split": args.split, "metrics": results}, indent=1))
        print(json.dumps({"split": args.split, "metrics": results}))
        if args.report is not None:
            print(f"report: {Path(args.report) / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
