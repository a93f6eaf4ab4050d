"""Links from the documentation to the lines of code that implement it.

The role ``src`` (``:src:`...``` in reST docstrings, ``{src}`...``` in MyST pages) takes a dotted
name — a module, class, function, method or module-level constant of the repository, e.g.
``kalmanopt.covariance.product.ProductSurrogate._recursion`` or
``tests.test_properties.test_lowrank_with_memory_one_equals_koala_pp`` — finds its lines by
parsing the source file (nothing is imported) and links to them on a highlighted copy of the file
that this extension writes into the site, ``_source/<dotted path>.html``, one anchor ``L-<n>`` per
line. ``{src}`title <dotted.name>``` sets the link text. A name that does not exist is a build
warning (an error under ``-W``), so a renamed function cannot leave a dead link behind.

Line numbers are read at build time, so the links follow the code as it changes.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from codelocate import TITLED, locate
from docutils import nodes
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: top-level folders of the repository whose Python files get a source page
SOURCE_ROOTS = ("kalmanopt", "tests", "benchmarks")
SOURCE_DIR = "_source"


def _repo_root(app: Sphinx) -> Path:
    return Path(app.srcdir).resolve().parent


def source_role(name: str, rawtext: str, text: str, lineno: int, inliner: Any,
                options: dict | None = None, content: list | None = None) -> tuple[list, list]:
    """``{src}`[title <]dotted.name[>]``` → a link to the lines of ``dotted.name``."""
    env = inliner.document.settings.env
    match = TITLED.match(text.strip())
    title, target = (match["title"], match["target"]) if match else (None, text.strip())
    try:
        path, module, first, last = locate(_repo_root(env.app), target)
    except LookupError as err:
        logger.warning(f"src role: {err}", location=(env.docname, lineno), type="sourcelinks")
        return [nodes.literal(rawtext, target)], []
    relative = path.relative_to(_repo_root(env.app)).as_posix()
    lines = f"L{first}" if first == last else f"L{first}–{last}"
    if title:
        label = title
    else:
        label = relative if target == module else target.removeprefix(module + ".")
    depth = env.docname.count("/")
    uri = "../" * depth + f"{SOURCE_DIR}/{module.replace('.', '/')}.html#L-{first}"
    node = nodes.reference(rawtext, "", refuri=uri, classes=["src-link"])
    node += nodes.literal(label, label)
    node += nodes.Text(f" ({relative}:{lines})" if label != relative else f" ({lines})")
    return [node], []


def _source_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for top in SOURCE_ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            files.append((".".join(parts), path))
    return files


def collect_pages(app: Sphinx) -> Any:
    """One highlighted page per Python file, each line an anchor ``L-<n>``."""
    if app.builder.format != "html":
        return
    root = _repo_root(app)
    formatter = HtmlFormatter(cssclass="highlight source-listing", linenos="inline", linespans="L")
    for module, path in _source_files(root):
        code = path.read_text(encoding="utf-8")
        body = highlight(code, PythonLexer(), formatter)
        relative = path.relative_to(root).as_posix()
        heading = f"<h1>Source: <code>{html.escape(relative)}</code></h1>"
        note = ("<p>The file as it was when this site was built. Links from the documentation point at "
                "the first line of the code they cite.</p>")
        pagename = f"{SOURCE_DIR}/{module.replace('.', '/')}"
        yield pagename, {"title": relative, "body": heading + note + body, "parents": []}, "page.html"


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_role("src", source_role)
    app.connect("html-collect-pages", collect_pages)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
