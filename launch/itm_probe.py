"""How well can an ITM head tell matching from non-matching pairs on a run's tokens?

    python launch/itm_probe.py RUN/best --out launch/results/aga_ablations/itm_probe

AGA's ITM reads the cross-modal encoder's first token. This probe separates what the head of a
finished run learned from what the fusion encoder can learn on the same features:

1. `trained`: the run's own cross-modal encoder and ITM head, scored on the test split.
2. For each `--inits` (recipe.cross.attention_init: clip, identity) and each `--negatives` kind
   (hard: drawn from the softmax of the run's ITC similarity at tau, never of the caption's
   identity, as the training step draws them; uniform: any other identity), a fresh cross-modal
   encoder of the run's size (its residual setting) and ITM head are trained for `--steps` steps
   on the frozen projected tokens of the training split (batch 64: each caption with an image of
   its identity, one negative image and one negative caption, AdamW at `--lr` and `--eps`) and scored on the
   test split every `--steps / 4` steps.

Scores on the test split (each caption against an image of its identity and one negative image
of each kind; a fixed draw): AUC (positive score above negative score, over all pairs), pair
accuracy (the caption's positive above its own negative), and for reference the ITC cosine's
pair accuracy on the same draws; then R1 of ITM-only re-ranking of each query's ITC top `--k`
(the first tenth of the queries) against the ITC order. Rows are written to results.json as they
finish (a finished row is skipped on a second call) and results.md is rewritten; the CPU model,
versions, commit and command are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tbps.kernels.environment import environment
from tbps.trainer.model.encoder import padding_mask


def load(weights: Path, shards: str | None):
    from tbps.trainer.inference.evaluate import embed
    from tbps.trainer.model.weights import load_weights_folder

    overrides = [f"data.shards={shards}"] if shards else []
    cfg, tok, model = load_weights_folder(weights, [*overrides, "data.num_workers=0"])
    if model.itm_head is None:
        raise ValueError(f"{weights}: the recipe has no itm term, so there is no ITM head to probe")
    model.eval()
    feats = {}
    for split in ("train", "test"):
        img, ipid = embed(model, cfg, tok, split, "image", torch.device("cpu"), mode="image_tokens")
        txt, tpid = embed(model, cfg, tok, split, "text", torch.device("cpu"), mode="text_tokens")
        ie, _ = embed(model, cfg, tok, split, "image", torch.device("cpu"))
        te, _ = embed(model, cfg, tok, split, "text", torch.device("cpu"))
        L = int(txt["eos"].max()) + 1
        feats[split] = {"img": img["tokens"], "ipid": ipid, "txt": txt["tokens"][:, :L],
                        "eos": txt["eos"].long(), "tpid": tpid,
                        "ie": F.normalize(ie["bge"], dim=-1), "te": F.normalize(te["bge"], dim=-1)}
        print(f"{split}: {len(ipid)} images, {len(tpid)} captions", flush=True)
    return cfg, model, feats


def first_token(cross, d, ti, ii):
    """The cross-modal encoder's first token for captions ti with images ii (what ITM reads)."""
    return cross(d["txt"][ti], d["img"][ii], padding_mask(d["eos"][ti], d["txt"].shape[1]))[:, 0]


def score(cross, head, d, ti, ii):
    logits = head(first_token(cross, d, ti, ii)).float()
    return logits[:, 1] - logits[:, 0]


def positives(d, ti, g):
    out = []
    for p in d["tpid"][ti].tolist():
        cand = (d["ipid"] == p).nonzero().flatten()
        out.append(cand[torch.randint(len(cand), (1,), generator=g)])
    return torch.cat(out)


def negatives(sim, same, kind, tau, g):
    logits = torch.zeros_like(sim) if kind == "uniform" else sim / tau
    return torch.multinomial(torch.softmax(logits.masked_fill(same, float("-inf")), -1), 1,
                             generator=g).flatten()


