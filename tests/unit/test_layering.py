"""The codebase's own rules, checked on the source: which modules may talk to torch.distributed and
mpi4py, module and function sizes, and imports at module level (design.md, issue "one codebase")."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "parml"
SOURCES = sorted(PACKAGE.rglob("*.py"))
OPTIONAL = ("mpi4py", "sklearn", "numba", "tensorboard", "torch.utils.tensorboard", "triton",
            "matplotlib")   # matplotlib: imported where a plot is drawn (0.5 s per rank at start-up otherwise)
# parml's own modules that import an optional dependency: loaded on first use
LAZY = ("_numba_dense", "_numba_network")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module or ""]
    return []


def test_the_sources_are_found():
    assert len(SOURCES) > 30 and (PACKAGE / "comm" / "base.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_parml_comm_imports_torch_distributed_or_mpi4py(path):
    if path.relative_to(PACKAGE).parts[0] == "comm":
        return
    bad = [name for node in ast.walk(_tree(path)) for name in _imported(node)
           if name.startswith(("torch.distributed", "mpi4py"))]
    assert not bad, f"{path.name} imports {bad}: communication goes through parml.comm"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.name}: {lines} lines (at most 500: split it by concept)"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"{path.name}: functions over 60 lines: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_sit_at_module_level_except_optional_dependencies(path):
    local = []
    for fn in ast.walk(_tree(path)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [node.module] if node.module else [a.name for a in node.names]
                if not all(name in LAZY for name in names):
                    local.append(f"{fn.name}: from {'.' * node.level}{node.module or ''}")
            else:
                local += [f"{fn.name}: {name}" for name in _imported(node) if not name.startswith(OPTIONAL)]
    assert not local, f"{path.name}: function-local imports {local}"
