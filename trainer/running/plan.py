"""The dry run: check a run's inputs and print its plan, without a GPU and without training.

    tbps train --dry-run --config launch/configs/irra.yaml \\
        --launch launch/accelerate/gpu_zero2.yaml data.shards=shards/cuhk [--gpu-memory 80]
    tbps train --dry-run --config launch/configs/irra_synth.yaml   # this machine

Checks, each answered ok or with what to do (any failure: exit code 2):
  config      the experiment YAML and overrides (every field, every combination of parts);
  launch      the accelerate config: ranks, machines, ZeRO stage, offload; its DeepSpeed JSON
              (valid, only "auto" fields the trainer or accelerate fill, no optimizer section);
  shards      the manifest, every shard file present with the size the manifest records,
              enough shards for ranks x loader workers and a batch for every rank;
  tokenizer   it loads and the shards' own captions come out with an end token;
  model       built with random weights of the configured shapes: its parameter count.
Then the plan: world size, global batch, steps per epoch and in all, warm-up, precision, where
checkpoints go and their size, and the memory one GPU needs (`memory_estimate`): weights,
gradients, optimizer state, EMA, activations at the configured batch, under the ZeRO stage.

Activations are measured, not guessed: the model's training forward runs on this CPU at a
micro-batch of 1 and of 2 with every tensor autograd keeps for the backward counted once (by
storage, parameters excluded); the cost per sample is extrapolated to the configured batch.
Under DDP with bf16 autocast the part that does not grow with the batch is autocast's bf16 copy
of the weights, kept for the backward (its own line). Captions are taken at the full context
length (an upper bound); the momentum model's forward keeps nothing (no gradient). On a CPU
without native bf16 the forward is measured in fp32 and the bf16 figure is that times
BF16_ACTIVATION_RATIO (measured here for IRRA on ViT-B/16 at 384x128: 148 against 252 MiB a
sample; autocast keeps layer norms and softmax in fp32). The attention on a GPU may keep less
(flash attention keeps no attention matrix), so the figure is an upper bound there. Not
counted: the CUDA context and allocator slack (about 1-2 GiB a GPU), NCCL buffers.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tbps.data_pipeline.manifest import read_manifest, read_meta, split_info
from tbps.trainer.common import dist
from tbps.trainer.common.config import Config
from tbps.trainer.common.global_batch import micro_batch
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.encoder import DualEncoder
from tbps.trainer.model.retrieval import RetrievalModel
from tbps.trainer.model.sizes import clip_config, size_of_hub_id
from tbps.trainer.model.weights import build_model, load_tokenizer
from tbps.trainer.recipe.momentum import momentum_modules
from tbps.trainer.recipe.step import Recipe, StepInfo
from tbps.trainer.running import precision as precision_mod
from tbps.trainer.running.ema import ShardedEMA

log = logging.getLogger(__name__)

GIB = 2**30
BF16_ACTIVATION_RATIO = 0.59     # bf16 autocast / fp32 saved bytes a sample, ViT-B/16 IRRA
# DeepSpeed JSON fields that may say "auto": the trainer writes the first three, accelerate the
# precision flags from the launch's mixed_precision; train_batch_size is dropped
AUTO_FIELDS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "train_batch_size", "bf16.enabled", "fp16.enabled"}


@dataclass
class Layout:
    """How the run will be launched."""

    processes: int = 1                  # ranks in all
    machines: int = 1
    zero_stage: int = 0                 # 0: DDP (or one process)
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: str | None = None  # what the launch file says (the config decides)
    ds_config: dict | None = None
    source: str = "this process"
    target: str = "cpu"                 # the device the ranks run on: "gpu" | "cpu"
    problems: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.zero_stage:
            off = [n for n, on in (("optimizer", self.offload_optimizer),
                                   ("parameters", self.offload_params)) if on]
            return f"DeepSpeed ZeRO-{self.zero_stage}" + (f", {' and '.join(off)} offloaded to "
                                                         "the CPU" if off else "")
        return "DDP" if self.processes > 1 else "one process"


# -- the launch --------------------------------------------------------------------------------


def layout_from_launch(path: str) -> Layout:
    """The layout an accelerate config file describes (ranks, machines, ZeRO, offload)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--launch {path}: no such accelerate config file")
    try:
        c = dist.read_launch_file(path)
    except Exception as exc:                        # noqa: BLE001 (yaml / dataclass errors)
        raise ValueError(f"--launch {path} is not an accelerate config accelerate can read "
                         f"({type(exc).__name__}: {exc})") from None
    lay = Layout(processes=int(c.num_processes or 1), machines=int(c.num_machines or 1),
                 mixed_precision=str(c.mixed_precision), source=path,
                 target="cpu" if c.use_cpu or Path(path).name.startswith("cpu") else "gpu")
    if "DEEPSPEED" in str(c.distributed_type):
        ds = dict(c.deepspeed_config or {})
        if ds.get("deepspeed_config_file"):
            lay.ds_config = _read_ds_json(ds["deepspeed_config_file"], lay)
            zero = (lay.ds_config or {}).get("zero_optimization", {})
            lay.zero_stage = int(zero.get("stage", 0))
            lay.offload_optimizer = _offloaded(zero.get("offload_optimizer"))
            lay.offload_params = _offloaded(zero.get("offload_param"))
        else:
            lay.zero_stage = int(ds.get("zero_stage", 2))
            lay.offload_optimizer = ds.get("offload_optimizer_device", "none") not in ("none",
                                                                                        None)
            lay.offload_params = ds.get("offload_param_device", "none") not in ("none", None)
            lay.ds_config = {"zero_optimization": {"stage": lay.zero_stage}}
        if lay.machines > 1 and ds.get("deepspeed_multinode_launcher", "standard") != "standard":
            lay.problems.append(f"{path}: deepspeed_multinode_launcher "
                                f"{ds.get('deepspeed_multinode_launcher')!r} starts ranks over "
                                "ssh/pdsh; this project launches one `accelerate launch` per node "
                                "(`standard`)")
    if lay.processes % max(1, lay.machines):
        lay.problems.append(f"{path}: num_processes {lay.processes} is not a multiple of "
                            f"num_machines {lay.machines} (it counts the ranks of all machines)")
    return lay


