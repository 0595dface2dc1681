"""benchmarks.gpu_check: the prepared GPU check, rehearsed on the CPU with --dry-run.

The slow test runs the whole dry run in a subprocess (as a device session would run the real
check) with one step made to raise through ``LABKIT_GPU_CHECK_FAIL``, and checks the printed
plan, every step's status, the results file and its JSON twin. The fast tests pin the pieces:
the launch table's defaults, the budget rule, pytest's summary parsing, the table snippet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "# GPU check",
    "## Steps",
    "## Target verdicts",
    "## Environment (`environment`)",
    "## CUDA-only tests (`tests`)",
    "## Kernel correctness (`correctness`)",
    "## Launch configuration (autotune) (`autotune`)",
    "## Multi-scale deformable attention (`bench`)",
    "## Training step: Deformable-DETR vs Co-DETR (`models`)",
    "## Notebooks (`notebooks`)",
    "## Zoo (`zoo`)",
]


def test_launch_table_holds_the_rule_defaults():
    pytest.importorskip("triton")
    import torch

    from labkit.detr import ms_deform_attn_triton as K

    for (pass_, block_d, dtype), (block_q, warps, stages) in K.LAUNCH_TABLE.items():
        assert (pass_, block_d, warps, stages) in {("fwd", 32, 4, None), ("bwd", 32, 4, None)}
        assert block_q == (64 if pass_ == "fwd" else 32)
        assert K.launch_config(32, pass_ == "bwd", getattr(torch, dtype)) == (
            block_q, 32, warps, stages,
        )  # fmt: skip
    # Keys not in the table fall back to the rule: 16 dims -> BLOCK_D 16, tile 2048 / 16.
    assert K.launch_config(16) == (128, 16, 4, None)
    assert K.launch_config(20, backward=True, dtype=torch.float64) == (32, 32, 4, None)
    saved = dict(K.LAUNCH_TABLE)
    try:
        K.LAUNCH_TABLE[("fwd", 32, "bfloat16")] = (128, 8, 2)
        assert K.launch_config(32, dtype=torch.bfloat16) == (128, 32, 8, 2)
    finally:
        K.LAUNCH_TABLE.clear()
        K.LAUNCH_TABLE.update(saved)


def test_table_snippet_is_python_that_replaces_the_table():
    pytest.importorskip("triton")
    from labkit.detr import ms_deform_attn_triton as K

    table = dict(K.LAUNCH_TABLE, **{})
    table[("bwd", 32, "float32")] = (16, 8, 1)
    namespace: dict = {}
    exec(gpu_check.table_snippet(table), namespace)  # noqa: S102
    assert namespace["LAUNCH_TABLE"] == table


def test_parse_pytest_counts():
    out = (
        "....s\nSKIPPED [3] tests/x.py:40: needs CUDA\n2 passed, 3 skipped, 1 deselected in 4.2s\n"
    )
    assert gpu_check.parse_pytest_counts(out) == {"passed": 2, "skipped": 3, "deselected": 1}
    assert gpu_check.parse_pytest_counts("1 failed, 4 passed, 2 errors in 1s") == {
        "failed": 1, "passed": 4, "error": 2,
    }  # fmt: skip
    assert gpu_check.parse_pytest_counts("no tests ran") == {}


def test_cuda_test_files_include_the_kernel_tests():
    files = gpu_check.cuda_test_files()
    assert "tests/test_deform_attn_triton.py" in files
    assert "tests/test_gpu_check.py" not in files


def test_steps_over_the_budget_are_skipped_with_a_reason(tmp_path, capsys):
    # 12 s budget, 5 kept back: no step's budget fits, so nothing starts.
    code = gpu_check.main(["--dry-run", "--budget-s", "12", "--out", str(tmp_path),
                           "--skip", "tests"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "gpu_check plan" in printed and "if time runs short" in printed
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["tests"] == {"status": "skipped", "reason": "--skip"}
    for name in gpu_check.STEP_NAMES:
        assert steps[name]["status"] == "skipped", name
        if name != "tests":
            assert steps[name]["reason"].startswith("not enough time left"), steps[name]
    assert "| environment | skipped |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), **{gpu_check.FAIL_ENV: "notebooks"})
    for name in ("OUT", "TRITON_INTERPRET"):
        env.pop(name, None)
    start = time.monotonic()
    # A generous total budget: on a CPU shared with other jobs the default (175 s) would cut
    # the last steps short, which is the budget rule working (tested above), not a failure.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--budget-s", "600",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    wall = time.monotonic() - start
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]  # the injected failure

    # The plan comes first: every step in order with its budget, and what goes first.
    plan = out[: out.index("== environment")]
    positions = [plan.index(f". {name} ") for name in gpu_check.STEP_NAMES]
    assert positions == sorted(positions)
    assert "if time runs short these go first: zoo, notebooks, models" in plan
    assert " s " in plan

    data = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = data["steps"]
    assert list(steps) == gpu_check.STEP_NAMES
    for name, result in steps.items():
        if name == "notebooks":
            continue
        assert result["status"] in ("ok", "skipped"), (name, result)
        if result["status"] == "skipped":
            assert result.get("reason"), (name, result)
    # The failing step is recorded with its traceback, and the run went on after it.
    failed = steps["notebooks"]
    assert failed["status"] == "error"
    assert "injected failure" in failed["error"] and "RuntimeError" in failed["traceback"]
    assert steps["zoo"]["status"] == "skipped" and steps["zoo"].get("reason")
    assert "problems: notebooks" in out

    # What ran, ran for real (unless the budget rule skipped it on a very busy machine).
    if steps["correctness"]["status"] == "ok":
        assert {v["verdict"] for v in steps["correctness"]["verdicts"]} == {"met"}
    if steps["autotune"]["status"] == "ok":
        assert "LAUNCH_TABLE" in steps["autotune"]["snippet"]
    if steps["tests"]["status"] == "ok":
        assert steps["tests"]["counts"].get("skipped", 0) >= 1  # CUDA tests skip on the CPU

    text = (tmp_path / "gpu_check.md").read_text()
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "**Device.** CPU" in text and "injected failure" in text
    assert data["meta"]["finished"] and data["meta"]["dry_run"]
    # About 60-90 s on the 2-core development machine with the other core busy; every step's
    # hard timeout bounds it at its budgets' sum (345 s), the default --budget-s at 175 s.
    assert data["meta"]["wall_s"] < 360, data["meta"]["wall_s"]
    assert wall < 420
