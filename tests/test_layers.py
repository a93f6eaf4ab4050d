"""The package's structure: no import cycle, the layers of ``.importlinter`` kept, no per-optimizer state in a
module, and no module but the optimizer's own touching its private attributes."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kalmanopt"


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("kalmanopt", include_external_packages=False, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_between_any_two_modules() -> None:
    """Module by module (a package's ``__init__`` included), TYPE_CHECKING and function-level imports counted."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: two modules that import each other are one component."""

    class Graph:
        modules = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(m: str) -> set[str]:
            return {"a": {"b"}, "b": {"a", "c"}, "c": set()}[m]

    assert _cycles(Graph()) == [["a", "b"]]  # type: ignore[arg-type]


def test_imports_inside_functions_are_only_the_optional_dependencies() -> None:
    """Imports inside functions are kept for optional dependencies (matplotlib, Triton, torch.distributed,
    the trainers) and start-up time only: none of kalmanopt's own modules is imported inside a function."""
    inner = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    names = [sub.module or ""] if isinstance(sub, ast.ImportFrom) else \
                        [a.name for a in sub.names] if isinstance(sub, ast.Import) else []
                    if any(name == "kalmanopt" or name.startswith("kalmanopt.") for name in names):
                        inner.append(f"{path.relative_to(ROOT)}:{sub.lineno} {names}")
    assert inner == []


def test_the_layer_contracts_are_kept() -> None:
    """``lint-imports`` (the contracts in ``.importlinter``), as .ci/run runs it."""
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([command, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


#: the private attributes of KalmanOptimizer and torch's Optimizer that other modules must not touch
def _private_attributes() -> set[str]:
    tree = ast.parse((PACKAGE / "optimizer.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            names.add(node.attr)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
            names.add(node.name)
    return names


def test_no_module_but_the_optimizers_touches_its_private_attributes() -> None:
    """Engines, checkpoints and the runner read the optimizer through its public attributes and methods
    (``runtime``, ``group_state``, ``layers``, ``gradients``, ...), never ``opt._something``."""
    private = _private_attributes()
    assert {"_validate_group", "_split_step_loss"} <= private  # (the scan sees the optimizer's own)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "optimizer.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offenders == []


# ---------------------------------------------------------------------- no per-optimizer state in modules
def _module_containers() -> dict[str, object]:
    """Every mutable container at module level in kalmanopt (registries, tables of options, ...), by name."""
    import collections
    import importlib
    import pkgutil
    import weakref

    import kalmanopt

    kinds = (dict, list, set, weakref.WeakKeyDictionary, weakref.WeakValueDictionary, collections.OrderedDict)
    out = {}
    for info in pkgutil.walk_packages(kalmanopt.__path__, "kalmanopt."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, kinds) and not name.startswith("__"):
                out[f"{info.name}.{name}"] = value
    return out


def _snapshot(containers: dict[str, object]) -> dict[str, object]:
    return {name: (len(value), repr(value)) for name, value in containers.items()}  # type: ignore[arg-type]


def test_steps_leave_no_trace_in_any_module_or_engine() -> None:
    """Training with every preset on every CPU engine (two optimizers at once, checkpoints, deepcopies)
    changes no module-level container and no engine object: whatever a step keeps lives on its optimizer's
    ``runtime``, and goes with it."""
    import copy

    import torch
    import torch.nn.functional as F
    from cases import CASES

    import kalmanopt
    from kalmanopt.engines.selection import _ENGINES

    engines = [engine for group in _ENGINES.values() for engine in group]
    containers = _module_containers()
    before, engines_before = _snapshot(containers), [dict(vars(e)) for e in engines]
    for preset, implementation in CASES:
        models = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)) for _ in range(2)]
        opts = [kalmanopt.create(preset, m.parameters(), implementation=implementation, weight_decay=1e-3)
                for m in models]
        for _ in range(3):
            for model, opt in zip(models, opts):
                losses = F.cross_entropy(model(torch.randn(6, 3)), torch.randint(0, 2, (6,)), reduction="none")
                opt.zero_grad()
                losses.mean().backward()
                opt.step(loss=losses)
        copy.deepcopy(opts[0]).load_state_dict(opts[1].state_dict())
        assert opts[0].runtime is not opts[1].runtime
    assert _snapshot(containers) == before
    assert [dict(vars(e)) for e in engines] == engines_before