def layout_from_env() -> Layout:
    """The layout of this process's own launch (WORLD_SIZE and accelerate's variables)."""
    lay = Layout(processes=int(os.environ.get("WORLD_SIZE", "1")),
                 target="gpu" if torch.cuda.is_available() else "cpu")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        lay.zero_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        lay.ds_config = _read_ds_json(path, lay) if path else {
            "zero_optimization": {"stage": lay.zero_stage}}
    return lay


def _offloaded(section) -> bool:
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _read_ds_json(path: str, lay: Layout) -> dict | None:
    p = Path(path)
    if not p.is_file():
        lay.problems.append(f"DeepSpeed config {path} does not exist (paths in an accelerate "
                            "config are relative to the folder the launch runs in)")
        return None
    try:
        ds = json.loads(p.read_text())
    except ValueError as exc:
        lay.problems.append(f"DeepSpeed config {path} is not valid JSON ({exc})")
        return None
    for key in _auto_keys(ds):
        if key not in AUTO_FIELDS:
            lay.problems.append(f"{path}: {key} is \"auto\", which nothing fills here (the "
                                f"trainer fills {sorted(AUTO_FIELDS)}); give it a value")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            lay.problems.append(f"{path}: a {section!r} section; the trainer builds its own "
                                f"{section} (optim.*): remove the section")
    return ds


def _auto_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            out.append(f"{prefix}{k}")
    return out


# -- checks ------------------------------------------------------------------------------------


def check_shards(cfg: Config, lay: Layout) -> tuple[list[str], dict]:
    """Problems with the shards for this layout, and the manifest's metadata."""
    root = Path(cfg.data.shards)
    meta = read_meta(root)
    problems = []
    for split in meta.get("splits", {}):
        info = split_info(meta, split)
        for sh in info.shards:
            f = root / sh.name
            if not f.is_file():
                problems.append(f"shard {f} is missing")
            elif f.stat().st_size != sh.bytes:
                problems.append(f"shard {f} has {f.stat().st_size} bytes, the manifest "
                                f"says {sh.bytes} (run `tbps verify {root}`)")
    if "train" not in meta.get("splits", {}):
        problems.append(f"{root} has no train split")
        return problems, meta
    train = split_info(meta, "train")
    readers = lay.processes * max(1, cfg.data.num_workers)
    if train.num_shards < readers:
        problems.append(f"{train.num_shards} train shards for {lay.processes} ranks x "
                        f"{max(1, cfg.data.num_workers)} loader workers = {readers} readers; "
                        "each needs a shard of its own: re-shard with a smaller --shard-size "
                        f"(at most {max(1, train.num_samples // readers)}) or lower "
                        "data.num_workers")
    try:
        micro_batch(cfg, lay.processes)
    except ValueError as exc:
        problems.append(str(exc).replace("invalid config field ", ""))
    if train.num_samples < cfg.data.batch_size:
        problems.append(f"the train split has {train.num_samples} samples, fewer than one "
                        f"global batch of {cfg.data.batch_size}")
    return problems, meta


