"""Checks the built documentation site: every internal link, and a few pages in a real browser.

Usage (after building the site into docs/_build/html)::

    python docs/check_site.py                   # links, then the browser check if Chromium is found
    python docs/check_site.py --browser PATH    # a given Chromium/Chrome binary
    python docs/check_site.py --no-browser      # links only

1. **Links** (Python's standard library only): every ``href`` and ``src`` of every HTML page of the
   site that points inside the site must name an existing file, and a ``#fragment`` must name an
   ``id`` (or ``name``) on the target page. External links (``http:``, ``mailto:``, ...) are not
   followed: the check runs offline.
2. **Rendering** (headless Chromium, when one is installed): the home page, the first tutorial,
   the API reference, the derivation, the design and the extending page are opened; each must
   have its title heading and its main text once the page's scripts have run, no uncaught
   JavaScript error, and — on the pages
   with equations — MathJax must have typeset them (``mjx-container`` elements, none of them a
   MathJax error). Without a browser this part prints a line saying it was skipped.

Exits 1 when a check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_SITE = Path(__file__).resolve().parent / "_build" / "html"
#: names of a Chromium binary, tried in this order on PATH (Debian's package installs ``chromium``)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@dataclass(frozen=True)
class PageCheck:
    """A page to open in the browser and what it must show."""

    path: str
    heading: str  # text the page's first <h1> must contain
    min_text: int = 200  # characters of visible text in the page's <article> at least
    math: bool = False  # whether MathJax must have typeset equations on it


#: the pages the browser opens: the home page, one tutorial, the API page, the derivation, the design
#: (its diagram and the part contract) and the extending page (its executed example)
PAGES = (
    PageCheck("index.html", "kalmanopt"),
    PageCheck("auto_tutorials/plot_01_training_as_state_estimation.html", "Training as state estimation", math=True),
    PageCheck("api.html", "API reference"),
    PageCheck("derivation.html", "From the extended Kalman filter to each preset", math=True),
    PageCheck("design.html", "Design: parts, compositions", math=True),
    PageCheck("extending.html", "Extending kalmanopt: a new fast part", math=True),
)


# ---------------------------------------------------------------------------------------- links
class _LinksAndIds(HTMLParser):
    """Collects the link targets (href, src) and the anchors (id, name) of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is None:
                continue
            if key in ("id", "name") and tag != "meta":
                self.ids.add(value)
            elif (key == "href" and tag in ("a", "link", "area")) or (key == "src" and tag in ("img", "script")):
                self.links.append(value)


def _parse(path: Path, cache: dict[Path, _LinksAndIds]) -> _LinksAndIds:
    if path not in cache:
        parser = _LinksAndIds()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        cache[path] = parser
    return cache[path]


def broken_links(site: Path) -> tuple[list[str], int, int]:
    """Check every internal link of every page under ``site``.

    Returns:
        (problems, internal links checked, external links not followed); each problem names the
        page, the link and what is wrong.
    """
    site = site.resolve()
    cache: dict[Path, _LinksAndIds] = {}
    problems: list[str] = []
    internal = external = 0
    for page in sorted(site.rglob("*.html")):
        for link in _parse(page, cache).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:  # http:, https:, mailto:, data:, javascript:, //host
                external += 1
                continue
            internal += 1
            where = f"{page.relative_to(site)}: {link!r}"
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if site not in target.parents and target != site:
                problems.append(f"{where} points outside the site")
                continue
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{where}: no file {target.relative_to(site)}")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html" and fragment not in _parse(target, cache).ids:
                problems.append(f"{where}: no anchor #{fragment} in {target.relative_to(site)}")
    return problems, internal, external


# -------------------------------------------------------------------------------------- browser
def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium binary to use: ``explicit``, ``$CHROMIUM``, or the first of :data:`BROWSERS` on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), *BROWSERS):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    return None


def render(browser: str, page: Path, timeout: float = 60.0) -> tuple[str, str]:
    """Open ``page`` in headless Chromium, let its scripts run; return (the DOM after them, console log)."""
    with tempfile.TemporaryDirectory(prefix="check-site-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}",
                   "--virtual-time-budget=15000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                   page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{browser} exited with {done.returncode} on {page.name}: {done.stderr[-800:]}")
    return done.stdout, done.stderr


