"""A ZeRO-sharded EMA (momentum copy) of chosen modules: no rank holds the whole fp32 EMA.

    ema = ShardedEMA(acc, model, factory=lambda: build_model(...), modules=("encoder",),
                     momentum=0.995, momentum_end=1.0, total_steps=T)
    ...after each optimizer step:  ema.update(step)
    image_features, _ = ema(features, {"image": pixels})    # an entry point, on the EMA copy
    step's momentum part: model(momentum_forward, ...) on `ema.module` (trainer/recipe/momentum.py)

Layout. The EMA keeps, for each chosen parameter, an fp32 copy of the *fragment* of it that this
rank owns, so the ranks' fragments tile every parameter exactly once:
- ZeRO-3: the rank's partition of the parameter, updated from DeepSpeed's local fp32 master
  partition (`safe_get_local_fp32_param`): no communication per step;
- ZeRO-1/2: the fragment of the parameter inside this rank's optimizer partition, updated from
  its fp32 master fragment (`_hp_mapping`): no communication per step;
- DDP or one process: the chosen parameters, flattened in order, are cut into `world` contiguous
  ranges and each rank updates its own range from the (fp32) parameters.
Each rank stores about 1/world of the fp32 EMA (4 bytes a parameter over world ranks); the update
is ema <- m ema + (1 - m) theta with m constant or rising from m0 to 1 on a cosine.

Forward. `ema.module` is a model of the same architecture (built by `factory`, the parts not
chosen dropped) holding the EMA in the training dtype, in eval mode; `ema(entry, *args)` runs
its forward without gradient, like the online model's. Under DDP / ZeRO-1/2 every
`refresh_every` steps the fragments are all-gathered into it (params x the training dtype's bytes
of traffic); under ZeRO-3 it is a second
DeepSpeed engine without optimizer whose partitions are overwritten from the local fragments
(no traffic), and DeepSpeed gathers each layer during its forward, as for the online model. The
communication and memory figures are logged once.

Checkpoints: `state_dict()` holds this rank's fragments and their layout (every fragment is a
range of a flattened parameter, whatever the layout). `load_state_dict(state)` takes this rank's
own state back; `load_state_dicts(states)` takes every rank's states of a checkpoint written
under another layout (world size or ZeRO stage), puts the whole fp32 EMA together from their
fragments and cuts this rank's fragments from it (a resume on another number of ranks).
`full_state_dict()` gathers the whole fp32 EMA (for export, tests).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from tbps.trainer.common import collective, dist
from tbps.trainer.model.sizes import CLIP_SIZES, clip_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fragment:
    name: str        # parameter name within the EMA'd module tree (e.g. "encoder.clip....")
    start: int       # first element of the flattened parameter owned here
    numel: int


def momentum_at(step: int, *, m0: float, m_end: float, total_steps: int) -> float:
    """m0 -> m_end on a half cosine over total_steps (constant when m_end == m0)."""
    if m_end == m0 or total_steps <= 0:
        return m0
    t = min(max(step, 0), total_steps) / total_steps
    return m_end - (m_end - m0) * (math.cos(math.pi * t) + 1) / 2


class ShardedEMA:
    def __init__(self, acc, model: nn.Module, *, factory, modules: tuple[str, ...],
                 momentum: float, momentum_end: float | None = None, total_steps: int = 0,
                 refresh_every: int = 1, compute_dtype: torch.dtype | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.acc, self.modules = acc, tuple(modules)
        self.m0, self.m_end = momentum, momentum if momentum_end is None else momentum_end
        self.total_steps, self.refresh_every = total_steps, refresh_every
        self.stage = dist.zero_stage(acc)
        online = acc.unwrap_model(model)
        self.params = self._chosen(online)
        self.kind = "zero3" if self.stage == 3 else "zero12" if self.stage in (1, 2) else "flat"
        self.fragments = self._layout()
        self.shadow = [self._source(f).detach().float().clone() for f in self.fragments]
        self.layouts = collective.all_gather_object([(f.name, f.start, f.numel) for f in self.fragments])
        self.compute_dtype = compute_dtype or _training_dtype(acc)
        self.online = online
        self.module = self._build_compute_copy(factory)
        self._refreshed_at = None
        self.refresh(force=True)
        self._log_costs()

    # -- which elements this rank owns --------------------------------------------------------

    def _chosen(self, online: nn.Module) -> dict[str, nn.Parameter]:
        names = dict(online.named_parameters())
        chosen = {n: p for n, p in names.items()
                  if any(n == m or n.startswith(m + ".") for m in self.modules)}
        if not chosen:
            raise ValueError(f"EMA modules {self.modules} match no parameter of the model")
        return chosen

    def _layout(self) -> list[Fragment]:
        rank, world = collective.rank(), collective.world_size()
        frags = []
        if self.kind == "zero3":
            for name, p in self.params.items():
                part = p.ds_tensor.ds_numel
                start = rank * part
                numel = max(0, min(part, p.ds_numel - start))
                if numel:
                    frags.append(Fragment(name, start, numel))
        elif self.kind == "zero12":
            for name, p in self.params.items():
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None and mapping.lp_fragment_address.numel:
                    addr = mapping.lp_fragment_address
                    frags.append(Fragment(name, int(addr.start), int(addr.numel)))
        else:
            total = sum(p.numel() for p in self.params.values())
            per = -(-total // world)
            lo, hi, offset = rank * per, min(total, (rank + 1) * per), 0
            for name, p in self.params.items():
                a, b = max(lo, offset), min(hi, offset + p.numel())
                if a < b:
                    frags.append(Fragment(name, a - offset, b - a))
                offset += p.numel()
        return frags

    def _source(self, f: Fragment) -> torch.Tensor:
        """The live fp32 values of a fragment (the optimizer's master copy under ZeRO)."""
        p = self.params[f.name]
        if self.kind == "zero3":
            return dist.local_fp32_partition(p)[: f.numel]
        if self.kind == "zero12":
            return p._hp_mapping.get_hp_fragment().view(-1)
        return p.detach().view(-1)[f.start: f.start + f.numel]

    # -- updates ------------------------------------------------------------------------------

    def momentum(self, step: int) -> float:
        return momentum_at(step, m0=self.m0, m_end=self.m_end, total_steps=self.total_steps)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """One EMA step after the optimizer's; returns the momentum used."""
        m = self.momentum(step)
        for f, ema in zip(self.fragments, self.shadow):
            ema.mul_(m).add_(self._source(f).float(), alpha=1.0 - m)
        if (step + 1) % self.refresh_every == 0:
            self.refresh()
        return m

    # -- the compute copy ----------------------------------------------------------------------

    def _build_compute_copy(self, factory) -> nn.Module:
        with dist.plain_init(self.acc):
            tree = _prune(factory(), self.modules)
        for p in tree.parameters():
            p.requires_grad_(False)
        if self.kind == "zero3":
            return dist.inference_engine(self.acc, tree, self.compute_dtype)
        return tree.to(device=self.acc.device, dtype=self.compute_dtype).eval()

    @torch.no_grad()
    def __call__(self, entry, *args, **kwargs):
        return self.module(entry, *args, **kwargs)

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Write the EMA into the compute copy (gathering it, except under ZeRO-3)."""
        inner = dist.unwrap(self.module)
        params = dict(inner.named_parameters())
        if self.kind == "zero3":
            for f, ema in zip(self.fragments, self.shadow):
                dist.set_local_partition(params[f.name], ema.to(self.compute_dtype))
        else:
            for name, value in self.full_state_dict(dtype=self.compute_dtype).items():
                params[name].copy_(value.view_as(params[name]))
        online_buffers = dict(self.online.named_buffers())
        for name, buf in inner.named_buffers():            # replicated under every stage
            if name in online_buffers:
                buf.copy_(online_buffers[name])

    @torch.no_grad()
    def full_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The whole EMA on every rank (an all-gather of the fragments)."""
        local = torch.cat([e.to(dtype) for e in self.shadow]) if self.shadow else \
            torch.zeros(0, dtype=dtype, device=self.acc.device)
        flat = collective.gather_varlen_list(local)
        out = {n: torch.zeros(p.ds_numel if self.kind == "zero3" else p.numel(), dtype=dtype,
                              device=local.device) for n, p in self.params.items()}
        for layout, values in zip(self.layouts, flat):
            offset = 0
            for name, start, numel in layout:
                out[name][start: start + numel] = values[offset: offset + numel]
                offset += numel
        shapes = {n: (p.ds_shape if self.kind == "zero3" else p.shape)
                  for n, p in self.params.items()}
        return {n: v.view(shapes[n]) for n, v in out.items()}

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kind": self.kind, "world_size": collective.world_size(), "modules": self.modules,
                "fragments": [(f.name, f.start, f.numel) for f in self.fragments],
                "shadow": [e.cpu() for e in self.shadow]}

    def same_layout(self, state: dict) -> bool:
        mine = [(f.name, f.start, f.numel) for f in self.fragments]
        return (state["kind"], state["world_size"], list(map(tuple, state["fragments"]))) == \
            (self.kind, collective.world_size(), mine)

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state, saved under the same layout."""
        if not self.same_layout(state):
            raise ValueError(f"the checkpoint's EMA was cut for {state['kind']} over "
                             f"{state['world_size']} ranks; this run is {self.kind} over "
                             f"{collective.world_size()}: load every rank's state with "
                             "load_state_dicts to re-cut it")
        for ema, saved in zip(self.shadow, state["shadow"]):
            ema.copy_(saved)
        self.refresh(force=True)

    @torch.no_grad()
    def load_state_dicts(self, states: list[dict]) -> None:
        """Every rank's state of a checkpoint written under any layout: the whole EMA is put
        together from their fragments (each a range of a flattened parameter) and this rank's
        fragments cut from it. Refuses states of other modules or that leave a gap."""
        modules = {tuple(s["modules"]) for s in states}
        if modules != {self.modules}:
            raise ValueError(f"the checkpoint's EMA covers {sorted(modules)}, this run's "
                             f"{self.modules}: they must be the same modules")
        sizes = {n: (p.ds_numel if self.kind == "zero3" else p.numel())
                 for n, p in self.params.items()}
        full = {n: torch.empty(k, dtype=torch.float32) for n, k in sizes.items()}
        covered = dict.fromkeys(sizes, 0)
        for state in states:
            for (name, start, numel), values in zip(state["fragments"], state["shadow"]):
                if name not in full or start + numel > sizes[name]:
                    raise ValueError(f"the checkpoint's EMA holds {name}[{start}:{start + numel}]"
                                     ", which this model does not have")
                full[name][start: start + numel] = values.view(-1).float()
                covered[name] += numel
        gaps = [n for n, k in covered.items() if k != sizes[n]]
        if gaps:
            raise ValueError(f"the checkpoint's EMA files cover {gaps[0]} (and {len(gaps) - 1} "
                             "more) incompletely: an EMA file of some rank is missing")
        for f, ema in zip(self.fragments, self.shadow):
            ema.copy_(full[f.name][f.start: f.start + f.numel])
        self.refresh(force=True)

    # -- reporting ----------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        return sum(e.numel() * e.element_size() for e in self.shadow)

    def _log_costs(self) -> None:
        total = sum((p.ds_numel if self.kind == "zero3" else p.numel())
                    for p in self.params.values())
        per_rank = self.stored_bytes()
        elem = torch.tensor([], dtype=self.compute_dtype).element_size()
        traffic = 0 if self.kind == "zero3" else total * elem
        log.info("EMA of %s: %.2fM parameters; fp32 shard on this rank %.1f MiB (unsharded: "
                 "%.1f MiB); compute copy %s; refresh every %d step(s) moves %.1f MiB a rank",
                 ",".join(self.modules), total / 1e6, per_rank / 2**20, 4 * total / 2**20,
                 "partitioned (ZeRO-3 engine)" if self.kind == "zero3" else
                 f"{total * elem / 2**20:.1f} MiB in {self.compute_dtype}",
                 self.refresh_every, traffic / 2**20)


def _training_dtype(acc) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)


def _prune(model: nn.Module, modules: tuple[str, ...]) -> nn.Module:
    """`model` with every submodule that holds none of the chosen ones set to None; the
    root stays, with its code."""
    keep = set(modules)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}{name}"
            if path in keep:
                continue
            if any(k.startswith(path + ".") for k in keep):
                walk(child, path + ".")
            else:
                setattr(module, name, None)

    walk(model, "")
    return model


# -- memory table (README) ---------------------------------------------------------------------

def memory_table(ranks=(1, 8, 64)) -> list[dict]:
    """Per-rank fp32 EMA of both encoders (and of the image encoder alone), from parameter
    counts of the architectures built on the meta device (no weights needed)."""
    from transformers import CLIPModel  # kept off start-up: the table is a README tool

    rows = []
    for name in CLIP_SIZES:
        config = clip_config(name)
        with torch.device("meta"):
            clip = CLIPModel(config)
        image = sum(p.numel() for p in clip.vision_model.parameters()) + \
            clip.visual_projection.weight.numel()
        both = image + sum(p.numel() for p in clip.text_model.parameters()) + \
            clip.text_projection.weight.numel()
        for label, count in (("image + text encoders", both), ("image encoder", image)):
            rows.append({"model": f"CLIP {name}", "ema_of": label, "parameters": count,
                         "unsharded_MiB": 4 * count / 2**20,
                         **{f"ranks_{w}_MiB": 4 * count / w / 2**20 for w in ranks}})
    return rows


def main() -> None:
    rows = memory_table()
    ranks = [k for k in rows[0] if k.startswith("ranks_")]
    print("| model | EMA of | parameters | unsharded fp32 EMA | " +
          " | ".join(f"per rank, {k.split('_')[1]} ranks" for k in ranks) + " |")
    print("|---" * (4 + len(ranks)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['ema_of']} | {r['parameters'] / 1e6:.1f}M | "
              f"{r['unsharded_MiB']:.0f} MiB | " +
              " | ".join(f"{r[k]:.1f} MiB" for k in ranks) + " |")


if __name__ == "__main__":
    main()
