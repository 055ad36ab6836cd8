"""trainer/inference: no import cycle between its modules, and none over 600 lines."""
import ast

from tests.trainer.conftest import REPO

FOLDER = REPO / "trainer" / "inference"
PACKAGE = "tbps.trainer.inference."


def _imports() -> dict[str, set[str]]:
    """{module: the inference modules it imports, anywhere in it}."""
    out = {}
    for path in sorted(FOLDER.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE.rstrip("."):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                names.add(node.module[len(PACKAGE):])
            elif isinstance(node, ast.Import):
                names |= {a.name[len(PACKAGE):] for a in node.names if a.name.startswith(PACKAGE)}
        out[path.stem] = names
    return out


def test_inference_modules_import_without_a_cycle():
    graph = _imports()
    assert "evaluate" not in graph["report"] and "report" not in graph["search"]
    done, active = set(), []

    def visit(name):
        assert name not in active, " -> ".join([*active, name])
        if name in done or name not in graph:
            return
        active.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        active.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_no_inference_module_is_over_600_lines():
    for path in FOLDER.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, path.name