class _Text(HTMLParser):
    """The first <h1>'s text and the visible text inside <article>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.h1: str | None = None
        self.article_text: list[str] = []
        self._in_h1 = self._in_article = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h1" and self.h1 is None:
            self._in_h1, self.h1 = 1, ""
        if tag == "article":
            self._in_article += 1
        if tag in ("script", "style", "mjx-assistive-mml", "svg"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = 0
        if tag == "article":
            self._in_article -= 1
        if tag in ("script", "style", "mjx-assistive-mml", "svg"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if self._in_h1 and self.h1 is not None:
            self.h1 += data
        if self._in_article and not self._skip:
            self.article_text.append(data)


def check_rendered(dom: str, console: str, check: PageCheck) -> list[str]:
    """What is wrong with a page as the browser rendered it (``dom``, its console log); [] if nothing."""
    problems = []
    text = _Text()
    text.feed(dom)
    heading = re.sub(r"\s+", " ", (text.h1 or "")).replace("#", "").strip()
    if check.heading.lower() not in heading.lower():
        problems.append(f"{check.path}: first heading is {heading!r}, expected it to contain {check.heading!r}")
    visible = len(re.sub(r"\s+", " ", "".join(text.article_text)).strip())
    if visible < check.min_text:
        problems.append(f"{check.path}: only {visible} characters of text in <article> (expected ≥ {check.min_text})")
    errors = [line for line in console.splitlines() if "Uncaught" in line]
    if errors:
        problems.append(f"{check.path}: JavaScript error: {errors[0].strip()[:300]}")
    if check.math:
        typeset = len(re.findall(r"<mjx-container\b", dom))
        failed = len(re.findall(r"<(?:g|mjx-merror)\b[^>]*data-mml-node=\"merror\"|<mjx-merror\b", dom))
        if typeset == 0:
            problems.append(f"{check.path}: MathJax typeset no equation (no mjx-container element)")
        if failed:
            problems.append(f"{check.path}: MathJax reported {failed} error(s) in equations")
    return problems


def browser_checks(site: Path, browser: str, pages: tuple[PageCheck, ...] = PAGES) -> tuple[list[str], list[str]]:
    """Render ``pages``; returns (problems, one summary line per page)."""
    problems, lines = [], []
    for check in pages:
        page = site / check.path
        if not page.is_file():
            problems.append(f"{check.path}: not built")
            continue
        try:
            dom, console = render(browser, page)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            problems.append(f"{check.path}: {err}")
            continue
        found = check_rendered(dom, console, check)
        problems += found
        math = f", {len(re.findall(r'<mjx-container', dom))} equations typeset" if check.math else ""
        lines.append(f"  {check.path}: {'FAILED' if found else 'ok'}{math}")
    return problems, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=DEFAULT_SITE, help="the built site (docs/_build/html)")
    parser.add_argument("--browser", help="a Chromium or Chrome binary (default: $CHROMIUM, then chromium on PATH)")
    parser.add_argument("--no-browser", action="store_true", help="check the links only")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"check_site: no site at {args.site} (build it first: "
              "python -m sphinx -W --keep-going -b html docs docs/_build/html)", file=sys.stderr)
        return 1

    problems, internal, external = broken_links(args.site)
    print(f"check_site: links: {internal} internal links checked, {len(problems)} broken; "
          f"{external} external links not followed")
    if args.no_browser:
        print("check_site: browser check SKIPPED (--no-browser)")
    else:
        browser = find_browser(args.browser)
        if browser is None:
            print("check_site: browser check SKIPPED: no Chromium found (tried $CHROMIUM, "
                  f"{', '.join(BROWSERS)}; on Debian: apt-get install chromium)")
        else:
            found, lines = browser_checks(args.site, browser)
            print(f"check_site: browser: {len(PAGES)} pages rendered with {browser}, {len(found)} problem(s)")
            print("\n".join(lines))
            problems += found
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    print(f"check_site: {'FAILED' if problems else 'passed'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
