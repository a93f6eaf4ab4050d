"""Load the conformance goldens (float64 runs of the authors' released code) and replay them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

GOLDENS = Path(__file__).parent / "goldens"
GOLDEN_FILES = sorted(GOLDENS.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def build_model(golden: dict) -> torch.nn.Module:
    """Linear layers with tanh between them, initialised from the golden's flat parameters."""
    sizes = golden["model"]["sizes"]
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], dtype=torch.float64))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    flat = torch.tensor(golden["initial_parameters"], dtype=torch.float64)
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    return model


def batches(golden: dict):
    for x, y in zip(golden["inputs"], golden["targets"]):
        yield torch.tensor(x, dtype=torch.float64), torch.tensor(y)


def per_sample_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())
