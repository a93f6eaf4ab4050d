"""Regenerate docs/torch-conventions.md: torch's generic optimizer tests and kalmanopt's result on each.

Runs ``tests/test_torch_generic.py`` (the port of ``TestOptimRenewed`` from torch's
``test/test_optim.py``) with pytest, reads the JUnit report, and writes one row per test of
torch's class: how it was ported (as is, adapted — with the test's own reason —, or not
instantiated and why) and the result per device, with the (preset, engine) pairs that did not pass.

    python3 scripts/torch_generic_table.py                       # CPU here, CUDA rows from --cuda if given
    python3 scripts/torch_generic_table.py --cuda cuda-junit.xml # merge a run made on a GPU machine with
        # python3 -m pytest -p no:cacheprovider tests/test_torch_generic.py -m gpu --junitxml=cuda-junit.xml
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_torch_generic.py"
OUTPUT = ROOT / "docs" / "torch-conventions.md"
COMMAND = "python3 scripts/torch_generic_table.py"

#: every test of torch's TestOptimRenewed, in torch's order
TORCH_TESTS = [
    "test_optim_infos_do_not_specify_global_cliquey_kwargs", "test_errors", "test_forloop_goes_right_direction",
    "test_forloop_goes_right_direction_multigpu", "test_param_group_with_lrscheduler_goes_right_direction",
    "test_tensor_lr", "test_rosenbrock_sparse", "test_complex", "test_complex_2d", "test_foreach_matches_forloop",
    "test_mixed_device_dtype", "test_set_default_dtype_works_with_foreach", "test_foreach_large_tensor",
    "test_peak_memory_foreach", "test_fused_matches_forloop", "test_fused_error_on_params_on_meta",
    "test_fused_large_tensor", "test_fused_does_not_step_if_foundinf", "test_cpu_load_state_dict",
    "test_param_groups_weight_decay", "test_param_groups_lr", "test_step_is_noop_when_params_have_no_grad",
    "test_step_is_noop_for_zero_grads", "test_optimizer_can_be_printed", "test_state_dict_deterministic",
    "test_can_load_older_state_dict", "test_can_load_from_to_named_state_dict",
    "test_save_load_equality_with_weights_only", "test_load_nontensor_step", "test_state_dict_with_cuda_params",
    "test_state_dict_pre_hook", "test_state_dict_post_hook", "test_state_dict_pre_post_hook",
    "test_load_state_dict_pre_hook_and_prepend", "test_load_state_dict_post_hook",
    "test_load_state_dict_pre_post_hook", "test_step_post_hook", "test_step_pre_hook", "test_step_all_hooks",
    "test_deepcopy_copies_all_public_attrs", "test_second_order_optims_return_consistent_types",
    "test_fused_cpu_matches_cuda", "test_defaults_changed_to_foreach", "test_non_empty_state",
]

#: torch's tests that are not instantiated for kalmanopt, and why
NOT_INSTANTIATED = {
    "test_rosenbrock_sparse": "sparse gradients are declared unsupported (`supports_sparse=False`; they are "
                              "refused with a ValueError); torch instantiates it only for optimizers that support them",
    "test_complex": "complex parameters are declared unsupported (`supports_complex=False`; refused with "
                    "a ValueError, use `torch.view_as_real`); torch instantiates it only for optimizers that "
                    "support them",
    "test_complex_2d": "as test_complex",
    "test_forloop_goes_right_direction_multigpu": "needs two GPUs (torch skips it with one); not ported",
    "test_mixed_device_dtype": "needs two GPUs (torch skips it with one); not ported",
    "test_foreach_large_tensor": "a 2**32-element float16 tensor (torch's `largeTensorTest('72GB')`); not ported",
    "test_fused_large_tensor": "a 2**32-element float16 tensor (torch's `largeTensorTest('64GB')`); not ported",
    "test_fused_cpu_matches_cuda": "the fused engine is CUDA-only (`supports_fused_on=('cuda',)`); torch "
                                   "instantiates it only for optimizers fused on both",
}


def _docstrings() -> dict[str, str]:
    tree = ast.parse(TESTS.read_text())
    return {node.name: ast.get_docstring(node) or "" for node in tree.body if isinstance(node, ast.FunctionDef)}


def _run_pytest(junit: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS),
                    f"--junitxml={junit}"], cwd=ROOT, env=env, check=False)


def _results(junit: Path) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(test, device) → outcome → the case ids (preset-engine and the test's own parameters)."""
    out: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.fullmatch(r"(test_\w+)\[(cpu|cuda)-(\w+)-(.+)\]", case.get("name", ""))
        if not match:
            continue
        test, device, _dtype, rest = match.groups()
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif skipped is not None and "xfail" in (skipped.get("type", "") + skipped.get("message", "")):
            outcome = "xfailed"
        elif skipped is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        out[(test, device)][outcome].append(rest)
    return out


