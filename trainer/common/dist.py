"""The one module that talks to accelerate and DeepSpeed (the EMA reads DeepSpeed's shards
through it too); the collectives over torch.distributed are trainer/common/collective.py.

Launch (see launch/): `accelerate launch` starts the processes; this module builds the
Accelerator the launch asked for and fills in what DeepSpeed needs from the config:
- plain DDP on CPU: Accelerator(cpu=True) over gloo (without cpu=True each process would train
  alone in a world of one);
- DeepSpeed on CPU: DS_ACCELERATOR=cpu and a gloo process group (Accelerator(cpu=True) would
  silently drop DeepSpeed);
- DeepSpeed's micro-batch size, accumulation and clipping are written from the config (the
  webdataset loader stays out of `prepare`, so "auto" could not be resolved).

"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import logging
import os
import sys
import warnings
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tbps.trainer.common.global_batch import micro_batch

log = logging.getLogger(__name__)

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def quiet_third_party() -> None:
    """Keep the libraries' start-up chatter off the console; their warnings still show.

    On a machine without CUDA, DS_ACCELERATOR=cpu spares DeepSpeed its accelerator detection
    (which warns "Setting accelerator to CPU" in every process that imports it)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("accelerate", "deepspeed", "DeepSpeed", "torch.distributed",
                 "torch.distributed.elastic", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed calls collectives torch has renamed: one FutureWarning per call site and rank
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)


# The non-tensor classes a training checkpoint holds beside tensors and plain values: numpy's
# (accelerate's random states before they were JSON) and DeepSpeed's plain records in a ZeRO
# optimizer partition (the stage, the loss scaler, a fragment's address). Rebuilding them runs
# no code of the file's choosing; anything else in a pickle is refused.
_DEEPSPEED_RECORDS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


def checkpoint_records(deepspeed: bool = False) -> list:
    """The classes `weights_only_loads` allows (DeepSpeed's only when asked: importing
    DeepSpeed takes seconds)."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    records = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if deepspeed:
        for module, name in _DEEPSPEED_RECORDS:
            try:
                records.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):   # another DeepSpeed version: not needed
                pass
    return records


@contextlib.contextmanager
def weights_only_loads(deepspeed: bool = False):
    """Every `torch.load` inside runs torch's restricted unpickler (tensors, plain values and
    `checkpoint_records`), whatever its caller asked: DeepSpeed's checkpoint engine and its
    universal-checkpoint reader pass weights_only=False, so a crafted ZeRO file would otherwise
    run its payload. A file holding anything else raises pickle.UnpicklingError."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(checkpoint_records(deepspeed)):
            yield
    finally:
        torch.load = real


def checkpoint_model_state(folder) -> dict:
    """The whole model of a training checkpoint as {name: fp32 tensor}: accelerate's
    model.safetensors (DDP), or DeepSpeed's per-rank files put together (ZeRO-2's module state,
    ZeRO-3's partitions), read under `weights_only_loads`."""
    folder = str(folder)
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return load_file(os.path.join(folder, "model.safetensors"))
    if not os.path.isdir(os.path.join(folder, "pytorch_model")):
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model/")
    # deferred: DeepSpeed's import takes seconds and is needed only for ZeRO checkpoints
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    said = io.StringIO()                            # its progress lines, to the log
    with weights_only_loads(deepspeed=True), contextlib.redirect_stdout(said):
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag="pytorch_model")
    log.info("put together %s: %s", folder, " | ".join(said.getvalue().split("\n"))[-300:])
    return {k: v.float().contiguous() for k, v in state.items()}


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_build_dir() -> str:
    """Where DeepSpeed compiles its ops on first use (the shared-memory collectives and CPU Adam
    on CPU): torch's extensions folder keys builds by Python and CUDA but not by DeepSpeed or
    torch, so after an upgrade the old build loads and fails (`module 'deepspeed_shm_comm' has
    no attribute 'vector_kernel_level'`, seen going from DeepSpeed 0.19.0 to 0.19.8). One folder
    per Python, torch, CUDA and DeepSpeed version instead; TORCH_EXTENSIONS_DIR still wins."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}_{cuda}_torch"
           f"{torch.__version__.split('+')[0]}_deepspeed{metadata.version('deepspeed')}")
    return os.path.join(cache, "torch_extensions", tag)


def build_accelerator(cfg, run_dir: str):
    """An Accelerator for this launch (DDP or DeepSpeed ZeRO-1/2/3; CPU or GPU), its collectives
    bounded by train.collective_timeout_s. cfg.train.precision must be resolved (not auto)."""
    cpu = not torch.cuda.is_available()
    deepspeed = using_deepspeed()
    if cpu and deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if deepspeed:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", deepspeed_build_dir())
    quiet_third_party()
    from accelerate import (  # kept off start-up; read after the env is set
        Accelerator,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
    group = InitProcessGroupKwargs(timeout=timeout)
    if cpu and deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        group = InitProcessGroupKwargs(backend="gloo", timeout=timeout)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False), group]
    kwargs = dict(mixed_precision=_PRECISION[cfg.train.precision], kwargs_handlers=handlers,
                  gradient_accumulation_steps=cfg.optim.grad_accum, project_dir=run_dir)
    if cfg.train.tensorboard:
        kwargs["log_with"] = "tensorboard"
    # on CPU DeepSpeed prints a line a rank when it compiles its shared-memory collectives
    quiet = contextlib.redirect_stdout(io.StringIO()) if cpu and deepspeed else \
        contextlib.nullcontext()
    with quiet:
        acc = Accelerator(cpu=cpu and not deepspeed, **kwargs)
    if acc.state.deepspeed_plugin is not None:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch(cfg, acc.num_processes)
        ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
        ds["gradient_clipping"] = cfg.optim.grad_clip or 0.0
        ds.setdefault("zero_allow_untested_optimizer", True)
        ds.pop("train_batch_size", None)
    return acc


@contextlib.contextmanager
def plain_init(acc):
    """Build modules with ordinary, unpartitioned initialisation even under ZeRO-3.

    accelerate registers DeepSpeed's config with transformers whenever the stage is 3, and
    transformers then builds every CLIPModel inside deepspeed.zero.Init: partitioned at
    construction (rank 0 alone building one for an export would hang) and initialised
    differently from a DDP run at the same seed. The engine partitions the model in `prepare`.
    """
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    # kept off start-up; read after the env is set
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def describe(acc) -> dict:
    """What kind of run this is, for the log."""
    plugin = acc.state.deepspeed_plugin
    return {"distributed_type": str(acc.distributed_type).split(".")[-1],
            "num_processes": acc.num_processes, "device": str(acc.device),
            "mixed_precision": acc.mixed_precision,
            "zero_stage": plugin.zero_stage if plugin is not None else None,
            "backend": dist.get_backend() if dist.is_initialized() else None}


def offloads_optimizer(acc) -> bool:
    """Whether DeepSpeed keeps the optimizer state on the CPU (ZeRO-Offload)."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP, a DeepSpeed engine (`.module`) or torch.compile (`_orig_mod`)."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def zero_stage(acc) -> int:
    plugin = acc.state.deepspeed_plugin
    return 0 if plugin is None else int(plugin.zero_stage)


