"""A checkpoint written by the first core (commit 3e8389b, before the step plan) still loads and continues.

``fixtures/v1_state_dicts.pt`` holds, per preset, the model's and the optimizer's state after three steps of
the old code and the parameters after two more of its steps (``fixtures/make_v1_state_dicts.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kalmanopt

FIXTURE = Path(__file__).parent / "fixtures" / "v1_state_dicts.pt"
_fixtures = Path(__file__).parent / "fixtures"


def _load_maker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_v1_state_dicts", _fixtures / "make_v1_state_dicts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _load_maker()
SAVED = torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("implementation", ["reference", "foreach"])
@pytest.mark.parametrize("name", MAKER.PRESETS)
def test_v1_state_dict_loads_and_continues_as_before(name: str, implementation: str) -> None:
    entry = SAVED[name]
    net = MAKER.model()
    net.load_state_dict(entry["model"])
    opt = kalmanopt.create(name, net.parameters(), weight_decay=1e-3, implementation=implementation)
    state = entry["optimizer"]
    for group in state["param_groups"]:
        group["implementation"] = implementation
    opt.load_state_dict(state)
    MAKER.train(opt, net, range(3, 5))
    for p, expected in zip(net.parameters(), entry["continued"]):
        # (to float32 rounding: the torch engines now fuse an axpy's product and write a result straight into its
        # state vector, which moves a last bit here and there)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
