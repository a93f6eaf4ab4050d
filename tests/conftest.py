import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Hypothesis profiles. "ci" (the default) is deterministic: derandomised (each test draws the same
# examples on every run and machine) and without the example database (a failure found on one
# machine does not change what another runs). "deep" hunts: random seeds, many more examples, the
# database on (a failing example is replayed first until fixed; then add it as an @example).
#     HYPOTHESIS_PROFILE=deep python3 -m pytest -q tests/test_fuzz.py
# Tests that set max_examples themselves keep it in "ci"; test_fuzz.py scales with the profile.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", derandomize=False, max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
