"""The documentation's own machinery: links from the docs to the code, and the site checker.

The site itself is built (with warnings as errors) and checked in a browser by .ci/run; these
tests cover the parts that can be checked in a second: every ``src`` link of the documentation
names code that exists, and the link and rendering checks of docs/check_site.py catch what they
are meant to catch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS))

import check_site  # noqa: E402  (docs/check_site.py)
from codelocate import locate, source_targets  # noqa: E402  (docs/_ext/codelocate.py)


def _line(path: Path, number: int) -> str:
    return path.read_text(encoding="utf-8").splitlines()[number - 1]


def test_locate_finds_the_lines_of_methods_functions_constants_and_modules() -> None:
    path, module, first, last = locate(ROOT, "kalmanopt.covariance.product.ProductSurrogate.coefficients")
    assert path == ROOT / "kalmanopt" / "covariance" / "product.py"
    assert module == "kalmanopt.covariance.product"
    assert _line(path, first).lstrip().startswith("def coefficients(")
    assert last > first and _line(path, last + 1).strip() == ""  # the whole body, not more

    path, _, first, last = locate(ROOT, "kalmanopt.measurement.SKIP_GRAD_NORM")
    assert first == last and _line(path, first).startswith("SKIP_GRAD_NORM =")

    path, _, first, _ = locate(ROOT, "kalmanopt.registry.register_part")
    assert _line(path, first).startswith("def register_part(")

    path, module, first, last = locate(ROOT, "kalmanopt.covariance")  # a package: its __init__.py
    assert path.name == "__init__.py" and module == "kalmanopt.covariance" and first == 1
    assert last == len(path.read_text(encoding="utf-8").splitlines())


def test_locate_starts_a_decorated_definition_at_its_decorator() -> None:
    path, _, first, _ = locate(ROOT, "kalmanopt.filters.koala.koala_pp")
    assert _line(path, first).startswith("@"), _line(path, first)


@pytest.mark.parametrize("name, missing", [
    ("kalmanopt.covariance.product.ProductSurrogate.no_such_method", "'no_such_method'"),
    ("kalmanopt.no_such_module.f", "no 'no_such_module' in kalmanopt/__init__.py"),
    ("no_such_package", "no module"),
])
def test_locate_names_what_does_not_exist(name: str, missing: str) -> None:
    with pytest.raises(LookupError, match=missing):
        locate(ROOT, name)


def test_source_targets_reads_both_role_syntaxes_and_titles() -> None:
    text = "see {src}`kalmanopt.api.create` and :src:`the loop <kalmanopt.reference.ReferenceImplementation>`"
    assert source_targets(text) == ["kalmanopt.api.create", "kalmanopt.reference.ReferenceImplementation"]
    assert source_targets("the `{src}` role and the `:src:` role link to code") == []  # mentions, not roles


def test_every_source_link_of_the_documentation_names_existing_code() -> None:
    """A renamed function would otherwise only be noticed by the (slow) site build."""
    files = sorted(DOCS.glob("*.md")) + sorted((DOCS / "tutorials").glob("*.py"))
    targets = {(f.name, t) for f in files for t in source_targets(f.read_text(encoding="utf-8"))}
    assert len(targets) > 50  # the derivation alone links every equation
    unresolved = []
    for filename, target in sorted(targets):
        try:
            locate(ROOT, target)
        except LookupError as err:
            unresolved.append(f"{filename}: {err}")
    assert not unresolved, "\n".join(unresolved)


def _site(tmp_path: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        page = tmp_path / name
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"<html><body>{body}</body></html>", encoding="utf-8")
    return tmp_path


def test_link_checker_reports_missing_files_and_anchors_and_skips_external_links(tmp_path: Path) -> None:
    site = _site(tmp_path, {
        "index.html": '<a href="sub/page.html#here">ok</a> <a href="sub/page.html#gone">bad anchor</a> '
                      '<a href="missing.html">bad file</a> <a href="#top">self</a> <span id="top"></span> '
                      '<a href="https://example.org/x">external</a> <img src="img/a.png"> '
                      '<a href="../outside.html">outside</a>',
        "sub/page.html": '<h1 id="here">Here</h1><a href="../index.html">back</a> <a href="./">folder</a>',
        "sub/index.html": "<p>folder index</p>",
    })
    (site / "img").mkdir()
    (site / "img" / "a.png").write_bytes(b"png")
    problems, internal, external = check_site.broken_links(site)
    assert external == 1 and internal == 8
    assert len(problems) == 3, problems
    assert any("#gone" in p for p in problems)
    assert any("missing.html" in p for p in problems)
    assert any("outside the site" in p for p in problems)


def test_link_checker_passes_a_site_without_broken_links(tmp_path: Path) -> None:
    site = _site(tmp_path, {"index.html": '<a href="a.html#x">a</a>', "a.html": '<p id="x">x</p>'})
    assert check_site.broken_links(site) == ([], 1, 0)


_PAGE = check_site.PageCheck("derivation.html", "The derivation", min_text=20, math=True)


def _dom(heading: str, text: str, math: str) -> str:
    return f"<html><body><article><h1>{heading}<a href='#'>#</a></h1><p>{text}</p>{math}</article></body></html>"


def test_rendering_check_accepts_typeset_math_and_rejects_untypeset_or_failed_math() -> None:
    typeset = '<mjx-container class="MathJax" jax="SVG"><svg><g data-mml-node="math"></g></svg></mjx-container>'
    assert check_site.check_rendered(_dom("The derivation", "x" * 30, typeset), "", _PAGE) == []

    raw = _dom("The derivation", "x" * 30, r"<div class='math'>$$ \theta_k $$</div>")
    assert any("no mjx-container" in p for p in check_site.check_rendered(raw, "", _PAGE))

    failed = typeset.replace('data-mml-node="math"', 'data-mml-node="merror"')
    assert any("MathJax reported 1 error" in p
               for p in check_site.check_rendered(_dom("The derivation", "x" * 30, failed), "", _PAGE))


def test_rendering_check_rejects_a_wrong_heading_an_empty_page_and_script_errors() -> None:
    problems = check_site.check_rendered(_dom("Something else", "", ""), 'CONSOLE:1] "Uncaught TypeError: x"',
                                         check_site.PageCheck("index.html", "kalmanopt", min_text=20))
    assert len(problems) == 3, problems
    assert "first heading" in problems[0] and "characters of text" in problems[1] and "Uncaught" in problems[2]


def test_the_browser_check_says_when_it_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path / "site", {"index.html": '<h1>kalmanopt</h1><a href="index.html">home</a>'})
    monkeypatch.setenv("PATH", str(tmp_path / "no-browsers-here"))
    monkeypatch.delenv("CHROMIUM", raising=False)
    assert check_site.find_browser() is None
    assert check_site.main([str(site)]) == 0
    out = capsys.readouterr().out
    assert "browser check SKIPPED: no Chromium found" in out and "check_site: passed" in out


def test_the_checker_fails_on_a_broken_link_and_on_a_missing_site(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path / "site", {"index.html": '<a href="nowhere.html">x</a>'})
    assert check_site.main([str(site), "--no-browser"]) == 1
    assert check_site.main([str(tmp_path / "not-built")]) == 1
    assert "FAILED" in capsys.readouterr().out