# -- DeepSpeed ZeRO-3 specifics --------------------------------------------------------------


def register_external_parameters(acc, model) -> None:
    """Under ZeRO-3, parameters the model reads outside their own module's forward (it lists
    them in `external_parameters()`) must be gathered by the forward of the module that reads
    them, here the root: DeepSpeed would otherwise hand over its empty placeholder."""
    if zero_stage(acc) != 3:
        return
    # kept off start-up; read after the env is set
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    root = unwrap(model)
    for param in root.external_parameters():
        register_external_parameter(root, param)


def local_fp32_partition(param) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter, from the optimizer's fp32 master copy."""
    from deepspeed.utils import safe_get_local_fp32_param  # kept off start-up; read after the env is set

    return safe_get_local_fp32_param(param).view(-1)


def set_local_partition(param, values: torch.Tensor) -> None:
    """Overwrite the first values.numel() elements of this rank's ZeRO-3 partition."""
    param.ds_tensor.data.view(-1)[: values.numel()].copy_(values.view(-1))


def inference_engine(acc, module, dtype: torch.dtype):
    """A ZeRO-3 DeepSpeed engine without optimizer (a partitioned module for no-grad forwards,
    e.g. an EMA copy): it partitions `module` like the training engine partitions its model."""
    import deepspeed  # kept off start-up; read after the env is set

    train_cfg = acc.state.deepspeed_plugin.deepspeed_config
    zero = {k: v for k, v in train_cfg.get("zero_optimization", {}).items()
            if k.startswith("stage3_param") or k in ("stage",)}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {**zero, "stage": 3},
              "bf16": {"enabled": dtype == torch.bfloat16},
              "fp16": {"enabled": dtype == torch.float16}, "steps_per_print": 2**31}
    for p in module.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    register_external_parameters(acc, engine)
    return engine



def read_launch_file(path: str):
    """An accelerate config file as accelerate reads it (its dataclass)."""
    # kept off start-up; read after the env is set
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(path)


def cpu_accelerator():
    """A one-process CPU Accelerator (planning, tools)."""
    from accelerate import Accelerator  # kept off start-up (DeepSpeed's env is set first)

    return Accelerator(cpu=True)


def local_accelerator():
    """A plain Accelerator for the launch this process is part of (the GPU where there is
    one): evaluation and indexing, every rank a share."""
    from accelerate import Accelerator  # kept off start-up (DeepSpeed's env is set first)

    return Accelerator(cpu=not torch.cuda.is_available())


def cpu_adam(param_groups: list[dict], *, lr: float, betas, eps: float, adamw: bool):
    """DeepSpeed's CPU Adam, for ZeRO with the optimizer state offloaded to the CPU (DeepSpeed
    refuses a torch optimizer there)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # kept off start-up; read after the env is set

    return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, eps=eps, adamw_mode=adamw)
