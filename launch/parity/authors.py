"""The authors' code, imported from a user's checkout, and what the parity harness switches in it.

Nothing of theirs is copied here: `load` imports their modules from the checkout path the user
gives (IRRA: the repository root; RDE: the root or its 2024-CVPR-RDE folder). Both repositories
name their packages `model`, `utils`, `processor`, ...: each load imports into a clean
`sys.modules` and takes those names out again, so the two can be compared in one process.

What the harness changes in their code, and why (each is reported beside the figures):
- `build_model` is not called: it ends in `convert_weights`, which stores every Linear, Conv and
  attention weight in fp16. The model classes (IRRA, RDE) are built directly and kept in fp32.
- their forward casts to fp16 in four places (IRRA's `classifier(i_feats.half())`, RDE's TSE
  layers' `features.half()`, `base_features.half()`, `feat_lengths...half()`): inside
  `cpu_fp32()` `Tensor.half` returns the tensor unchanged, so the fp32 model runs in fp32;
- RDE's `compute_TAL_per` moves its label matrix with `.cuda()`: inside `cpu_fp32()`
  `Tensor.cuda` returns the tensor unchanged (the run is on the CPU).
- inside `fp64()` (IRRA's gradient in float64) their LayerNorm keeps the input's dtype and
  `Tensor.float` returns a floating tensor unchanged, so their model runs in float64;
- inside `stable_topk()` (the rows with the authors' switches on) `Tensor.topk` breaks ties
  to the lower index: which padding tokens their text TSE takes as filler is otherwise the
  implementation's choice.
- Python packages they import but the compared code never calls are stubbed when missing
  (`STUBS`: prettytable for utils/metrics.Evaluator's tables, easydict and ftfy for option and
  caption handling); which were stubbed is reported.
"""
from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch

THEIR_PACKAGES = ("model", "utils", "processor", "datasets", "solver")
STUBS = {"prettytable": ("PrettyTable",), "easydict": ("EasyDict",), "ftfy": ("fix_text",)}


def code_root(checkout: Path, kind: str) -> Path:
    checkout = Path(checkout)
    if kind == "rde" and (checkout / "2024-CVPR-RDE").is_dir():
        checkout = checkout / "2024-CVPR-RDE"
    if not (checkout / "model" / "build.py").is_file():
        raise SystemExit(f"{checkout}: no model/build.py: give the path of a checkout of the "
                         f"authors' {kind.upper()} repository")
    return checkout


def commit(checkout: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in THEIR_PACKAGES:
            del sys.modules[name]


def _stub_missing() -> list[str]:
    stubbed = []
    for name, attrs in STUBS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            for attr in attrs:
                setattr(mod, attr, _unused(f"{name}.{attr}"))
            sys.modules[name] = mod
            stubbed.append(name)
    return stubbed


def _unused(what: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{what} is a stub of the parity harness; the compared code should "
                           "not call it")
    return call


def load(checkout: Path, kind: str, modules: tuple[str, ...]) -> tuple[dict, list[str]]:
    """{module name: module} imported from the checkout; and the packages stubbed."""
    root = code_root(checkout, kind)
    _purge()
    stubbed = _stub_missing()
    sys.path.insert(0, str(root))
    try:
        loaded = {name: importlib.import_module(name) for name in modules}
    finally:
        sys.path.remove(str(root))
        _purge()
    return loaded, stubbed


@contextlib.contextmanager
def cpu_fp32():
    """Their code's `.half()` and `.cuda()` leave the tensor as it is (fp32, on the CPU)."""
    original = torch.Tensor.half, torch.Tensor.cuda
    torch.Tensor.half = torch.Tensor.cuda = lambda self, *a, **k: self     # noqa: E731
    try:
        yield
    finally:
        torch.Tensor.half, torch.Tensor.cuda = original


@contextlib.contextmanager
def fp64(layer_norm):
    """Their model in float64: inside, their LayerNorm (`layer_norm`, which casts to fp32 and
    back) runs in the input's dtype; `.float()` of a floating tensor, `.half()` and `.cuda()`
    leave it as is."""
    original = layer_norm.forward, torch.Tensor.float
    layer_norm.forward = torch.nn.LayerNorm.forward
    torch.Tensor.float = lambda self, *a, **k: (              # noqa: E731
        self if self.is_floating_point() else original[1](self, *a, **k))
    try:
        with cpu_fp32():
            yield
    finally:
        layer_norm.forward, torch.Tensor.float = original


@contextlib.contextmanager
def stable_topk(on: bool = True):
    """Their `Tensor.topk` with ties to the lower index (a stable descending sort): their text
    TSE takes the filler slots of a short caption among padding positions that all score 0,
    and which of them is the implementation's choice (the CPU's heap order, another on CUDA).
    This project's switch takes the padding nearest the EOS; inside this context theirs does."""
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):           # noqa: A002 (torch's name)
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    if on:
        torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


def args(**values) -> types.SimpleNamespace:
    """Their argparse namespace, with what their model constructors and their solver read (the
    solver's values: their utils/options.py defaults)."""
    base = dict(temperature=0.02, img_size=(128, 64), stride_size=16, cmt_depth=4,
                loss_names="sdm+id+mlm", vocab_size=49408, id_loss_weight=1.0,
                mlm_loss_weight=1.0, select_ratio=0.3, tau=0.015, margin=0.1,
                noisy_rate=0.5, dataset_name="CUHK-PEDES",
                optimizer="Adam", lr=1e-5, lr_factor=5.0, bias_lr_factor=2.0,
                weight_decay=4e-5, weight_decay_bias=0.0, alpha=0.9, beta=0.999,
                num_epoch=60, milestones=(20, 50), gamma=0.1, warmup_factor=0.1,
                warmup_epochs=5, warmup_method="linear", lrscheduler="cosine", target_lr=0,
                power=0.9)
    base.update(values)
    return types.SimpleNamespace(**base)


class Passthrough:
    """A value whose `.to(device)` returns the value itself: their division pass moves every
    batch to "cuda", which a CPU run does not have."""

    def __init__(self, value):
        self.value = value

    def to(self, device):
        return self.value
