"""docs/extending.md is executed: its code blocks run in order, and its plugin package is installed and used.

The page's Python blocks before the marker ``<!-- test_extending: a fresh process from here on -->``
run as one script in a subprocess (a clean registry). The blocks after it show a plugin package:
the captioned blocks are its files (``my_kalman.py``, ``pyproject.toml``), which are installed with
``pip install --target`` into a temporary folder, and the plain Python blocks run in a fresh process
that finds the package through its entry point. The page's runner fragment (a TOML block without a
caption) is checked there by the runner's config parser.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kalmanopt.runner.config import parse_toml

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"
MARKER = "<!-- test_extending: a fresh process from here on -->"

#: a fenced block: ```python / ```toml, or ```{code-block} LANG with ``:option: value`` lines first
_FENCE = re.compile(r"^```(?:\{code-block\}\s*)?(?P<lang>\w+)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_OPTION = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the page."""

    lang: str
    code: str
    caption: str | None
    fresh: bool  # after the marker: runs in the plugin's fresh process


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a MyST page, in order, with their ``:caption:`` if any."""
    marker = text.find(MARKER)
    out = []
    for match in _FENCE.finditer(text):
        lines = match["body"].splitlines()
        caption = None
        while lines and (option := _OPTION.match(lines[0])):
            if option["key"] == "caption":
                caption = option["value"].strip()
            lines.pop(0)
        code = "\n".join(lines).strip("\n") + "\n"
        out.append(Block(match["lang"], code, caption, marker >= 0 and match.start() > marker))
    return out


def _run(script: str, cwd: Path, extra_path: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in extra_path] + [str(ROOT)])
    env["MPLBACKEND"] = "Agg"
    path = cwd / "page_script.py"
    path.write_text(script, encoding="utf-8")
    return subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"the page's code failed:\n{result.stdout}\n{result.stderr}"


PAGE_BLOCKS = blocks(PAGE.read_text(encoding="utf-8"))


def test_the_page_has_the_blocks_this_test_runs() -> None:
    """Guards against a page edit that would leave the tests below running nothing."""
    assert PAGE.read_text(encoding="utf-8").count(MARKER) == 1
    main = [b for b in PAGE_BLOCKS if b.lang == "python" and b.caption is None and not b.fresh]
    assert len(main) >= 6, [b.code[:40] for b in main]
    captions = {b.caption for b in PAGE_BLOCKS if b.fresh and b.caption}
    assert captions == {"my_kalman.py", "pyproject.toml"}
    assert any(b.lang == "python" and b.caption is None and b.fresh for b in PAGE_BLOCKS)
    assert any(b.lang == "toml" and b.caption is None and b.fresh for b in PAGE_BLOCKS)


def test_blocks_reads_fences_captions_and_the_marker() -> None:
    text = (f"```python\na = 1\n```\ntext\n{MARKER}\n```{{code-block}} python\n:caption: m.py\n\nb = 2\n```\n"
            "```toml\nx = 1\n```\n")
    assert blocks(text) == [Block("python", "a = 1\n", None, False), Block("python", "b = 2\n", "m.py", True),
                            Block("toml", "x = 1\n", None, True)]


def test_the_pages_code_runs_in_order(tmp_path: Path) -> None:
    """The new surrogate: contract, engines, equal on reference and foreach, koala-diag at beta = 1, ..."""
    script = "\n\n".join(b.code for b in PAGE_BLOCKS if b.lang == "python" and b.caption is None and not b.fresh)
    result = _run(script, tmp_path, [])
    _check(result)
    out = result.stdout
    assert "loss after 20 steps: reference" in out
    assert "beta" in out and "valid" in out  # the range error printed by the page
    assert "does not meet the two-pass contract" in out  # the gain()-only prototype on foreach


def test_the_plugin_package_of_the_page_installs_and_runs_on_the_fast_engine(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="pip builds the page's package with setuptools")
    package = tmp_path / "my-kalman"
    package.mkdir()
    for block in PAGE_BLOCKS:
        if block.fresh and block.caption:
            (package / block.caption).write_text(block.code, encoding="utf-8")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "--target", str(site), str(package)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / "my_kalman.py").is_file()
    entry_points = list(site.glob("*.dist-info/entry_points.txt"))
    assert len(entry_points) == 1 and "kalmanopt.plugins" in entry_points[0].read_text()

    fragments = [parse_toml(b.code) for b in PAGE_BLOCKS if b.fresh and b.lang == "toml" and b.caption is None]
    code = "\n\n".join(b.code for b in PAGE_BLOCKS if b.fresh and b.lang == "python" and b.caption is None)
    # the runner fragment, completed to a config, must pass the runner's checks in the same process
    code += ("\n\nfrom kalmanopt.runner import parse_config\n"
             f"for fragment in {fragments!r}:\n"
             "    config = parse_config({'name': 'page', 'task': 'digits', 'model': 'mlp', 'seeds': [0],\n"
             "                           'epochs': 1, **fragment})\n"
             "    config.check()\n"
             "print('runner fragment ok')\n")
    work = tmp_path / "elsewhere"  # not the package's folder: the import must come from the installed copy
    work.mkdir()
    result = _run(code, work, [site])
    _check(result)
    assert "my_kalman" in result.stdout and "runner fragment ok" in result.stdout


_FUSED_CHECK = '''
from kalmanopt.engines import available_implementations, resolve_engine


def run(implementation, steps=6):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).cuda()
    opt = kalmanopt.KalmanOptimizer(net.parameters(), kalmanopt.compose(surrogate="forgetting-diagonal"),
                                    implementation=implementation, sigma=0.1, q=0.01, beta=0.9, lr=0.5)
    engine = resolve_engine(opt.filter, opt.param_groups[0]).name
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=gen).cuda(), torch.randn(12, 4, generator=gen).cuda()
        losses = (net(x) - y).pow(2).mean(1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu(), engine


group = kalmanopt.KalmanOptimizer(torch.nn.Linear(2, 2).cuda().parameters(),
                                  kalmanopt.compose(surrogate="forgetting-diagonal")).param_groups[0]
assert available_implementations(kalmanopt.compose(surrogate="forgetting-diagonal"), group)["fused"] is None
reference, _ = run("reference")
for implementation in ("fused", None, "foreach"):
    theta, engine = run(implementation)
    assert engine == (implementation or "fused"), (implementation, engine)
    error = float((theta - reference).abs().max() / reference.abs().max())
    print(f"{engine}: relative difference to the reference engine {error:.2e}")
    assert error <= 1e-5, (engine, error)
'''


@pytest.mark.gpu
def test_the_pages_part_runs_on_the_fused_engine_equal_to_its_reference(tmp_path: Path) -> None:
    """On CUDA the page's surrogate runs as generated Triton kernels, unchanged (float32, 1e-5 relative)."""
    part = next(b for b in PAGE_BLOCKS if b.lang == "python" and b.caption is None and not b.fresh)
    assert "class ForgettingDiagonal" in part.code
    result = _run(part.code + _FUSED_CHECK, tmp_path, [])
    _check(result)
    assert "fused: relative difference" in result.stdout


def test_the_pages_part_traces_whole_for_the_fused_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's coefficients trace into one graph (what the fused engine compiles) and equal the eager ones."""
    import torch
    from test_compiled_coefficients import _Graphs, _patch

    import kalmanopt
    from kalmanopt.engines.compiled import CompiledCoefficients

    part = next(b for b in PAGE_BLOCKS if b.lang == "python" and b.caption is None and not b.fresh)
    namespace: dict = {}
    with monkeypatch.context() as m:
        m.setattr(kalmanopt.registry, "_PARTS", {k: dict(v) for k, v in kalmanopt.registry._PARTS.items()})
        exec(compile(part.code, "extending.md", "exec"), namespace)  # noqa: S102 - the page's own code
        composition = kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(),
                                            namespace["ForgettingDiagonal"]())
    backend = _Graphs()
    calls = _patch(monkeypatch, CompiledCoefficients(backend=backend, fullgraph=True))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = kalmanopt.KalmanOptimizer(model.parameters(), composition, implementation="foreach", sigma=0.1, q=0.01,
                                    beta=0.9, lr=0.5)
    for _ in range(3):
        losses = (model(torch.randn(8, 4)) ** 2).mean(dim=1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses.detach())
    assert calls["update"] == 3 and backend.count >= 1