def _cell(outcomes: dict[str, list[str]] | None) -> str:
    if not outcomes:
        return "not run"
    parts = []
    for outcome in ("passed", "failed", "xfailed", "skipped"):
        cases = outcomes.get(outcome, [])
        if not cases:
            continue
        text = f"{len(cases)} {outcome}"
        if outcome in ("failed", "xfailed"):
            presets = sorted({re.sub(r"-(True|False|fused|capturable)$", "", c) for c in cases})
            text += " (" + ", ".join(presets) + ")"
        parts.append(text)
    return ", ".join(parts)


def _port(test: str, docs: dict[str, str]) -> str:
    if test in NOT_INSTANTIATED:
        return "not instantiated: " + NOT_INSTANTIATED[test]
    doc = " ".join(docs.get(test, "").split())
    if doc.startswith("Adapted"):
        return doc
    return "as torch's" + (f" — {doc}" if doc else "")


def write_table(cpu: Path, cuda: Path | None, cuda_note: str = "") -> str:
    docs = _docstrings()
    results = _results(cpu)
    if cuda is not None:
        results.update({k: v for k, v in _results(cuda).items() if k[1] == "cuda"})
    rows = []
    for test in TORCH_TESTS:
        on_cpu, on_cuda = results.get((test, "cpu")), results.get((test, "cuda"))
        if test in NOT_INSTANTIATED:
            cpu_cell = cuda_cell = "—"
        else:
            cpu_cell = _cell(on_cpu) if on_cpu else "CUDA only"
            cuda_cell = _cell(on_cuda) if cuda is not None else "not run here (GPU run not merged)"
        rows.append(f"| `{test}` | {_port(test, docs)} | {cpu_cell} | {cuda_cell} |")
    ported = sum(1 for t in TORCH_TESTS if t not in NOT_INSTANTIATED)
    cpu_total = defaultdict(int)
    for (_test, device), outcomes in results.items():
        if device == "cpu":
            for outcome, cases in outcomes.items():
                cpu_total[outcome] += len(cases)
    summary = ", ".join(f"{cpu_total[k]} {k}" for k in ("passed", "failed", "xfailed", "skipped") if cpu_total[k])
    note = f"\n**The CUDA column.** {cuda_note.strip()}\n" if cuda is not None and cuda_note.strip() else ""
    return HEADER.format(command=COMMAND, ported=ported, total=len(TORCH_TESTS), summary=summary, note=note) + \
        "\n".join(rows) + "\n" + FOOTER


HEADER = """# torch.optim conventions: PyTorch's generic optimizer tests

PyTorch tests every optimizer with one generic suite, `TestOptimRenewed` in torch's
`test/test_optim.py`, driven by `OptimizerInfo` from `torch.testing._internal.common_optimizers`
(which ships in the torch wheel). `tests/test_torch_generic.py` ports it: the same data, steps,
assertions and tolerances, with one `OptimizerInfo` per kalmanopt preset and engine
(`tests/torch_optim_infos.py`): `step_requires_closure=True` as for LBFGS (a Kalman step needs
the loss), complex parameters and sparse gradients declared unsupported, the engine fixed per
info (torch's `foreach=`/`fused=` flags select it too: they are aliases of `implementation=`).

Where a test had to change because a Kalman step needs the loss, the test says so in its
docstring, and the table quotes it. An "xfailed" case is a known failure waiting for a fix
(a strict `xfail`: it turns into a failure of the suite once it passes, so the mark is removed).

Regenerate this page with `{command}` (it runs the port with pytest on this machine; the CUDA
column comes from a JUnit report of a GPU run, merged with `--cuda FILE`). {ported} of torch's
{total} tests are ported; on the CPU: {summary}.
{note}
| torch's test | how it is ported | CPU (float32 unless the test fixes the dtype) | CUDA |
| --- | --- | --- | --- |
"""

FOOTER = """
Each cell counts the instantiated cases: (test parameters) × (preset, engine) × dtype, for the
presets and engines that run on that device (the reference and multi-tensor engines on the CPU,
all three on CUDA). Failures and expected failures name the preset and engine.

torch's `foreach`/`fused` flags: `foreach=True` selects `implementation="foreach"`,
`fused=True` `"fused"`, `foreach=False` `"reference"` (unless `fused=True`); flags that disagree
with each other or with `implementation=` raise a ValueError.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", type=Path, help="JUnit XML of the port run on a GPU machine")
    parser.add_argument("--cpu", type=Path, help="JUnit XML of a CPU run to use instead of running pytest")
    parser.add_argument("--cuda-note", default="", help="where and on which tree the CUDA report was made (a "
                        "paragraph printed above the table)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = args.cpu
        if cpu is None:
            cpu = Path(tmp) / "cpu.xml"
            _run_pytest(cpu)
        args.output.write_text(write_table(cpu, args.cuda, args.cuda_note))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