def check_tokenizer(cfg: Config):
    """The tokenizer, checked on the shards' own captions (an end token in every one)."""
    tok = load_tokenizer(cfg)
    captions = read_manifest(cfg.data.shards, columns=["caption"], split="train")
    sample = [str(c) for c in captions["caption"].to_pylist()[:64]]
    if sample:
        ids = tok.encode_batch(sample)
        if not (ids == tok.eot_id).any(axis=1).all():
            raise ValueError(f"the tokenizer {cfg.data.tokenizer!r} leaves the end token out of "
                             "some captions of the shards; re-shard with this tokenizer")
    return tok


def build_for_plan(cfg: Config, tok, meta: dict):
    """The run's model with random weights (a pretrained model's shapes from its config, no
    download of weights)."""
    num_classes = meta["num_classes"]
    num_samples = meta["splits"]["train"]["num_samples"]
    torch.manual_seed(0)
    if not cfg.model.pretrained:
        return build_model(cfg, tok, num_classes, num_samples)
    config = pretrained_config(cfg.model.pretrained)
    config.text_config.vocab_size = max(config.text_config.vocab_size, tok.vocab_size)
    encoder = DualEncoder.from_clip_config(config, tuple(cfg.model.image_size), tok.eot_id)
    return RetrievalModel(encoder, cfg, num_classes=num_classes, num_samples=num_samples,
                          vocab_size=tok.vocab_size)


def pretrained_config(name: str):
    """A pretrained CLIP's architecture: its config.json (a local folder or the hub cache), else
    the known sizes of the OpenAI checkpoints."""
    from transformers import CLIPConfig  # kept off start-up (the dry run's only)

    try:
        return CLIPConfig.from_pretrained(name)
    except OSError:
        if size_of_hub_id(name) is None:
            raise ValueError(f"model.pretrained={name}: its config.json is neither a local folder "
                             "nor in the Hugging Face cache (offline); download it first") from None
    config = clip_config(size_of_hub_id(name))
    config.text_config.vocab_size, config.text_config.max_position_embeddings = 49408, 77
    return config


# -- activations and memory --------------------------------------------------------------------


