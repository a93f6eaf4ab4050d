"""Where a dotted name of the repository is defined: its file and lines, found by parsing (stdlib only).

Used by the ``src`` role of ``sourcelinks.py`` (links from the documentation to the code) and by
the tests, which check that every such link in the documentation resolves.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

__all__ = ["locate", "source_targets", "SOURCE_ROLE", "TITLED"]

#: a ``src`` role in MyST (``{src}`...` ``) or reST (``:src:`...` ``); group "body" is its text
SOURCE_ROLE = re.compile(r"(?<!`)(?:\{src\}|:src:)`(?P<body>[^`\n]+)`")
#: the ``title <dotted.name>`` form of a role's text
TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[\w.]+)>$", re.S)


def source_targets(text: str) -> list[str]:
    """The dotted names that the ``src`` roles of ``text`` point at (``title <name>`` or ``name``)."""
    targets = []
    for match in SOURCE_ROLE.finditer(text):
        body = match["body"].strip()
        titled = TITLED.match(body)
        targets.append(titled["target"] if titled else body)
    return targets


def _module_file(root: Path, parts: list[str]) -> Path | None:
    """The file of the module ``parts`` (``a/b/c.py`` or ``a/b/c/__init__.py``), if any."""
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _assigned_names(node: ast.stmt) -> list[str]:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _find(body: list[ast.stmt], name: str) -> ast.stmt | None:
    """The last definition of ``name`` in ``body`` (a def, a class or an assignment)."""
    found = None
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = node
        elif name in _assigned_names(node):
            found = node
    return found


def locate(root: Path, dotted: str) -> tuple[Path, str, int, int]:
    """``(file, module name, first line, last line)`` of ``dotted``; ``LookupError`` when absent."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(root, parts[:cut])
        if path is None:
            continue
        module, rest = ".".join(parts[:cut]), parts[cut:]
        if not rest:
            return path, module, 1, len(path.read_text(encoding="utf-8").splitlines())
        body: list[ast.stmt] = _tree(path).body
        node: ast.stmt | None = None
        for name in rest:
            node = _find(body, name)
            if node is None:
                raise LookupError(f"{dotted!r}: no {name!r} in {path.relative_to(root)}")
            body = node.body if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else []
        assert node is not None
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return path, module, first, node.end_lineno or node.lineno
    raise LookupError(f"{dotted!r}: no module of it under {root} (looked for {'/'.join(parts[:1])}/...)")
