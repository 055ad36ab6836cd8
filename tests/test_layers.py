"""The house's layer rules, read from the source (no import runs):

    kernels, data_pipeline          import nothing of the trainer
    trainer/common                  the configuration and the collectives
    trainer/model                   the dual encoder, its heads, inference entry points
    trainer/recipe | inference      the training step and its parts | using a trained model
    trainer/running                 what a run needs: resume, checkpoints, EMA, the seam
    trainer/train.py, launch.py     the entry points
    trainer/tools                   benchmarks, pretraining, the study, pictures
    trainer/cli.py                  the `tbps` command

Imports point down only (recipe and inference do not import each other), accelerate and
DeepSpeed are imported in trainer/common/dist.py alone, no module imports itself back through
others, no module is over 600 lines (a Triton kernel file excepted), and an import inside a
function says why it is there (a comment on its line or the line before).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("trainer", "kernels", "data_pipeline")
RANK = {"common": 0, "model": 1, "recipe": 2, "inference": 2, "running": 3, "train": 4,
        "launch": 4, "tools": 5, "cli": 6}
SEAM = {"tbps.trainer.common.dist"}
TRITON_FILES = {"tbps.kernels.similarity_loss", "tbps.kernels.topk_select"}


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["tbps", *parts])] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import of the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [f"{child.module}.{a.name}" for a in child.names]
                found.extend((n if n in MODULES else child.module, child.lineno, nested)
                             for n in names)
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["tbps", "trainer"] and len(parts) > 2 else None


def test_kernels_and_data_pipeline_import_nothing_of_the_trainer():
    bad = [f"{m} imports {dep} (line {line})" for m, deps in GRAPH.items()
           if not m.startswith("tbps.trainer") for dep, line, _ in deps
           if dep.startswith("tbps.trainer")]
    assert not bad, bad


def test_trainer_imports_point_down_only():
    bad = []
    for m, deps in GRAPH.items():
        here = _layer(m)
        if here is None:
            continue
        for dep, line, _ in deps:
            there = _layer(dep)
            if there is None or there == here:
                continue
            if RANK[there] >= RANK[here]:
                bad.append(f"{m} ({here}) imports {dep} ({there}), line {line}")
    assert not bad, "\n".join(bad)


def test_accelerate_and_deepspeed_have_one_seam():
    users = {m for m, deps in GRAPH.items() for dep, _, _ in deps
             if dep.split(".")[0] in ("accelerate", "deepspeed")}
    assert users <= SEAM, sorted(users - SEAM)


def test_no_import_cycle():
    internal = {m: {d for d, _, _ in deps if d in MODULES} for m, deps in GRAPH.items()}
    state, cycles = {}, []

    def walk(m, stack):
        state[m] = "open"
        for d in sorted(internal[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                walk(d, stack + [d])
        state[m] = "done"

    for m in sorted(internal):
        if m not in state:
            walk(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_under_600_lines(module):
    if module in TRITON_FILES:
        pytest.skip("a Triton kernel file: kernel, reference, autograd function and API together")
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 600, f"{module}: {lines} lines"


def test_imports_inside_functions_say_why():
    bad = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        for dep, line, nested in GRAPH[m]:
            if nested and not _commented(lines, line - 1):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {dep}")
    assert not bad, "\n".join(bad)


def _commented(lines: list[str], i: int) -> bool:
    """A comment on the import's line, on another line of its block of imports, or on the line
    just above the block."""
    start = i
    while start > 0 and lines[start - 1].strip().startswith(("import ", "from ")):
        start -= 1
    end = i
    while end + 1 < len(lines) and lines[end + 1].strip().startswith(("import ", "from ")):
        end += 1
    block = lines[start:end + 1]
    return any("#" in line for line in block) or lines[start - 1].strip().startswith("#")
