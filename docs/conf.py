"""Sphinx configuration of the kalmanopt documentation site.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Why these tools: Sphinx with autodoc + napoleon reads the Google-style docstrings the code already
has, MyST keeps the existing Markdown pages as they are (with ``$$`` math and labels), and
sphinx-gallery runs the tutorials as plain Python scripts at build time, the way PyTorch,
scikit-learn and optax publish theirs. MkDocs Material + mkdocstrings would also do; Sphinx was
chosen because its cross-references (``:ref:``, ``:eq:``, ``:class:``) work from docstrings too,
which is what links the code to the derivation.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
sys.path.insert(0, str(DOCS / "_ext"))

os.environ.setdefault("MPLBACKEND", "Agg")

import architecture  # noqa: E402  (docs/_ext/architecture.py)

import kalmanopt  # noqa: E402

project = "kalmanopt"
author = "the kalmanopt authors"
copyright = "the kalmanopt authors, MIT licence"
release = version = kalmanopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sourcelinks",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "tutorials/*.md", "**/GALLERY_HEADER.rst", "**.ipynb", "**.py.md5"]
templates_path = ["_templates"]

# --- MyST: the Markdown pages --------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# --- API reference -------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: a dataclass's fields are documented once
autodoc_mock_imports = ["triton"]  # the fused kernels' module imports Triton, absent on CPU builds
add_module_names = False

# --- the tutorials -------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "tutorials",
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "reference_url": {"kalmanopt": None},
    "show_memory": False,
    "min_reported_time": 1,
}

# --- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"kalmanopt {release}"
html_static_path = ["_static"]
html_css_files = ["source.css"]
html_show_sourcelink = False

# MathJax is served from the site itself (the SVG build of MathJax 3, from the `docs` extra's
# django-static-mathjax wheel, which is MathJax's files and nothing else), so the pages typeset
# their math offline too. Without that package Sphinx's default, MathJax from a CDN, is used.
try:
    _mathjax = resources.files("mathjax") / "static" / "mathjax" / "es5" / "tex-svg.js"
except ModuleNotFoundError:
    _mathjax = None
if _mathjax is not None and _mathjax.is_file():
    _static_mathjax = DOCS / "_build" / "mathjax-static"
    (_static_mathjax / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(_mathjax), _static_mathjax / "mathjax" / "tex-svg.js")
    html_static_path.append(str(_static_mathjax))
    mathjax_path = "mathjax/tex-svg.js"

# The architecture diagram of design.md, drawn by a script of this folder (matplotlib, SVG).
architecture.draw(DOCS / "img" / "architecture.svg")


# --- plain-text formulas in docstrings -----------------------------------------------------------
_INTRO = re.compile(r"^(?P<indent>\s*)(?![:.]{1,2}\S)(?P<text>\S.*[^:]):$")


def literal_formula_blocks(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Show the code's indented plain-text formula blocks as they are written.

    The docstrings write equations as a paragraph ending in ``:``, a blank line and an indented
    block (``v_k = (α_k − λ_k) v_{k-1} + ...``), readable in a terminal. reST would make that
    block a quotation and run its lines together; ending the paragraph with ``::`` instead makes
    it a literal block, line for line. Runs after napoleon, so ``Args:`` and the like are gone.
    """
    for i in range(len(lines) - 2):
        match = _INTRO.match(lines[i])
        if not match or lines[i + 1].strip():
            continue
        following = next((line for line in lines[i + 2:] if line.strip()), "")
        if len(following) - len(following.lstrip()) > len(match["indent"]):
            lines[i] = lines[i] + ":"


def source_of_reexports(app: Any, modname: str, fullname: str) -> str | None:
    """viewcode: link a re-exported name's source from the page of the module that defines it only.

    ``kalmanopt.optimizer`` re-exports ``NonFiniteError`` of ``kalmanopt.engines.driver`` and both
    pages document it. viewcode would give the definition's source page one back-link, named after
    the first module it met but pointing at the page it met last (an anchor that does not exist).
    Where the defining module documents the name itself (its ``__all__``), the re-exporting page
    gets no source link; every other name follows the import as usual (``None``).
    """
    import importlib

    try:
        obj: Any = importlib.import_module(modname)
        for part in fullname.split("."):
            obj = getattr(obj, part)
        home = importlib.import_module(obj.__module__)
    except (ImportError, AttributeError, TypeError):
        return None
    top = fullname.split(".")[0]
    if home.__name__ != modname and top in getattr(home, "__all__", ()):
        return modname  # (a module without the name's source: no link from this page)
    return None


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", literal_formula_blocks)
    app.connect("viewcode-follow-imported", source_of_reexports)
