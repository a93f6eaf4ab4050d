"""A part's declarations are checked when a composition is built: a mistake is refused at ``compose`` (or,
for a surrogate written per layer, the first time its gain is made, before any weight changes), naming the
part and the name, rather than surfacing as a bare ``KeyError`` or size mismatch at the first step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import kalmanopt
from kalmanopt.plan import DeclarationError
from kalmanopt.program import Assign, Coef, Reduction, State, Vec
from kalmanopt.state import ScalarState, StateTable, VectorState


class _Diagonal(kalmanopt.DiagonalSurrogate):
    """The diagonal surrogate with one declaration changed by each test below."""


def _compose(surrogate: kalmanopt.CovarianceSurrogate) -> kalmanopt.Composition:
    return kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(), surrogate, name="probe")


def test_an_honest_subclass_composes() -> None:
    composition = _compose(_Diagonal())
    assert composition.contract_gap is None


def test_a_reduction_over_a_vector_nobody_makes_is_refused_with_its_name() -> None:
    class Typo(_Diagonal):
        def reductions(self, hp: Any, diagnostics: bool = False) -> tuple[Reduction, ...]:
            return (Reduction("pHH", State("p") * Vec("Hh") * Vec("H")),)

    with pytest.raises(DeclarationError, match=r"surrogate Typo's reduction 'pHH' sums over the vector 'Hh'"):
        _compose(Typo())


def test_a_reduction_over_undeclared_state_is_refused() -> None:
    class Forgot(_Diagonal):
        def reductions(self, hp: Any, diagnostics: bool = False) -> tuple[Reduction, ...]:
            return (Reduction("pHH", State("variance") * Vec("H") * Vec("H")),)

    with pytest.raises(DeclarationError, match=r"state vector 'variance', which no part declares.*'p'"):
        _compose(Forgot())


def test_a_program_writing_undeclared_state_is_refused_with_its_name() -> None:
    class Writer(_Diagonal):
        def program(self, hp: Any) -> list[Assign]:
            return super().program(hp) + [Assign(State("trace"), Vec("H") * Vec("H"))]

    with pytest.raises(DeclarationError, match=r"writes the state vector 'trace'.*add a VectorState"):
        _compose(Writer())


def test_a_coefficient_nobody_provides_is_refused_with_who_could() -> None:
    class Reader(_Diagonal):
        def program(self, hp: Any) -> list[Assign]:
            return super().program(hp) + [Assign(Vec("extra"), Coef("S_prev") * Vec("H"))]

    with pytest.raises(DeclarationError, match=r"reads the coefficient 'S_prev', which no part provides.*'sigma'"):
        _compose(Reader())


def test_a_gain_of_the_wrong_length_is_refused() -> None:
    class TwoComponents(_Diagonal):
        def coefficients(self, b: Any) -> None:
            super().coefficients(b)
            b.gain = b.gain * 2

    with pytest.raises(DeclarationError, match=r"gain of 2 component\(s\).*RandomWalk has 1"):
        _compose(TwoComponents())


def test_a_gain_of_the_wrong_shape_is_refused() -> None:
    class Wide(_Diagonal):
        def coefficients(self, b: Any) -> None:
            super().coefficients(b)
            b.gain = [torch.ones(len(b.numel), 3, dtype=b.like.dtype)]

    with pytest.raises(DeclarationError, match=r"gain component 0 has shape \(2, 3\)"):
        _compose(Wide())


def test_coefficients_reading_an_undeclared_sum_name_the_part_and_the_sum() -> None:
    class Peek(_Diagonal):
        def coefficients(self, b: Any) -> None:
            b.red["HvH"]  # noqa: B018 - a sum no part declares
            super().coefficients(b)

    with pytest.raises(DeclarationError, match=r"surrogate Peek's coefficients reads the per-layer sum 'HvH'.*'pHH'"):
        _compose(Peek())


def test_coefficients_writing_undeclared_layer_state_are_refused() -> None:
    class Stray(_Diagonal):
        def state_table(self) -> StateTable:
            return super().state_table() + StateTable(scalars=(ScalarState("S", 0.0),))

        def coefficients(self, b: Any) -> None:
            super().coefficients(b)
            b.new_layer["S_old"] = b.S

    with pytest.raises(DeclarationError, match=r"per-layer scalar state 'S_old', which no part declares.*'S'"):
        _compose(Stray())


def test_the_registry_refuses_the_same_mistakes_at_compose() -> None:
    @kalmanopt.register_part("surrogate", "test-declarations-typo")
    class RegisteredTypo(_Diagonal):
        def reductions(self, hp: Any, diagnostics: bool = False) -> tuple[Reduction, ...]:
            return (Reduction("pHH", State("p") * Vec("gg")),)

    with pytest.raises(DeclarationError, match="'gg'"):
        kalmanopt.compose(surrogate="test-declarations-typo")


def test_every_preset_passes_the_checks() -> None:
    for name in kalmanopt.presets():
        assert kalmanopt.get_preset(name).build() is not None


# ---------------------------------------------------------------------- surrogates written per layer
class _PerLayer(kalmanopt.CovarianceSurrogate):
    """KOALA-V's scalar gain written per layer (``gain()``), its direction shape chosen by the test."""

    hyperparameters = (kalmanopt.HyperParameter("sigma", 0.1, kalmanopt.Range(0.0), "P_0"),)

    def __init__(self, wrong_from: int | None = None, what: str = "direction") -> None:
        self.wrong_from, self.what = wrong_from, what
        self.calls = 0

    def state_table(self) -> StateTable:
        return StateTable(vectors=(VectorState("seen", 0.0),))

    def gain(self, ctx: Any, layer_state: dict, H: torch.Tensor, g: torch.Tensor, R: torch.Tensor, hp: Any) -> Any:
        wrong = self.wrong_from is not None and self.calls >= self.wrong_from
        self.calls += 1
        layer_state["seen"] = layer_state.get("seen", torch.zeros_like(H)) + 1  # a posterior a refused step must undo
        S = 0.1 * H.dot(H) + R
        direction = H[:-1] if wrong and self.what == "direction" else H
        coefficients = (0.1 / S).repeat(2 if wrong and self.what == "coefficients" else 1)
        return kalmanopt.Gain(direction=direction, coefficients=coefficients, S=S)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    losses = F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)), reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)


@pytest.mark.parametrize("wrong_from,what", [(4, "direction"), (5, "direction"), (7, "coefficients")])
def test_a_per_layer_gain_of_the_wrong_shape_is_refused_before_any_weight_changes(wrong_from: int,
                                                                                   what: str) -> None:
    """The second step's gains are wrong from its first, second or last layer on (four layers a step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    composition = _compose(_PerLayer(wrong_from, what))
    opt = kalmanopt.KalmanOptimizer(model.parameters(), composition, q=0.0, r=None)
    _step(model, opt)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(DeclarationError, match=r"_PerLayer's gain\(\) for group0/param\d"):
        _step(model, opt)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    after = opt.state_dict()
    assert after["state"].keys() == state_before["state"].keys()
    for key, entry in after["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_before["state"][key][name]), (key, name)


def test_a_per_layer_gain_of_the_right_shape_trains() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = kalmanopt.KalmanOptimizer(model.parameters(), _compose(_PerLayer()), q=0.0, r=None)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    first = None
    for _ in range(20):
        losses = F.cross_entropy(model(x), y, reduction="none")
        first = float(losses.mean().detach()) if first is None else first
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    assert float(F.cross_entropy(model(x), y)) < first