def synthetic_batch(cfg, tok, batch: int, *, num_classes: int | None = None,
                    full_length: bool = False, seed: int = 0) -> dict:
    """A CPU training batch of the configured shapes: random images; captions of 20-60 tokens
    (full_length: all of context_length); two samples an identity (of num_classes: random ids)."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.model.image_size
    L = cfg.model.context_length
    if full_length:
        lengths = torch.full((batch,), L - 1)
    else:
        lengths = torch.randint(min(20, L - 2), min(60, L - 1), (batch,), generator=g)
    words = torch.tensor(sorted(set(range(tok.vocab_size)) - set(tok.special_ids)))
    ids = words[torch.randint(len(words), (batch, L), generator=g)]
    ids[:, 0] = tok.sot_id
    pos = torch.arange(L)[None, :]
    ids = torch.where(pos == lengths[:, None], tok.eot_id, ids)
    ids = torch.where(pos > lengths[:, None], tok.pad_id, ids)
    if num_classes:
        pid = torch.randint(0, num_classes, ((batch + 1) // 2,), generator=g).repeat(2)[:batch]
    else:
        pid = torch.arange(batch) // 2
    return {"image": torch.randn(batch, 3, h, w, generator=g), "input_ids": ids, "pid": pid,
            "index": torch.arange(batch), "image_id": torch.arange(batch),
            "noisy": torch.zeros(batch, dtype=torch.bool), "text_length": int(lengths.max()) + 1}


def saved_bytes(model, cfg: Config, tok, batch: int, dtype: torch.dtype, ema=None) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training forward (each
    storage once; the parameters themselves excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.device.type != "meta":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    data = synthetic_batch(cfg, tok, batch, full_length=True)
    info = StepInfo(epoch=0, step=0, tau=cfg.loss.tau, generator=torch.Generator().manual_seed(0),
                    momentum_model=None if ema is None else ema.module)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model(Recipe(cfg, tok).train_losses, data, info)
    del out
    return sum(seen.values())


def activation_estimate(model, cfg: Config, tok, dtype: torch.dtype, ema=None,
                        processes: int = 1) -> dict:
    """Saved bytes at micro-batch 1 and 2: the cost a sample and the part that does not grow
    with the batch (autocast's low-precision weight copies)."""
    one, two = (saved_bytes(model, cfg, tok, b, dtype, ema) for b in (1, 2))
    per_sample = max(0, two - one)
    return {"per_sample": per_sample, "fixed": max(0, one - per_sample),
            "bytes": per_sample * _micro(cfg, processes)}


def memory_estimate(*, params: int, ema_params: int, world: int, zero_stage: int,
                    precision: str, offload_optimizer: bool = False, offload_params: bool = False,
                    activations: int = 0, largest_layer: int = 0) -> dict[str, int]:
    """Bytes one rank holds, by kind (the ZeRO paper's accounting, Rajbhandari et al. 2020).

    DDP (stage 0) through accelerate: fp32 weights and gradients (autocast computes in the low
    precision from them), DDP's gradient buckets (a second copy of the gradients when there are
    several ranks), Adam's two fp32 moments. DeepSpeed: weights and gradients in the training
    dtype, and the optimizer state of 12 bytes a parameter (fp32 master copy and two moments;
    DeepSpeed keeps the master copy in fp32 training too), partitioned over the ranks: the
    optimizer state from ZeRO-1, the gradients too from ZeRO-2, the weights too from ZeRO-3
    (which then gathers the layers it computes: twice the largest layer, in flight and
    prefetched). Offloaded state lives in CPU memory ("cpu_*" entries). The EMA: 4 bytes a
    parameter over the ranks (each keeps its fp32 fragment), plus its compute copy in the
    training dtype (whole, partitioned under ZeRO-3). Under DDP with bf16/fp16 autocast the
    low-precision copies of the weights are kept for the backward ("autocast_copies")."""
    low = 2 if precision in ("bf16", "fp16") else 4
    P, W = params, max(1, world)
    out: dict[str, int] = {}
    if zero_stage == 0:
        out["weights"] = 4 * P
        out["gradients"] = 4 * P + (4 * P if W > 1 else 0)
        out["optimizer"] = 8 * P
        if low == 2:
            out["autocast_copies"] = 2 * P
    else:
        out["weights"] = low * P if zero_stage < 3 else low * P // W + 2 * low * largest_layer
        out["gradients"] = low * P if zero_stage == 1 else low * P // W
        out["optimizer"] = 12 * P // W
        if offload_optimizer:
            out["cpu_optimizer"], out["optimizer"] = out["optimizer"], 0
        if offload_params and zero_stage == 3:
            out["cpu_weights"] = low * P // W
            out["weights"] = 2 * low * largest_layer
    if ema_params:
        copy = low * ema_params if zero_stage < 3 else low * ema_params // W
        out["ema"] = 4 * ema_params // W + copy
    out["activations"] = activations
    out["total"] = sum(v for k, v in out.items() if not k.startswith("cpu_"))
    return out


# -- the dry run -------------------------------------------------------------------------------


def dry_run(config: str | None, overrides: list[str], *, launch_file: str | None = None,
            gpu_memory_gib: float | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":
        return 0                         # launched on several ranks: the first one reports
    cfg = load_config(config, overrides)
    lay = layout_from_launch(launch_file) if launch_file else layout_from_env()
    rows, problems = [], list(lay.problems)
    rows.append(("config", f"{config or 'the defaults'}: method {cfg.method}, "
                 f"{' + '.join(t.kind for t in cfg.recipe.losses)} on "
                 f"{'+'.join(cfg.recipe.branches)}"))
    rows.append(("launch", f"{lay.source}: {lay.processes} rank(s) on {lay.machines} "
                 f"machine(s), {lay.kind}"))
    shard_problems, meta = check_shards(cfg, lay)
    problems += shard_problems
    train = meta["splits"].get("train", {})
    rows.append(("shards", f"{cfg.data.shards}: " + ", ".join(
        f"{k} {v['num_samples']:,} pairs in {len(v['shards'])} shards"
        for k, v in sorted(meta["splits"].items(), key=lambda kv: kv[0] != "train"))))
    tok = check_tokenizer(cfg)
    rows.append(("tokenizer", f"{tok.vocab_size:,} tokens; the shards' captions end with its "
                 "end token"))
    prec = _precision(cfg, lay)
    model = build_for_plan(cfg, tok, meta)
    n_params = sum(p.numel() for p in model.parameters())
    ema, ema_params = _ema(cfg, model, prec)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                  default=0)
    rows.append(("model", f"{n_params / 1e6:.1f}M parameters"
                 + (f"; momentum model of {ema_params / 1e6:.1f}M" if ema_params else "")))
    measured_dtype = torch.bfloat16 if prec["precision"] == "bf16" and prec["native_here"] \
        else torch.float32
    act = activation_estimate(model, cfg, tok, measured_dtype, ema, lay.processes)
    scale = BF16_ACTIVATION_RATIO if prec["precision"] in ("bf16", "fp16") and \
        measured_dtype == torch.float32 else 1.0
    act_bytes = int(act["bytes"] * scale)
    mem = memory_estimate(params=n_params, ema_params=ema_params, world=lay.processes,
                          zero_stage=lay.zero_stage, precision=prec["precision"],
                          offload_optimizer=lay.offload_optimizer,
                          offload_params=lay.offload_params, activations=act_bytes,
                          largest_layer=largest)
    if lay.ds_config is not None:
        rows.append(("deepspeed", _ds_summary(cfg, lay, prec["precision"])))
    micro = _micro(cfg, lay.processes)
    per_rank = max(1, train.get("num_samples", 0) // max(1, micro * lay.processes))
    steps_per_epoch = per_rank // cfg.optim.grad_accum
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    ckpt = _checkpoint_bytes(n_params, ema_params, lay.zero_stage, prec["precision"])
    every = "every epoch" + (f" and every {cfg.train.ckpt_every_steps} steps"
                             if cfg.train.ckpt_every_steps else "")
    plan = [
        ("world size", f"{lay.processes} = {lay.machines} machine(s) x "
         f"{lay.processes // max(1, lay.machines)} process(es)"),
        ("global batch", f"{cfg.data.batch_size:,} = {micro} a rank x {lay.processes} x "
         f"accumulation {cfg.optim.grad_accum}"),
        ("steps", f"{steps_per_epoch:,} an epoch x {cfg.train.epochs} epochs = {total:,}; "
         f"warm-up {int(cfg.optim.warmup_epochs * steps_per_epoch):,} steps"),
        ("precision", prec["reason"]),
        ("checkpoints", f"{Path(cfg.train.output_dir) / 'checkpoints'}/ {every}, "
         f"{cfg.train.keep_checkpoints} kept, about {_size(ckpt)} each"
         + ("; on a file system every machine shares" if lay.machines > 1 else "")),
    ]
    measured = (f"measured at micro-batch 1 and 2 in {str(measured_dtype).split('.')[-1]}"
                + (f", x {scale} for bf16" if scale != 1.0 else "")
                + f": {act['per_sample'] * scale / 2**20:.1f} MiB a sample")
    memory = [(k.replace("_", " "), f"{_size(v):>10}" + (f"   ({measured})" if k == "activations"
                                                         else ""))
              for k, v in mem.items() if v or k in ("activations", "total")]
    problems += [p for p in lay.problems if p not in problems]
    _print(cfg, lay, rows, problems, plan, memory, prec)
    if gpu_memory_gib and mem["total"] > 0.9 * gpu_memory_gib * GIB:
        print(f"warning: the estimate ({mem['total'] / GIB:.1f} GiB) leaves less than 10 % of a "
              f"{gpu_memory_gib:g} GiB GPU for the CUDA context and the allocator: lower "
              "data.batch_size (with optim.grad_accum to keep the global batch) or shard more "
              "(ZeRO-2, ZeRO-3, offload)")
    if problems:
        raise ValueError(f"the dry run found {len(problems)} problem(s): " + "; ".join(problems))
    return 0


def _precision(cfg: Config, lay: Layout) -> dict:
    requested = cfg.train.precision
    if lay.target == "gpu" and not torch.cuda.is_available():
        native_here = precision_mod.cpu_bf16()[0]
        if requested == "auto":
            return {"precision": "bf16", "native_here": native_here,
                    "reason": "auto: bf16 on GPUs with bf16 (compute capability 8.0 or newer: "
                              "A100, H100), fp32 on older ones (V100, T4); estimated for bf16"}
        return {"precision": requested, "native_here": native_here,
                "reason": f"train.precision={requested} as set"}
    choice = precision_mod.resolve(requested)
    reason = choice.reason + (f" (warning: {choice.warning})" if choice.warning else "")
    native = precision_mod.cpu_bf16()[0] if not torch.cuda.is_available() else True
    return {"precision": choice.precision, "native_here": native, "reason": reason}


def _ema(cfg: Config, model, prec: dict):
    """The momentum model the run would build (for its activations) and its parameter count."""
    if not cfg.needs_momentum():
        return None, 0
    modules = tuple(dict.fromkeys(momentum_modules(cfg) + tuple(cfg.ema.modules)))
    acc = dist.cpu_accelerator()
    dtype = torch.float32
    ema = ShardedEMA(acc, model, factory=lambda: _clone(model), modules=modules,
                     momentum=cfg.ema.momentum, compute_dtype=dtype)
    return ema, sum(p.numel() for p in ema.params.values())


def _clone(model):
    return copy.deepcopy(model)


def _checkpoint_bytes(params: int, ema_params: int, zero_stage: int, precision: str) -> int:
    """A checkpoint on disk: the weights (fp32 under DDP, the training dtype under DeepSpeed),
    the optimizer state (Adam's moments; DeepSpeed also its fp32 master copy) and the EMA."""
    low = 2 if precision in ("bf16", "fp16") else 4
    if zero_stage == 0:
        return 4 * params + 8 * params + 4 * ema_params
    return low * params + 12 * params + 4 * ema_params


def _ds_summary(cfg: Config, lay: Layout, prec: str) -> str:
    ds = lay.ds_config or {}
    zero = ds.get("zero_optimization", {})
    parts = [f"ZeRO-{zero.get('stage', lay.zero_stage)}",
             f"micro-batch {_micro(cfg, lay.processes)}",
             f"accumulation {cfg.optim.grad_accum}",
             f"clipping {cfg.optim.grad_clip or 'off'}", f"{prec}"]
    for key in ("bf16", "fp16"):
        enabled = (ds.get(key) or {}).get("enabled")
        if enabled is True and prec != key:
            lay.problems.append(f"the DeepSpeed config enables {key} but the run trains in "
                                f"{prec}: set {key}.enabled to \"auto\"")
    if lay.offload_optimizer:
        parts.append("optimizer state on the CPU (DeepSpeedCPUAdam)")
    return ", ".join(parts) + " (the trainer fills the \"auto\" fields from the config)"


def _micro(cfg: Config, processes: int) -> int:
    """A rank's micro-batch, or the nearest whole share where the config's does not split
    (the dry run reports that as a problem and still estimates)."""
    try:
        return micro_batch(cfg, processes)
    except ValueError:
        return max(2, cfg.data.batch_size // (processes * cfg.optim.grad_accum))


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _print(cfg, lay, rows, problems, plan, memory, prec) -> None:
    print(f"dry run: {cfg.method} on {cfg.data.shards}, launched as {lay.source}")
    print("checks")
    for name, text in rows:
        print(f"  ok    {name:<11} {text}")
    for p in problems:
        print(f"  FAIL  {p}")
    print("plan")
    for name, text in plan:
        print(f"  {name:<13} {text}")
    print(f"memory per {'GPU' if lay.target == 'gpu' else 'rank'} ({lay.kind}, "
          f"{prec['precision']}, micro-batch {_micro(cfg, lay.processes)}; estimate)")
    for name, text in memory:
        print(f"  {name:<13} {text}")
    print("  (not counted: the CUDA context and allocator slack, about 1-2 GiB a GPU)")
