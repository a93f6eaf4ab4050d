import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    import torch

    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    # the test problems are tiny: one thread is faster than many on a small shared machine, and
    # it makes CPU reductions run in the same order on every machine
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