class TestSet:
    """A fixed draw on the test split: every other caption, an image of its identity, a hard and
    a uniform negative image; the ITC top-k of a tenth of the queries."""

    def __init__(self, d, tau, k, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.d, self.ti = d, torch.arange(0, len(d["tpid"]), 2)
        self.pos = positives(d, self.ti, g)
        same = d["tpid"][self.ti, None] == d["ipid"][None]
        sim = d["te"][self.ti] @ d["ie"].T
        self.neg = {kind: negatives(sim, same, kind, tau, g) for kind in ("hard", "uniform")}
        self.queries = torch.arange(0, len(d["tpid"]), 10)
        self.k = min(k, len(d["ipid"]))
        self.top = (d["te"][self.queries] @ d["ie"].T).topk(self.k, dim=1).indices

    @torch.no_grad()
    def evaluate(self, cross, head) -> dict:
        was = cross.training
        cross.eval()
        d, out = self.d, {}
        itc = lambda ii: (d["te"][self.ti] * d["ie"][ii]).sum(-1)          # noqa: E731
        sp = score(cross, head, d, self.ti, self.pos)
        for kind, neg in self.neg.items():
            sn = score(cross, head, d, self.ti, neg)
            out[f"auc_{kind}"] = (sp[:, None] > sn[None]).float().mean().item()
            out[f"pair_{kind}"] = (sp > sn).float().mean().item()
            out[f"itc_pair_{kind}"] = (itc(self.pos) > itc(neg)).float().mean().item()
        hit_itc = hit_itm = 0
        for q, top in zip(self.queries.tolist(), self.top):
            rel = d["ipid"][top] == d["tpid"][q]
            s = score(cross, head, d, torch.full((self.k,), q), top)
            hit_itc += bool(rel[0])
            hit_itm += bool(rel[s.argmax()])
        out["rerank_r1_itc"] = 100 * hit_itc / len(self.queries)
        out["rerank_r1_itm"] = 100 * hit_itm / len(self.queries)
        cross.train(was)
        return {k: round(v, 4) for k, v in out.items()}


def train_fresh(cfg, feats, test: TestSet, init: str, kind: str, args) -> dict:
    from tbps.trainer.model.heads import CrossModalEncoder

    torch.manual_seed(args.seed)
    width = feats["train"]["img"].shape[-1]
    cross = CrossModalEncoder(width, cfg.model.cross_heads, cfg.model.cross_layers,
                              residual=cfg.recipe.cross.residual, attention_init=init)
    head = torch.nn.Linear(width, 2)
    opt = torch.optim.AdamW([*cross.parameters(), *head.parameters()], lr=args.lr,
                            weight_decay=0.02, eps=args.eps)
    d, g, B = feats["train"], torch.Generator().manual_seed(args.seed), 64
    curve, t0 = [], time.time()
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
    for step in range(1, args.steps + 1):
        ti = torch.randint(len(d["tpid"]), (B,), generator=g)
        pi = positives(d, ti, g)
        ni = negatives(d["te"][ti] @ d["ie"].T, d["tpid"][ti, None] == d["ipid"][None], kind,
                       args.tau, g)
        nt = negatives(d["ie"][pi] @ d["te"].T, d["ipid"][pi, None] == d["tpid"][None], kind,
                       args.tau, g)
        first = torch.cat([first_token(cross, d, ti, pi), first_token(cross, d, ti, ni),
                           first_token(cross, d, nt, pi)])
        loss = F.cross_entropy(head(first).float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            row = {"step": step, "loss": round(loss.item(), 4), **test.evaluate(cross, head)}
            curve.append(row)
            print(f"  {init}/{kind} step {step}: loss {row['loss']:.3f}, test AUC hard "
                  f"{row['auc_hard']:.3f} uniform {row['auc_uniform']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return {"curve": curve, "seconds": round(time.time() - t0)}


def markdown(results: dict) -> str:
    r = results
    lines = [f"# ITM probe: {r['weights']}", "",
             "Test split, a fixed draw: each caption against an image of its identity and one "
             "negative image (hard: from the ITC softmax at tau, as training draws them; uniform: "
             "any other identity). AUC over all positive/negative pairs; pair accuracy per "
             f"caption; ITC's pair accuracy on the same draws; R1 after re-ranking the ITC top "
             f"{r['k']} by the ITM score alone (a tenth of the queries) against the ITC order.",
             "",
             "| head | step | loss | AUC hard | pair hard | ITC pair hard | AUC uniform | "
             "pair uniform | ITC pair uniform | R1 ITC | R1 ITM re-ranked |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, step, loss, m):
        return (f"| {name} | {step} | {loss} | {m['auc_hard']:.3f} | {m['pair_hard']:.3f} | "
                f"{m['itc_pair_hard']:.3f} | {m['auc_uniform']:.3f} | {m['pair_uniform']:.3f} | "
                f"{m['itc_pair_uniform']:.3f} | {m['rerank_r1_itc']:.1f} | "
                f"{m['rerank_r1_itm']:.1f} |")
    lines.append(row("the run's own (trained in the run)", r.get("run_steps", "-"), "-",
                     r["trained"]))
    for name, fresh in r["fresh"].items():
        for c in fresh["curve"]:
            lines.append(row(f"fresh, {name}", c["step"], f"{c['loss']:.3f}", c))
    env = r["environment"]
    lines += ["", f"Fresh heads: {r['steps']} steps of batch 64 (x3 pairs), AdamW lr {r['lr']} eps "
              f"{r.get('eps', 1e-8)}, "
              f"tau {r['tau']}, seed {r['seed']}; seconds per head: "
              + ", ".join(f"{n} {f['seconds']}" for n, f in r["fresh"].items()) + ".", "",
              f"CPU: {env['cpu']} ({env['threads']} thread(s)); python {env['python']}, torch "
              f"{env['torch']}; commit {env['commit']}", "", f"    {env['command']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weights folder of a run with an itm term (best/ or final/)")
    p.add_argument("--shards", help="shard folder (default: the one the run trained on)")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW's eps (the trainer's "
                   "optim.eps is 1e-3, IRRA's)")
    p.add_argument("--tau", type=float, default=None, help="default: the run's loss.tau")
    p.add_argument("--k", type=int, default=32, help="re-ranked candidates a query")
    p.add_argument("--inits", default="clip,identity")
    p.add_argument("--negatives", default="hard,uniform")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    weights, out = Path(args.weights), Path(args.out)
    if not weights.is_dir():
        p.error(f"{weights} does not exist")
    for kind in args.negatives.split(","):
        if kind not in ("hard", "uniform"):
            p.error(f"--negatives {kind}: use hard or uniform")
    for init in args.inits.split(","):
        if init not in ("clip", "identity"):
            p.error(f"--inits {init}: use clip or identity")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg, model, feats = load(weights, args.shards)
    args.tau = args.tau or cfg.loss.tau
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    settings = {"weights": str(weights), "steps": args.steps, "lr": args.lr, "eps": args.eps,
                "tau": args.tau,
                "k": args.k, "seed": args.seed}
    results = json.loads(path.read_text()) if path.is_file() else {}
    if any(results.get(k) != v for k, v in settings.items()):
        results = {}                                   # other settings: start again
    results.update(settings, environment=environment("python launch/itm_probe.py", argv))
    test = TestSet(feats["test"], args.tau, args.k, seed=args.seed)
    results["trained"] = test.evaluate(model.cross, model.itm_head)
    results.setdefault("fresh", {})
    for init in args.inits.split(","):
        for kind in args.negatives.split(","):
            name = f"{init} init, {kind} negatives"
            if name in results["fresh"]:
                print(f"{name}: done before, kept", flush=True)
                continue
            results["fresh"][name] = train_fresh(cfg, feats, test, init, kind, args)
            path.write_text(json.dumps(results, indent=1) + "\n")
            (out / "results.md").write_text(markdown(results))
    path.write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
