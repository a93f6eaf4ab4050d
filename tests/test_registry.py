"""The registry: parts and presets by name, compositions from names, plugins from entry points."""

from __future__ import annotations

import sys
import textwrap
from importlib import metadata

import pytest
import torch

import kalmanopt
from kalmanopt import registry

PLUGIN_MODULE = '''
"""A third-party package: a fixed-covariance surrogate, P = sigma I forever (no posterior)."""
import torch
import kalmanopt


class FixedCovariance(kalmanopt.CovarianceSurrogate):
    hyperparameters = (kalmanopt.HyperParameter("sigma", 0.5, kalmanopt.Range(0.0, low_open=True)),)

    def gain(self, ctx, layer_state, H, g, R, hp):
        # S = sigma ‖H‖² + R;  K = sigma H / S
        S = hp["sigma"] * torch.dot(H, H) + R
        return kalmanopt.Gain(direction=H, coefficients=(hp["sigma"] / S).reshape(1), S=S)


def register():
    kalmanopt.register_part("surrogate", "fixed-covariance", FixedCovariance, replace=True)

    @kalmanopt.register_preset("fixed-kalman", replace=True)
    def fixed_kalman():
        """A Kalman step with a covariance that never learns."""
        return kalmanopt.compose(surrogate="fixed-covariance", name="fixed-kalman")
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Install a plugin package (module + dist-info with an entry point) on sys.path."""
    (tmp_path / "kalmanopt_fixed_plugin.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "kalmanopt_fixed_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kalmanopt-fixed-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [kalmanopt.plugins]
        fixed = kalmanopt_fixed_plugin:register
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    for kind in registry.PART_KINDS:
        registry._PARTS[kind].pop("fixed-covariance", None)
    registry._PRESETS.pop("fixed-kalman", None)
    sys.modules.pop("kalmanopt_fixed_plugin", None)


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 8, generator=g)
    y = X @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(256, 1, generator=g)
    return X, y


def _train(opt, model, X, y, steps=60):
    for _ in range(steps):
        losses = ((model(X) - y) ** 2).squeeze(1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    with torch.no_grad():
        return float(((model(X) - y) ** 2).mean())


def test_plugin_entry_point_registers_a_surrogate_that_trains_without_optimizer_changes(installed_plugin):
    assert "fixed-kalman" in kalmanopt.presets()  # the lookup loads the entry point
    assert "fixed-covariance" in kalmanopt.parts("surrogate")
    X, y = _regression()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        before = float(((model(X) - y) ** 2).mean())
    opt = kalmanopt.create("fixed-kalman", model.parameters(), sigma=0.5, lr=0.5)
    after = _train(opt, model, X, y)
    assert after < 0.1 * before


def test_broken_plugin_warns_and_is_skipped(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kalmanopt.plugins]\nbroken = no_such_module_anywhere:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="broken"):
        names = kalmanopt.presets()
    assert "koala++" in names


def test_compose_by_names_equals_the_preset():
    X, y = _regression(1)
    results = []
    for make in (lambda p: kalmanopt.create("koala++-ns", p, sigma=0.2, q=0.05),
                 lambda p: kalmanopt.KalmanOptimizer(p, kalmanopt.compose(surrogate="product", estimator="vanilla"),
                                                     sigma=0.2, q=0.05)):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        results.append(_train(make(model.parameters()), model, X, y, steps=10))
    assert results[0] == results[1]


def test_compose_rejects_unknown_names_and_misfits():
    with pytest.raises(ValueError, match="valid choices: .*product"):
        kalmanopt.compose(surrogate="nope")
    with pytest.raises(ValueError, match="momentum"):
        kalmanopt.compose(surrogate="block", dynamics="random_walk")
    with pytest.raises(ValueError, match="takes no least-squares estimator"):
        kalmanopt.compose(surrogate="scalar", estimator="vanilla")
    with pytest.raises(TypeError, match="unknown option"):
        kalmanopt.compose(surrogate="product", memory=3)


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        kalmanopt.register_part("surrogate", "product", kalmanopt.DiagonalSurrogate)
    with pytest.raises(ValueError, match="valid kinds"):
        kalmanopt.register_part("nonsense", "x", kalmanopt.DiagonalSurrogate)


def test_every_preset_lists_its_keywords_and_builds():
    assert kalmanopt.presets() == sorted(["koala-v", "koala-m", "koala++", "koala++-ns", "koala-diag", "koala++-lr",
                                          "koala-factored", "koala-kron",
                                          "koala-adam", "koala-adam-riccati", "koala-adam-innovation",
                                          "koala-adam-steady", "koala-adam-eigen"])
    for name in kalmanopt.presets():
        keywords = kalmanopt.preset_keywords(name)
        assert {"lr", "weight_decay", "r", "alpha_r"} <= set(keywords)
        opt = kalmanopt.create(name, torch.nn.Linear(2, 2).parameters())
        assert isinstance(opt, torch.optim.Optimizer)
    assert kalmanopt.preset_keywords("koala++-lr")["memory"] == 2
    assert {"sw", "sc", "sv", "a", "qw", "qv"} <= set(kalmanopt.preset_keywords("koala-m"))


def test_entry_point_group_name_is_public():
    assert registry.ENTRY_POINT_GROUP == "kalmanopt.plugins"
    assert isinstance(metadata.entry_points(group=registry.ENTRY_POINT_GROUP), metadata.EntryPoints)
