"""One prepared GPU check: every CUDA path of labkit verified and measured in one bounded run.

    PYTHONPATH=. python -m benchmarks.gpu_check                     # on a CUDA machine, 480 s
    PYTHONPATH=. python -m benchmarks.gpu_check --out $OUT          # a labkit session's device tool
    PYTHONPATH=. python -m benchmarks.gpu_check --dry-run           # CPU rehearsal, < 3 minutes
    PYTHONPATH=. python -m benchmarks.gpu_check --skip zoo notebooks --budget-s 300

The steps run in priority order (:data:`STEPS`): environment, the CUDA-only tests, kernel
correctness against the PyTorch reference (fp32, bf16 and fp16 autocast; forward and the three
gradients), autotuning of the Triton kernel's launch table, the deformable-attention benchmark
(kernel vs reference vs HBM floor, time and peak memory), Deformable-DETR and Co-DETR
training steps (ResNet-50, 800 px, bf16), the deformable-attention and Co-DETR notebooks in
full mode with papermill's per-cell timeout as the short budget, then zoo entries.
Before starting, the plan is printed: each step's time budget and what is dropped first when
time runs short. A step whose budget exceeds the time left is skipped and reported as such.

Every step runs in its own Python subprocess (a CUDA error such as an illegal address poisons
only that process) under a hard timeout; inside, loops also stop at a soft deadline and keep
what they measured. An exception is recorded with its traceback tail and the run continues.
Results go to ONE Markdown file, ``OUT/gpu_check.md`` (the layout of benchmarks/RESULTS.md,
the device named, every number measured in this run side by side, the target verdicts), and
its JSON twin ``OUT/gpu_check.json``; both are rewritten after every step, so a run killed
from outside still leaves what it measured. Per-step logs go to ``OUT/gpu_check_logs/``.

Nothing is installed, downloaded or written into the source tree: the measured launch table
is printed into the results as a snippet to paste into ``labkit/detr/ms_deform_attn_triton.py``.
A step whose packages are missing (pytest, torchvision, papermill...) is skipped with the reason.

``--dry-run`` rehearses the same script on the CPU: tiny shapes, the Triton kernels through
``TRITON_INTERPRET=1``, the tiny backbone, notebooks and zoo commands only checked (not run).
For tests: ``LABKIT_GPU_CHECK_FAIL=STEP[,STEP]`` makes those steps raise at their start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAIL_ENV = "LABKIT_GPU_CHECK_FAIL"
RESERVE_S = 5.0  # kept back from the budget to write the results
DRY_MIN_S = 10.0  # a dry-run step is skipped with less than this left
KILL_GRACE_S = 5.0  # a timed-out step gets SIGINT, this long to stop, then SIGKILL
SOFT_DEADLINE = 0.85  # workers stop their loops at this fraction of their hard timeout
RESULTS_NAME = "gpu_check"
_PROCESS_START = time.monotonic()  # a worker's deadline counts its own start-up (torch import)


@dataclass(frozen=True)
class Step:
    """One step of the check.

    Attributes:
        name: ``--skip`` name and the key in the results.
        title: one line for the plan.
        budget_s / dry_budget_s: hard timeout of the step on a GPU / in ``--dry-run``.
        requires: modules that must be importable, else the step is skipped.
        cuda: needs a CUDA device in a real run.
        interpret: in ``--dry-run`` its worker runs with ``TRITON_INTERPRET=1``.
        min_s: for an elastic step (takes whatever is left, up to ``budget_s``): the least
            time worth starting it with; 0 means a fixed budget.
    """

    name: str
    title: str
    budget_s: float
    dry_budget_s: float
    requires: tuple[str, ...] = ("torch",)
    cuda: bool = True
    interpret: bool = False
    min_s: float = 0.0

    def allotment(self, dry: bool, left: float) -> tuple[float, float]:
        """(seconds needed to start, seconds granted) with ``left`` seconds remaining.

        GPU run: a fixed step needs its whole budget; an elastic one ``min_s`` and gets what
        is left up to its budget. Dry run: every step is elastic with ``DRY_MIN_S``, so a busy
        CPU shortens or skips the last steps instead of overrunning three minutes."""
        budget = self.dry_budget_s if dry else self.budget_s
        if dry:
            return min(budget, DRY_MIN_S), min(budget, left - KILL_GRACE_S)
        if self.min_s:
            return self.min_s, min(budget, left - KILL_GRACE_S)
        return budget, budget


STEPS: list[Step] = [
    Step("environment", "device, torch / triton / CUDA versions, memory, packages", 15, 30,
         cuda=False),
    Step("tests", "CUDA-only tests: pytest -x -q on tests that skip without CUDA", 60, 60,
         requires=("torch", "pytest")),
    Step("correctness", "Triton kernel vs PyTorch reference: fp32, bf16, fp16 autocast; "
         "forward + 3 gradients", 50, 45, requires=("torch", "triton"), interpret=True),
    Step("autotune", "BLOCK_Q / num_warps / num_stages of the kernel on encoder + decoder "
         "shapes -> LAUNCH_TABLE snippet", 90, 40, requires=("torch", "triton"), interpret=True),
    Step("bench", "deformable attention: kernel vs reference vs HBM floor, fwd and fwd+bwd, "
         "fp32 / bf16, peak memory", 75, 40, requires=("torch", "triton"), interpret=True),
    Step("models", "Deformable-DETR vs Co-DETR training step, ResNet-50 800 px bf16: img/s, "
         "peak memory", 90, 90, requires=("torch", "torchvision", "triton"), interpret=True),
    Step("notebooks", "deformable-attention + Co-DETR notebooks, papermill --full --device cuda", 180, 20,
         requires=("torch", "papermill", "nbformat", "ipykernel", "jupyter_client", "matplotlib"),
         min_s=60),
    Step("zoo", "labkit zoo train NAME --device cuda --seed 0, entries while time lasts", 600,
         20, requires=("torch", "torchvision", "pycocotools", "PIL"), min_s=60),
]  # fmt: skip
STEP_NAMES = [s.name for s in STEPS]


# ----------------------------------------------------------------------------- small helpers


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table in RESULTS.md's layout (floats with 4 significant digits)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _missing(modules: Sequence[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _run_command(
    cmd: Sequence[str],
    timeout: float,
    env: dict | None = None,
    log: Path | None = None,
    echo: bool = True,
) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout send SIGINT (papermill shuts its
    kernel down), then SIGKILL the group. Returns (exit code or None on timeout, output)."""
    out: list[str] = []
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=REPO, start_new_session=True, errors="replace",
    )  # fmt: skip
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if log_file:
                log_file.write(line)
                log_file.flush()
            if echo:
                print("    | " + line.rstrip()[:200], flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        code = None
        for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    if log_file:
        log_file.close()
    return code, "".join(out)


def _python_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------- worker side


class Context:
    """What a step function gets: the device, the soft deadline and a result it can save
    incrementally (so a step killed at its hard timeout keeps what it measured)."""

    def __init__(self, step: str, dry: bool, deadline_s: float, result_path: Path, out_dir: Path,
                 previous: dict) -> None:  # fmt: skip
        import torch

        self.step = step
        self.dry = dry
        self.start = _PROCESS_START
        self.deadline = self.start + deadline_s
        self.result_path = result_path
        self.out_dir = out_dir
        self.previous = previous
        self.cuda = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.data: dict[str, Any] = {"tables": [], "notes": [], "verdicts": []}
        self.options: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.left() < need

    def save(self) -> None:
        _write_atomic(self.result_path, json.dumps(self.data, default=str, indent=1))

    def table(self, key: str, title: str, header: Sequence[str], rows: list) -> list:
        """Register (or replace) table ``key``; returns its row list to append to."""
        self.data["tables"] = [t for t in self.data["tables"] if t["key"] != key]
        self.data["tables"].append({"key": key, "title": title, "header": list(header),
                                    "rows": rows})  # fmt: skip
        return rows

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(text, flush=True)

    def verdict(self, target: str, measured: str, ok: bool | None) -> None:
        word = "n/a" if ok is None else ("met" if ok else "MISSED")
        self.data["verdicts"].append({"target": target, "measured": measured, "verdict": word})
        print(f"target: {target}: {measured} -> {word}", flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, dry: bool, rounds: int = 5) -> float:
    """Median seconds per call: warm-up, then ``rounds`` rounds of enough calls for ~3 ms."""
    if dry:  # the interpreter: one call, only to exercise the path
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    for _ in range(2):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    reps = max(1, min(200, int(0.003 / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / reps)
    return sorted(times)[len(times) // 2]


def peak_mib(fn: Callable[[], object], device) -> tuple[float | None, float | None]:
    """(peak allocated MiB during one ``fn()``, the part above what was allocated before)."""
    import torch

    if device.type != "cuda":
        return None, None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - base) / 2**20


def hbm_bandwidth(device) -> tuple[float, str]:
    """(TB/s, where the figure comes from): the datasheet figure for known GPUs."""
    import torch

    if device.type != "cuda":
        return 3.35, "H100 SXM datasheet (no GPU in a dry run)"
    name = torch.cuda.get_device_name(device)
    known = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("GH200", 4.0),
             ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
             ("L40S", 0.864), ("L4", 0.3), ("A10", 0.6), ("V100", 0.9), ("T4", 0.32)]  # fmt: skip
    for key, tb in known:
        if key in name:
            return tb, f"{key} datasheet"
    props = torch.cuda.get_device_properties(device)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * bus / 8 / 1e12, "memory clock x bus width"
    return 3.35, "unknown GPU: H100 SXM figure assumed"


# --- a. environment


def step_environment(ctx: Context) -> dict:
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "missing"

    rows = ctx.table("env", "Environment", ["item", "value"], [])
    rows += [
        ["python", platform.python_version()],
        ["platform", platform.platform()],
        ["torch", torch.__version__],
        ["torch CUDA", torch.version.cuda],
        ["cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None],
        ["triton", version("triton")],
        ["CUDA available", torch.cuda.is_available()],
    ]
    info: dict[str, Any] = {"torch": torch.__version__, "triton": version("triton"),
                            "cuda": torch.version.cuda, "dry_run": ctx.dry}  # fmt: skip
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        bw, source = hbm_bandwidth(dev)
        info.update(
            device=torch.cuda.get_device_name(dev), capability=f"{props.major}.{props.minor}"
        )
        rows += [
            ["device", torch.cuda.get_device_name(dev)],
            ["GPUs visible", torch.cuda.device_count()],
            ["compute capability", f"{props.major}.{props.minor}"],
            ["SMs", props.multi_processor_count],
            ["memory total / free GiB", f"{total / 2**30:.1f} / {free / 2**30:.1f}"],
            ["HBM bandwidth TB/s (for the floor)", f"{bw:.3g} ({source})"],
            ["bf16 supported", torch.cuda.is_bf16_supported()],
        ]
    else:
        info["device"] = f"CPU {platform.machine()} ({os.cpu_count()} cores)"
        rows.append(["device", info["device"]])
    nvcc = None
    for candidate in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([candidate, "--version"], capture_output=True, text=True,
                                  timeout=10).stdout  # fmt: skip
            nvcc = _tail(text, 1) or None
            break
    rows.append(["nvcc", nvcc or "not found"])
    for dist in ("torchvision", "numpy", "pytest", "pycocotools", "papermill", "nbformat",
                 "ipykernel", "scikit-learn", "scipy", "matplotlib", "mmcv"):  # fmt: skip
        rows.append([dist, version(dist)])
    official = importlib.util.find_spec("MultiScaleDeformableAttention") is not None
    rows.append(["official MultiScaleDeformableAttention op", "importable" if official else "no"])
    rows.append(["CPU cores", os.cpu_count()])
    ctx.data["info"] = info
    return {"summary": f"{info['device']}, torch {info['torch']}, triton {info['triton']}"}


# --- b. CUDA-only tests


def cuda_test_files() -> list[str]:
    """Test files that skip without CUDA (they mention ``torch.cuda.is_available()``)."""
    pattern = re.compile(r"cuda\.is_available\(\)|needs CUDA|mark\.cuda")
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if p.name != "test_gpu_check.py" and pattern.search(p.read_text(encoding="utf-8"))
    )


def parse_pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 3, "skipped": 1, ...}`` from pytest's last summary line."""
    counts: dict[str, int] = {}
    lines = [
        ln
        for ln in output.splitlines()
        if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)
    ]
    if lines:
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1]
        ):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
    return counts  # fmt: skip


def step_tests(ctx: Context) -> dict:
    files = cuda_test_files()
    if not files:
        return {"status": "skipped", "reason": "no test file mentions CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rs", *files]
    if _missing(["matplotlib"]):  # tests/conftest.py imports it
        cmd.insert(3, "--noconftest")
        ctx.note("--noconftest: matplotlib is missing")
    if ctx.dry:
        cmd += ["-k", "cuda"]  # the cheapest form: collect everything, run the CUDA tests only
    code, output = _run_command(cmd, ctx.left() - 2, env=_python_env(),
                                log=ctx.out_dir / "gpu_check_logs" / "pytest.log", echo=False)  # fmt: skip
    counts = parse_pytest_counts(output)
    rows = ctx.table("tests", "CUDA-only tests", ["command", "exit", "passed", "failed",
                                                  "skipped", "errors", "deselected"], [])  # fmt: skip
    rows.append([" ".join(["pytest", *cmd[3:]]), "timeout" if code is None else code,
                 *(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error",
                                              "deselected"))])  # fmt: skip
    skipped = [ln.strip() for ln in output.splitlines() if ln.startswith("SKIPPED")]
    for line in skipped[:10]:
        ctx.note(line)
    ctx.data["counts"] = counts
    ctx.data["output_tail"] = _tail(output, 30)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line"
    if code is None:
        return {"status": "timeout", "summary": summary}
    if code != 0:
        return {"status": "failed", "summary": summary, "error": _tail(output, 25)}
    if ctx.cuda and counts.get("skipped", 0):
        ctx.note("some tests were skipped on a CUDA machine: see the SKIPPED lines above")
    return {"summary": summary}


# --- c. kernel correctness

# Max |kernel - reference| / max |reference| per tensor, by the dtype of value (and weights).
# The reference runs in float32 on the same rounded inputs, so what remains is the kernel's
# own error plus the rounding of its low-precision outputs (bf16 2^-8, fp16 2^-11).
TOLERANCE_REL = {"float32": 1e-4, "bfloat16": 1.6e-2, "float16": 2e-3}
GRAD_NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def correctness_cases(dry: bool, seed: int = 0) -> list[dict]:
    """Problem sizes: Deformable-DETR's decoder and a small encoder with odd level sizes, then
    random heads / dims (a non-power of 2 included) / points / levels / odd sizes."""
    import torch

    if dry:
        from labkit.detr.interpret_check import random_cases

        return random_cases(3, seed, max_work=24)
    gen = torch.Generator().manual_seed(seed)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    cases = [
        dict(bs=2, num_queries=300, num_heads=8, head_dims=32, num_points=4,
             shapes=[(25, 41), (13, 21), (7, 11), (3, 5)]),
        dict(bs=1, num_queries=None, num_heads=8, head_dims=32, num_points=4,
             shapes=[(49, 83), (25, 41), (13, 21), (7, 11)]),
    ]  # fmt: skip
    for dims in (20, 64, 8):
        levels = pick(1, 4)
        cases.append(dict(bs=pick(1, 3), num_queries=pick(1, 400), num_heads=pick(1, 8),
                          head_dims=dims, num_points=pick(1, 8),
                          shapes=[(2 * pick(0, 30) + 1, 2 * pick(0, 30) + 1)
                                  for _ in range(levels)]))  # fmt: skip
    return cases


def compare_kernel(case: dict, dtype, device, seed: int = 0) -> dict:
    """Errors of the kernel (inputs in ``dtype``, locations float32, under autocast on CUDA)
    against the float32 reference on the same rounded inputs: output and three gradients."""
    import torch

    from labkit.detr.ms_deform_attn import (
        level_start_index_from_shapes,
        multi_scale_deformable_attn_pytorch,
    )
    from labkit.detr.ms_deform_attn_triton import ms_deform_attn_triton

    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case["shapes"], dtype=torch.long)
    starts = level_start_index_from_shapes(shapes)
    keys = int(shapes.prod(1).sum())
    bs, heads, dims = case["bs"], case["num_heads"], case["head_dims"]
    nq = case["num_queries"] or keys
    levels, points = len(case["shapes"]), case["num_points"]
    value = torch.randn(bs, keys, heads, dims, generator=gen)
    locs = torch.rand(bs, nq, heads, levels, points, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(bs, nq, heads, levels, points, generator=gen)
    grad_out = torch.randn(bs, nq, heads * dims, generator=gen)
    shapes, starts = shapes.to(device), starts.to(device)
    inputs = [
        t.to(device=device, dtype=dt).requires_grad_()
        for t, dt in ((value, dtype), (locs, torch.float32), (weights, dtype))
    ]
    low = dtype != torch.float32 and device.type == "cuda"
    with torch.autocast(device.type, dtype=dtype, enabled=low):
        out = ms_deform_attn_triton(inputs[0], shapes, starts, inputs[1], inputs[2])
    g = grad_out.to(device=device, dtype=out.dtype)
    kernel = (out, *torch.autograd.grad(out, inputs, g))
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = multi_scale_deformable_attn_pytorch(ref_inputs[0], shapes, starts, *ref_inputs[1:])
    reference = (ref, *torch.autograd.grad(ref, ref_inputs, g.float()))
    errors = {}
    for name, a, b in zip(GRAD_NAMES, kernel, reference, strict=True):
        b = b.detach()
        diff = float((a.detach().float() - b).abs().max()) if b.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        errors[name] = {"abs": diff, "rel": diff / max(scale, 1e-12), "dtype": str(a.dtype)[6:]}
    errors["output_dtype_ok"] = out.dtype == dtype
    return errors


def step_correctness(ctx: Context) -> dict:
    import torch

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = correctness_cases(ctx.dry)
    header = ["case", "bs x queries x heads x dims, points", "levels (h, w)", "dtype"]
    header += [f"{n} rel (abs)" for n in GRAD_NAMES] + ["tolerance (rel)", "verdict"]
    rows = ctx.table("correctness", "Kernel vs PyTorch reference (max |diff| / max |ref|)",
                     header, [])  # fmt: skip
    worst: dict[str, dict[str, list[float]]] = {}  # dtype -> tensor -> [max abs, max rel]
    failures, done, total = [], 0, len(cases) * len(dtypes)
    for i, case in enumerate(cases):
        for dtype in dtypes:
            if done and ctx.out_of_time(3.0):
                break
            name = str(dtype)[6:]
            tol = TOLERANCE_REL[name]
            try:
                err = compare_kernel(case, dtype, ctx.device, seed=i)
            except Exception as exc:  # recorded; the next case may still run
                failures.append(f"case {i} {name}: {type(exc).__name__}")
                rows.append([i, str(case), "", name, f"{type(exc).__name__}: {str(exc)[:150]}",
                             "", "", "", tol, "FAIL"])  # fmt: skip
                done += 1
                continue
            ok = all(err[n]["rel"] <= tol for n in GRAD_NAMES) and err["output_dtype_ok"]
            if not ok:
                failures.append(f"case {i} {name}")
            for n in GRAD_NAMES:
                w = worst.setdefault(name, {}).setdefault(n, [0.0, 0.0])
                w[0], w[1] = max(w[0], err[n]["abs"]), max(w[1], err[n]["rel"])
            nq = case["num_queries"] or "all keys"
            rows.append([i, f"{case['bs']} x {nq} x {case['num_heads']} x {case['head_dims']}, "
                         f"{case['num_points']}", " ".join(f"{h}x{w}" for h, w in case["shapes"]),
                         name + ("" if ctx.dry or dtype == torch.float32 else " autocast"),
                         *(f"{err[n]['rel']:.2e} ({err[n]['abs']:.2e})" for n in GRAD_NAMES),
                         tol, "ok" if ok else "FAIL"])  # fmt: skip
            done += 1
            ctx.save()
    summary_rows = ctx.table("correctness_worst", "Worst error per dtype and tensor, all cases",
                             ["dtype", "tensor", "max abs", "max rel", "tolerance (rel)",
                              "verdict"], [])  # fmt: skip
    for name, per_tensor in worst.items():
        tol = TOLERANCE_REL[name]
        for n, (abs_err, rel_err) in per_tensor.items():
            summary_rows.append(
                [name, n, abs_err, rel_err, tol, "ok" if rel_err <= tol else "FAIL"]
            )
        top = max(rel for _, rel in per_tensor.values())
        ctx.verdict(f"kernel == reference within {tol:g} relative ({name}, fwd + 3 grads)",
                    f"worst {top:.2e}", top <= tol and not any(name in f for f in failures))  # fmt: skip
    ctx.note("Inputs: value and attention weights in the dtype, sampling locations in float32 "
             "(as the module produces them under autocast; on CUDA the kernel runs inside "
             "torch.autocast). Locations span [-0.1, 1.1] to exercise the zero padding.")  # fmt: skip
    if done < total:
        ctx.note(f"stopped at the soft deadline after {done} of {total} case x dtype checks")
    summary = f"{done}/{total} checks, " + (
        f"FAILED: {failures}" if failures else "all within tolerance"
    )
    return {"status": "failed" if failures else "ok", "summary": summary}


# --- d. autotune the launch table


def _attention_shapes(dry: bool) -> tuple[int, int, tuple, dict[str, int | None]]:
    """(batch, heads, levels, {shape: queries}); 32 dims per head and 4 points always."""
    from labkit.lessons.attention_cost import ENCODER_SHAPES

    if dry:  # the interpreter's cost grows with programs x heads x levels x points
        return 1, 1, ((4, 5), (2, 3)), {"encoder": None, "decoder": 5}
    return 2, 8, ENCODER_SHAPES, {"encoder": None, "decoder": 300}


def table_snippet(table: dict) -> str:
    """``LAUNCH_TABLE = {...}`` as Python source, ready to paste."""
    order = ["float32", "bfloat16", "float16"]
    lines = ["LAUNCH_TABLE: dict[tuple[str, int, str], tuple[int, int, int | None]] = {"]
    for key in sorted(
        table, key=lambda k: (k[0] != "fwd", k[1], order.index(k[2]) if k[2] in order else 9, k[2])
    ):
        pass_, block_d, dtype = key
        lines.append(f'    ("{pass_}", {block_d}, "{dtype}"): {tuple(table[key])!r},')
    lines.append("}")
    return "\n".join(lines)


def step_autotune(ctx: Context) -> dict:
    import torch

    from labkit.detr import ms_deform_attn_triton as K
    from labkit.lessons.attention_cost import deformable_problem

    bs, heads, levels, queries = _attention_shapes(ctx.dry)
    # bf16 first: training runs under bf16 autocast; fp16 last (it copies bf16 if cut short).
    dtypes = (
        (torch.bfloat16, torch.float32)
        if ctx.dry
        else (torch.bfloat16, torch.float32, torch.float16)
    )
    if ctx.dry:
        block_qs = {"fwd": (32,), "bwd": (16,)}
        warps, stages = (4,), (None,)
    else:
        block_qs = {"fwd": (16, 32, 64, 128, 256), "bwd": (16, 32, 64, 128)}
        warps, stages = (2, 4, 8), (None, 1, 2)
    original = dict(K.LAUNCH_TABLE)
    tuned = dict(K.LAUNCH_TABLE)
    rows = ctx.table("autotune", "Launch configurations tried (time = encoder + decoder shape)",
                     ["pass", "dtype", "BLOCK_Q", "num_warps", "num_stages", "encoder us",
                      "decoder us", "total us", "vs current"], [])  # fmt: skip
    best_rows = ctx.table("autotune_best", "Best launch configuration per pass and dtype",
                          ["pass", "dtype", "current (BLOCK_Q, warps, stages)", "current us",
                           "best (BLOCK_Q, warps, stages)", "best us", "speed-up"], [])  # fmt: skip
    complete = True
    searched: set[tuple] = set()
    try:
        for dtype in dtypes:
            name = str(dtype)[6:]
            problems = {
                shape: deformable_problem(bs, levels, nq, heads, dtype=dtype, device=ctx.device,
                                          requires_grad=True)
                for shape, nq in queries.items()
            }  # fmt: skip
            for pass_ in ("fwd", "bwd"):
                if ctx.out_of_time(5.0):  # not even the current entry: that would compile too
                    complete = False
                    continue
                key = (pass_, 32, name)
                default = K.launch_config(32, pass_ == "bwd", dtype)
                current = tuple(original.get(key) or (default[0], default[2], default[3]))
                calls = {}
                for shape, p in problems.items():
                    args = [p[k] for k in ("value", "spatial_shapes", "level_start_index",
                                           "sampling_locations", "attention_weights")]  # fmt: skip
                    if pass_ == "fwd":

                        def call(args=args):
                            with torch.no_grad():
                                return K.ms_deform_attn_triton(*args)
                    else:
                        out = K.ms_deform_attn_triton(*args)
                        grad = torch.randn_like(out)
                        leaves = [args[0], args[3], args[4]]

                        def call(out=out, grad=grad, leaves=leaves):
                            return torch.autograd.grad(out, leaves, grad, retain_graph=True)

                    calls[shape] = call
                measured: dict[tuple, float] = {}

                def measure(cfg: tuple, key=key, calls=calls, measured=measured, pass_=pass_,
                            name=name, current=current) -> float:  # fmt: skip
                    if cfg in measured:
                        return measured[cfg]
                    K.LAUNCH_TABLE[key] = cfg
                    try:
                        times = {s: time_fn(c, ctx.device, ctx.dry) for s, c in calls.items()}
                        total = sum(times.values())
                    except Exception as err:  # e.g. out of shared memory / registers
                        times, total = {}, float("inf")
                        ctx.note(f"{pass_} {name} {cfg}: {type(err).__name__}: {str(err)[:120]}")
                    measured[cfg] = total
                    base = measured.get(current)
                    rows.append([pass_, name, *(_fmt(c) for c in cfg),
                                 times.get("encoder", float("nan")) * 1e6,
                                 times.get("decoder", float("nan")) * 1e6, total * 1e6,
                                 None if not base or math.isinf(total) else base / total])  # fmt: skip
                    ctx.save()
                    return total

                best = current
                measure(current)
                # Coordinate descent: BLOCK_Q at the current warps, then warps, then stages.
                for axis, values in ((0, block_qs[pass_]), (1, warps), (2, stages)):
                    for v in values:
                        if ctx.out_of_time(2.0):
                            complete = False
                            break
                        cfg = tuple(v if i == axis else best[i] for i in range(3))
                        if measure(cfg) < measure(best) * 0.98:  # 2 %: beyond timing noise
                            best = cfg
                tuned[key] = best
                searched.add(key)
                best_rows.append([pass_, name, str(current), measured[current] * 1e6,
                                  str(best), measured[best] * 1e6,
                                  measured[current] / measured[best]])  # fmt: skip
            del problems
    finally:
        K.LAUNCH_TABLE.clear()
        K.LAUNCH_TABLE.update(original)
    for pass_ in ("fwd", "bwd"):  # fp16 moves the same bytes as bf16
        half, bf16 = (pass_, 32, "float16"), (pass_, 32, "bfloat16")
        if half not in searched and bf16 in searched:
            tuned[half] = tuned[bf16]
            ctx.note(f"{pass_} float16 was not searched: its entry copies bfloat16's.")
    ctx.data["table"] = {"|".join(map(str, k)): list(v) for k, v in tuned.items()}
    ctx.data["snippet"] = table_snippet(tuned)
    for row in best_rows:
        print(f"best {row[0]} {row[1]}: {row[2]} {_fmt(row[3])} us -> {row[4]} {_fmt(row[5])} us "
              f"({_fmt(row[6])}x)")  # fmt: skip
    print(ctx.data["snippet"], flush=True)
    ctx.note("Key: (pass, BLOCK_D, value dtype) -> (BLOCK_Q, num_warps, num_stages); num_stages "
             "None = Triton's default. Search: coordinate descent from the current entry "
             "(BLOCK_Q, then num_warps, then num_stages), a change kept only when >= 2 % faster "
             "on the summed encoder + decoder time.")  # fmt: skip
    if ctx.dry:
        ctx.note("Dry run: the interpreter's timings mean nothing; the table is only exercised.")
    if not complete:
        ctx.note("The search stopped at the soft deadline; untried configurations are missing.")
    changed = sum(tuned[k] != original.get(k) for k in tuned)
    return {
        "summary": f"{len(rows)} launches timed, {changed} table entries changed"
        + ("" if complete else " (search cut short)")
    }


# --- e. benchmark


def _official_op():
    """The official CUDA op as ``fn(value, shapes, starts, locs, weights)``, or None."""
    with contextlib.suppress(Exception):
        import MultiScaleDeformableAttention as MSDA  # noqa: N814  (Deformable-DETR's extension)
        import torch

        class _Official(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value, shapes, starts, locs, weights):
                ctx.save_for_backward(value, shapes, starts, locs, weights)
                return MSDA.ms_deform_attn_forward(value, shapes, starts, locs, weights, 64)

            @staticmethod
            def backward(ctx, grad):
                value, shapes, starts, locs, weights = ctx.saved_tensors
                gv, gl, gw = MSDA.ms_deform_attn_backward(
                    value, shapes, starts, locs, weights, grad.contiguous(), 64
                )
                return gv, None, None, gl, gw

        return "MultiScaleDeformableAttention (official)", _Official.apply
    with contextlib.suppress(Exception):
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction

        return "mmcv MultiScaleDeformableAttnFunction", (
            lambda v, s, st, l, w: MultiScaleDeformableAttnFunction.apply(v, s, st, l, w, 64)
        )
    return None


def step_bench(ctx: Context) -> dict:
    import torch

    from labkit.detr import ms_deform_attn_triton as K
    from labkit.lessons.attention_cost import (
        deformable_call,
        deformable_problem,
        hbm_floor_us,
        working_set_mib,
    )

    bs, heads, levels, queries = _attention_shapes(ctx.dry)
    num_keys = sum(h * w for h, w in levels)
    bandwidth, source = hbm_bandwidth(ctx.device)
    tuned_table = {}
    prev = ctx.previous.get("autotune", {})
    for k, v in (prev.get("table") or {}).items():
        pass_, block_d, dtype = k.split("|")
        tuned_table[(pass_, int(block_d), dtype)] = tuple(v)
    original = dict(K.LAUNCH_TABLE)
    tuned_differs = any(original.get(k) != v for k, v in tuned_table.items())
    official = _official_op() if ctx.cuda else None
    memory_note = (
        "measured peak (torch.cuda.max_memory_allocated)" if ctx.cuda else "not measured on CPU"
    )
    header = ["shape", "queries", "dtype", "pass", "method", "ms", "speed-up vs reference",
              "peak MiB", "peak above inputs MiB", "memory vs kernel", "HBM floor us",
              "time / floor"]  # fmt: skip
    rows = ctx.table("bench", f"Deformable attention, batch {bs}, levels {list(levels)}, {heads} heads "
                     f"x 32 dims, 4 points; floor at {bandwidth:.3g} TB/s ({source}); memory: "
                     f"{memory_note}", header, [])  # fmt: skip
    results: dict[tuple, dict] = {}
    complete = True
    for shape, nq in queries.items():
        nqueries = num_keys if nq is None else nq
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype)[6:]
            nbytes = torch.finfo(dtype).bits // 8
            for backward in (False, True):
                if ctx.out_of_time(3.0):
                    complete = False
                    break
                pass_ = "fwd+bwd" if backward else "fwd"
                problem = deformable_problem(bs, levels, nq, heads, dtype=dtype, device=ctx.device,
                                             requires_grad=backward)  # fmt: skip
                leaves = [problem[k] for k in ("value", "sampling_locations", "attention_weights")]
                methods: list[tuple[str, Callable[[], object]]] = [
                    ("reference", deformable_call(problem, "pytorch", backward)),
                    ("kernel", deformable_call(problem, "triton", backward)),
                ]
                if tuned_differs:
                    methods.append(
                        ("kernel (tuned table)", deformable_call(problem, "triton", backward))
                    )
                if official is not None and dtype == torch.float32:
                    fn = official[1]

                    def run_official(fn=fn, p=problem, backward=backward):
                        args = [p[k] for k in ("value", "spatial_shapes", "level_start_index",
                                               "sampling_locations", "attention_weights")]  # fmt: skip
                        if not backward:
                            with torch.no_grad():
                                return fn(*args)
                        out = fn(*args)
                        out.float().sum().backward()
                        return out

                    methods.append((official[0], run_official))
                floor = hbm_floor_us(bs, nqueries, num_keys, heads, dtype_bytes=nbytes,
                                     bandwidth_tb_s=bandwidth, backward=backward)  # fmt: skip
                measured = {}
                for method, fn in methods:
                    K.LAUNCH_TABLE.update(tuned_table if "tuned" in method else original)
                    for t in leaves:
                        t.grad = None
                    try:
                        seconds = time_fn(fn, ctx.device, ctx.dry)
                        for t in leaves:
                            t.grad = None
                        peak, above = peak_mib(fn, ctx.device)
                    except Exception as err:
                        ctx.note(f"{shape} {name} {pass_} {method}: {type(err).__name__}: "
                                 f"{str(err)[:150]}")  # fmt: skip
                        continue
                    finally:
                        K.LAUNCH_TABLE.clear()
                        K.LAUNCH_TABLE.update(original)
                    if above is None and method.split()[0] in ("reference", "kernel"):
                        above = working_set_mib(
                            method.split()[0], bs, nqueries, num_keys, heads, dtype_bytes=nbytes
                        )
                        peak = None
                    measured[method] = {"s": seconds, "peak": peak, "above": above}
                ref, ker = measured.get("reference"), measured.get("kernel")
                for method, m in measured.items():
                    rows.append([
                        shape, nqueries, name, pass_, method, m["s"] * 1e3,
                        ref["s"] / m["s"] if ref else None, m["peak"], m["above"],
                        m["above"] / ker["above"] if m["above"] and ker and ker["above"] else None,
                        floor, m["s"] * 1e6 / floor,
                    ])  # fmt: skip
                results[(shape, name, pass_)] = measured | {"floor_us": floor}
                del problem, leaves, methods
                if ctx.cuda:
                    torch.cuda.empty_cache()
                ctx.save()
    if not ctx.cuda:
        ctx.note("Dry run on CPU: the kernel runs in Triton's interpreter, so times and ratios "
                 "mean nothing; memory columns are the analytic working sets.")  # fmt: skip
    ctx.note("'peak above inputs' is the peak allocated during one call minus what was "
             "allocated before it (the inputs); the memory target is judged on it.")  # fmt: skip
    # Targets, judged at the encoder shape on the kernel as shipped (current LAUNCH_TABLE).
    for name in ("float32", "bfloat16"):
        fwd = results.get(("encoder", name, "fwd"), {})
        both = results.get(("encoder", name, "fwd+bwd"), {})
        judge = None if not ctx.cuda else True
        if "kernel" in fwd:
            ratio = fwd["kernel"]["s"] * 1e6 / fwd["floor_us"]
            ctx.verdict(f"kernel forward, encoder, {name}: within 3x of the HBM floor",
                        f"{fwd['kernel']['s'] * 1e6:.1f} us = {ratio:.2f}x floor "
                        f"({fwd['floor_us']:.1f} us)", judge and ratio <= 3)  # fmt: skip
        if "kernel" in both and "reference" in both:
            speed = both["reference"]["s"] / both["kernel"]["s"]
            ctx.verdict(f"kernel fwd+bwd, encoder, {name}: >= 5x faster than the reference",
                        f"{speed:.1f}x", judge and speed >= 5)  # fmt: skip
            ka, ra = both["kernel"]["above"], both["reference"]["above"]
            if ka and ra:
                ctx.verdict(f"kernel fwd+bwd, encoder, {name}: >= 10x less peak memory",
                            f"{ra:.0f} vs {ka:.0f} MiB above inputs = {ra / ka:.1f}x"
                            + (f" (absolute peaks {both['reference']['peak']:.0f} vs "
                               f"{both['kernel']['peak']:.0f} MiB)" if ctx.cuda else
                               " (analytic)"), judge and ra / ka >= 10)  # fmt: skip
    if official is not None:
        ctx.note(
            f"Official op timed beside them: {official[0]} (fp32 only; it rejects mixed dtypes)."
        )
    elif ctx.cuda:
        ctx.note("No official CUDA op (MultiScaleDeformableAttention / mmcv) importable here.")
    if not complete:
        ctx.note("Stopped at the soft deadline: later rows are missing.")
    return {"summary": f"{len(rows)} rows" + ("" if complete else " (cut short)")}


# --- f. Deformable-DETR vs Co-DETR training steps


def synthetic_batch(sizes: Sequence[tuple[int, int]], num_classes: int, seed: int = 0) -> dict:
    """A batch shaped like ``labkit.data.collate``'s output: random images of ``sizes``
    (padded bottom-right), 8-20 random boxes each."""
    import torch

    from labkit.data.collate import collate

    gen = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        n = int(torch.randint(8, 21, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = (torch.rand(n, 2, generator=gen) * 0.3 + 0.02) * torch.tensor([w, h])
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1)
        meta = dict(image_id=i, file_name=f"{i}.png", ori_shape=(h, w), img_shape=(h, w),
                    pad_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0), flip=False,
                    flip_direction=None)  # fmt: skip
        items.append({
            "img": torch.randn(3, h, w, generator=gen),
            "gt_bboxes": boxes,
            "gt_labels": torch.randint(0, num_classes, (n,), generator=gen),
            "gt_bboxes_ignore": torch.zeros(0, 4),
            "img_meta": meta,
        })  # fmt: skip
    return collate(items)


def step_models(ctx: Context) -> dict:
    import torch

    from labkit.engine.train import build_optimizer
    from labkit.recipes import co_deformable_detr, deformable_detr, schedule

    if ctx.dry:
        backbone, sizes, classes, queries, warmup, steps = (
            "tiny",
            [(64, 96), (96, 64)],
            3,
            10,
            1,
            1,
        )
    else:
        backbone, sizes, classes, queries, warmup, steps = (
            "resnet50",
            [(800, 1333), (800, 1066)],
            80,
            300,
            3,
            8,
        )
    amp = ctx.cuda
    batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v
             for k, v in synthetic_batch(sizes, classes).items()}  # fmt: skip
    for key in ("gt_bboxes", "gt_labels", "gt_bboxes_ignore"):
        batch[key] = [t.to(ctx.device) for t in batch[key]]
    title = (
        f"Training step, {backbone}, batch {len(sizes)} ({' + '.join(f'{h}x{w}' for h, w in sizes)}), "
        f"{queries} queries, {'bf16 autocast' if amp else 'fp32'}, AdamW + grad clipping"
    )
    rows = ctx.table("models", title, ["model", "params (M)", "warm-up steps", "timed steps",
                                       "ms / step (median)", "images / s", "peak MiB",
                                       "time vs deformable_detr"], [])  # fmt: skip
    measured = {}
    recipes = (("deformable_detr", deformable_detr), ("co_deformable_detr", co_deformable_detr))
    for index, (name, build) in enumerate(recipes):
        share = ctx.left() / (len(recipes) - index)
        t0 = time.monotonic()
        torch.manual_seed(0)
        model = build(classes, backbone=backbone, num_queries=queries).to(ctx.device).train()
        config = schedule(name)
        optimizer = build_optimizer(model, config)

        def step(model=model, optimizer=optimizer, config=config) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                losses = model.loss(batch)
            total = sum(v for k, v in losses.items() if "loss" in k)
            total.backward()
            if config.max_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_norm)
            optimizer.step()

        for _ in range(warmup):
            step()
        _sync(ctx.device)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        times = []
        while len(times) < steps:
            start = time.perf_counter()
            step()
            _sync(ctx.device)
            times.append(time.perf_counter() - start)
            spent = time.monotonic() - t0
            if len(times) >= 2 and spent + times[-1] > share * 0.9:
                break
        median = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**20 if ctx.cuda else None
        params = sum(p.numel() for p in model.parameters()) / 1e6
        measured[name] = median
        base = measured.get("deformable_detr")
        rows.append([name, params, warmup, len(times), median * 1e3, len(sizes) / median, peak,
                     median / base if base else None])  # fmt: skip
        ctx.save()
        del model, optimizer, step
        if ctx.cuda:
            torch.cuda.empty_cache()
    if len(measured) == 2:
        ratio = measured["co_deformable_detr"] / measured["deformable_detr"]
        ctx.verdict("Co-DETR step time <= 1.3x Deformable-DETR's", f"{ratio:.2f}x",
                    None if ctx.dry else ratio <= 1.3)  # fmt: skip
    if ctx.dry:
        ctx.note("Dry run: tiny backbone on the CPU, a smoke test of the timing code only.")
    return {"summary": ", ".join(f"{k} {v * 1e3:.0f} ms/step" for k, v in measured.items())}


# --- g. notebooks


NOTEBOOK_TOPICS = ("deformable_attention", "codetr")


def notebook_names() -> list[str]:
    """The deformable-attention and Co-DETR notebooks (04 and 05 when written, 04 and 06 after
    the DETR-matching lesson became 05): found by topic, so a renumbering does not matter."""
    from labkit.run_notebooks import discover

    names = [p.stem for p in discover() if any(t in p.stem for t in NOTEBOOK_TOPICS)]
    return names or ["04", "05"]


def notebook_command(
    out_dir: Path, cell_timeout: float, mode: str = "full", names: Sequence[str] = ("04", "05")
) -> list[str]:
    """``labkit notebooks run NAMES [--full] --device cuda --jobs 2 --timeout S ...``."""
    return ["notebooks", "run", *names, *(["--full"] if mode == "full" else []), "--device",
            "cuda", "--jobs", "2", "--out", str(out_dir / "notebooks"), "--no-html",
            "--no-progress", "--timeout", str(int(max(cell_timeout, 10)))]  # fmt: skip


def executed_summary(path: Path) -> dict:
    """Cells run, where an executed notebook stopped (error name) and its recorded metrics."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c.get("cell_type") == "code"]
    ran = [c for c in code if c.get("execution_count") is not None]
    errors = [o.get("ename", "error") for c in code for o in c.get("outputs", [])
              if o.get("output_type") == "error"]  # fmt: skip
    metrics = {}
    with contextlib.suppress(Exception):
        from labkit.notebook import read_metrics

        metrics = read_metrics(nb)
    return {"cells": len(code), "ran": len(ran), "error": errors[0] if errors else None,
            "metrics": metrics}  # fmt: skip


def step_notebooks(ctx: Context) -> dict:
    mode = ctx.options.get("notebooks_mode", "full")
    # The short budget is papermill's per-cell timeout: a training cell longer than it stops
    # the notebook with a timeout error, and the executed copy (every cell up to that one)
    # is still published. Both notebooks run at once (--jobs 2); 45 s cover kernel start-up,
    # the cells before the long one and publishing.
    names = notebook_names()
    argv = notebook_command(ctx.out_dir, ctx.left() - 45, mode, names)
    rows = ctx.table("notebooks", f"Notebooks {', '.join(names)} ({mode} mode, CUDA), papermill",
                     ["notebook", "code cells run", "stopped at", "metrics recorded"], [])  # fmt: skip
    ctx.data["command"] = "labkit " + " ".join(argv)
    if ctx.dry:
        from labkit.cli import build_parser
        from labkit.run_notebooks import discover, select

        build_parser().parse_args(argv)  # the flags still exist
        found = [p.name for p in select(discover(), names)]
        for name in found:
            rows.append([name, "not run", None, None])
        return {"status": "skipped", "reason": f"dry run: command checked, not run ({found})"}
    start = time.monotonic()
    code, output = _run_command([sys.executable, "-m", "labkit", *argv], ctx.left() - 5,
                                env=_python_env({"LABKIT_HEADLESS": "1"}),
                                log=ctx.out_dir / "gpu_check_logs" / "notebooks.log")  # fmt: skip
    seconds = time.monotonic() - start
    ctx.data["output_tail"] = _tail(output, 40)
    timeouts = 0
    for path in sorted((ctx.out_dir / "notebooks" / "notebooks").glob("*.ipynb")):
        info = executed_summary(path)
        early = info["ran"] < info["cells"]
        stop = info["error"] or (f"cell {info['ran']} of {info['cells']}" if early else "the end")
        timeouts += early and bool(
            re.search(r"[Tt]imeout|timed out", (info["error"] or "") + output)
        )
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in info["metrics"].items())
        rows.append([path.name, f"{info['ran']} / {info['cells']}", stop, metrics[:300] or None])
    ctx.note(f"Command: `{ctx.data['command']}` ({seconds:.0f} s). Executed copies: "
             "notebooks/notebooks/ of the results folder.")  # fmt: skip
    if mode == "full":
        ctx.note("Full mode trains 3000 (deformable attention) and 6000 (Co-DETR) steps, longer than a short budget: "
                 "a cell timeout there means the GPU paths before it ran, not a failure.")  # fmt: skip
    if code is None:
        return {"status": "timeout", "summary": f"stopped after {seconds:.0f} s"}
    if code != 0 and timeouts < len(rows):
        return {"status": "failed", "summary": f"exit {code} in {seconds:.0f} s",
                "error": _tail(output, 25)}  # fmt: skip
    return {
        "summary": f"{len(rows)} notebooks in {seconds:.0f} s"
        + (f", {timeouts} stopped at the cell timeout" if timeouts else "")
    }


# --- h. zoo


def _zoo_progress(work: Path) -> tuple[int, float | None]:
    """(last logged iteration, mean seconds per iteration) from a zoo work dir's log."""
    log = work / "log.jsonl"
    if not log.is_file():
        return 0, None
    last, times = 0, []
    for line in log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("mode") == "train":
                last = max(last, int(rec.get("iter", 0)))
                if "time" in rec:
                    times.append(float(rec["time"]))
    return last, (sum(times) / len(times) if times else None)


def _train_images() -> int | None:
    """Images in the shapes train split, when it has been generated (for time estimates)."""
    ann = Path(os.environ.get("LABKIT_DATA") or REPO / "data") / "shapes" / "instances_train.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return len(json.loads(ann.read_text(encoding="utf-8"))["images"])
    return None


def step_zoo(ctx: Context) -> dict:
    import shutil

    from labkit.zoo import ZOO

    root = ctx.out_dir / "zoo"
    # Work dirs hold a checkpoint per epoch: they stay on the machine (work_dirs/ is ignored
    # by git); the logs and the float16 zoo weights go to the results folder.
    work_root = REPO / "work_dirs" / "gpu_check_zoo"
    rows = ctx.table("zoo", "Zoo entries trained on this GPU (seed 0)",
                     ["entry", "status", "seconds", "AP", "AP50", "iterations logged",
                      "s / iteration", "estimated minutes for the whole entry"], [])  # fmt: skip
    if ctx.dry:
        from labkit.cli import build_parser

        parser = build_parser()
        for name in ZOO:
            parser.parse_args(["zoo", "train", name, "--device", "cuda", "--seed", "0"])
            rows.append([name, "command checked, not run", None, None, None, None, None, None])
        return {"status": "skipped", "reason": f"dry run: {len(ZOO)} commands checked, not run"}
    env = _python_env({"LABKIT_ZOO": str(root / "models")})
    done = 0
    for name, entry in ZOO.items():
        if ctx.left() < 45:
            rows.append([name, "skipped: no time left", None, None, None, None, None, None])
            continue
        start = time.monotonic()
        cmd = [sys.executable, "-m", "labkit", "zoo", "train", name, "--device", "cuda",
               "--seed", "0", "--work-root", str(work_root)]  # fmt: skip
        code, _ = _run_command(cmd, ctx.left() - 5, env=env,
                               log=ctx.out_dir / "gpu_check_logs" / f"zoo_{name}.log")  # fmt: skip
        work = work_root / f"{name}-seed0"
        it, per_it = _zoo_progress(work)
        if (work / "log.jsonl").is_file():
            root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "log.jsonl", root / f"{name}-seed0.train.log.jsonl")
        images, args = _train_images(), entry.train_args
        estimate = None
        if per_it and images and args.get("epochs") and args.get("batch_size"):
            estimate = per_it * args["epochs"] * math.ceil(images / args["batch_size"]) / 60
        ap = ap50 = None
        manifest = root / "models" / "MANIFEST.json"
        if code == 0 and manifest.is_file():
            for row in json.loads(manifest.read_text(encoding="utf-8"))["models"]:
                if row["name"] == name:
                    ap, ap50 = row["AP"], row["AP50"]
            done += 1
        status = "trained" if code == 0 else ("timeout" if code is None else f"exit {code}")
        rows.append([name, status, time.monotonic() - start, ap, ap50, it, per_it, estimate])
        ctx.save()
    ctx.note(f"Float16 weights, manifest and training logs: {root.name}/ of the results folder; "
             f"the resumable work dirs stay on the machine in {work_root.relative_to(REPO)}.")  # fmt: skip
    return {"summary": f"{done} of {len(ZOO)} entries trained"}


STEP_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "environment": step_environment, "tests": step_tests, "correctness": step_correctness,
    "autotune": step_autotune, "bench": step_bench, "models": step_models,
    "notebooks": step_notebooks, "zoo": step_zoo,
}  # fmt: skip


def worker_main(args: argparse.Namespace) -> int:
    """Run one step in this process (the parent's subprocess) and write its result JSON."""
    result_path = Path(args.result)
    previous = json.loads(Path(args.context).read_text(encoding="utf-8")) if args.context else {}
    ctx = Context(args.worker, args.dry_run, args.deadline_s, result_path, Path(args.out),
                  previous)  # fmt: skip
    ctx.options["notebooks_mode"] = args.notebooks_mode
    try:
        if args.worker in [s for s in os.environ.get(FAIL_ENV, "").split(",") if s]:
            raise RuntimeError(f"injected failure ({FAIL_ENV}={os.environ[FAIL_ENV]})")
        outcome = STEP_FUNCTIONS[args.worker](ctx) or {}
        ctx.data.update(outcome)
        ctx.data.setdefault("status", "ok")
        code = 0
    except Exception as err:
        ctx.data.update(status="error", error=f"{type(err).__name__}: {err}",
                        traceback=_tail(traceback.format_exc(), 20))  # fmt: skip
        traceback.print_exc()
        code = 1
    ctx.save()
    return code


# ----------------------------------------------------------------------------- parent side


def print_plan(steps: list[Step], skipped: dict[str, str], dry: bool, budget: float) -> str:
    mode = "dry run (CPU, tiny shapes, TRITON_INTERPRET=1)" if dry else "GPU run"
    lines = [f"gpu_check plan: {mode}, budget {budget:.0f} s ({RESERVE_S:.0f} s kept to write "
             "the results); steps run in this order, each in a subprocess under its budget as a "
             "hard timeout:"]  # fmt: skip
    total = 0.0
    for i, step in enumerate(steps, 1):
        b = step.dry_budget_s if dry else step.budget_s
        if step.name in skipped:
            budget_text = "skipped"
        elif dry:
            budget_text = f"<= {b:.0f} s"
            total += b
        elif step.min_s:
            budget_text = f"{step.min_s:.0f}-{b:.0f} s (what is left)"
        else:
            budget_text = f"{b:.0f} s"
            total += b
        extra = f"  [{skipped[step.name]}]" if step.name in skipped else ""
        lines.append(f"  {i}. {step.name:<12} {budget_text:<24} {step.title}{extra}")
    runnable = [s.name for s in steps if s.name not in skipped]
    if dry:
        lines.append(
            f"Budgets add up to {total:.0f} s; each step gets its budget or what is left of "
            f"{budget - RESERVE_S:.0f} s, whichever is less, and is skipped with under "
            f"{DRY_MIN_S:.0f} s left, so if time runs short these go first: "
            f"{', '.join(reversed(runnable)) or 'none'}."
        )
    else:
        lines.append(
            f"Fixed budgets add up to {total:.0f} s of {budget - RESERVE_S:.0f} s; the rest goes "
            "to the elastic steps. A step whose budget exceeds the time left is skipped, so "
            f"if time runs short these go first: {', '.join(reversed(runnable)) or 'none'}."
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def render_markdown(meta: dict, results: dict[str, dict]) -> str:
    """The results file: RESULTS.md's layout, one section per step."""
    info = results.get("environment", {}).get("info", {})
    device = info.get("device") or meta.get("device", "unknown device")
    out = [f"# GPU check (`benchmarks.gpu_check`{' --dry-run' if meta['dry_run'] else ''})", ""]
    out.append(
        f"**Device.** {device}; torch {info.get('torch', meta.get('torch'))}, triton "
        f"{info.get('triton', '?')}, CUDA {info.get('cuda', '?')}. Run {meta['started']} UTC, "
        f"budget {meta['budget_s']:.0f} s, wall time {meta.get('wall_s', 0):.0f} s"
        + (" (still running)" if not meta.get("finished") else "") + ". Every number below was "
        "measured in this one run, the compared implementations side by side."
    )  # fmt: skip
    if meta["dry_run"]:
        out += ["", "**Dry run**: CPU, tiny shapes, the Triton kernels in the interpreter; the "
                "figures only show that every path runs, they measure nothing."]  # fmt: skip
    out += ["", "## Steps", ""]
    rows = []
    for name in meta["steps"]:
        r = results.get(name, {"status": "pending"})
        note = r.get("reason") or r.get("summary") or (r.get("error") or "").splitlines()[-1:] or ""
        if isinstance(note, list):
            note = note[0] if note else ""
        rows.append([name, r.get("status"), r.get("seconds"), r.get("allotted_s"),
                     str(note).replace("|", "/").replace("\n", " ")[:200]])  # fmt: skip
    out.append(markdown_table(["step", "status", "seconds", "budget s", "result / reason"], rows))
    verdicts = [v for name in meta["steps"] for v in results.get(name, {}).get("verdicts", [])]
    out += ["", "## Target verdicts", ""]
    if verdicts:
        out.append(markdown_table(["target", "measured", "verdict"],
                                  [[v["target"], v["measured"], v["verdict"]] for v in verdicts]))  # fmt: skip
    else:
        out.append("No target was measured.")
    titles = {"environment": "Environment", "tests": "CUDA-only tests",
              "correctness": "Kernel correctness", "autotune": "Launch configuration (autotune)",
              "bench": "Multi-scale deformable attention", "models": "Training step: "
              "Deformable-DETR vs Co-DETR", "notebooks": "Notebooks", "zoo": "Zoo"}  # fmt: skip
    for name in meta["steps"]:
        r = results.get(name)
        if not r:
            continue
        out += ["", f"## {titles.get(name, name)} (`{name}`)", ""]
        out.append(f"Status: {r.get('status')}" + (f" ({r['reason']})" if r.get("reason") else "")
                   + (f"; {r['summary']}" if r.get("summary") else "") + ".")  # fmt: skip
        for table in r.get("tables", []):
            if table["rows"]:
                out += [
                    "",
                    f"{table['title']}:",
                    "",
                    markdown_table(table["header"], table["rows"]),
                ]
        for note in r.get("notes", []):
            out += ["", note]
        if r.get("snippet"):
            out += ["", "Ready to paste over `LAUNCH_TABLE` in `labkit/detr/ms_deform_attn_triton.py`:",
                    "", "```python", r["snippet"], "```"]  # fmt: skip
        if r.get("status") in ("error", "failed", "timeout") and (
            r.get("traceback") or r.get("error")
        ):
            out += ["", "```text", r.get("traceback") or r.get("error"), "```"]
        if r.get("output_tail") and r.get("status") != "ok":
            out += ["", "Output (tail):", "", "```text", r["output_tail"], "```"]
    return "\n".join(out) + "\n"


def write_results(out_dir: Path, meta: dict, plan: str, results: dict) -> Path:
    path = out_dir / f"{RESULTS_NAME}.md"
    _write_atomic(path, render_markdown(meta, results))
    _write_atomic(
        out_dir / f"{RESULTS_NAME}.json",
        json.dumps({"meta": meta, "plan": plan, "steps": results}, default=str, indent=1),
    )
    return path


def run_step(step: Step, args: argparse.Namespace, allotted: float, results: dict,
             out_dir: Path) -> dict:  # fmt: skip
    logs = out_dir / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        result_path, context_path = Path(tmp) / "result.json", Path(tmp) / "context.json"
        context_path.write_text(json.dumps(results, default=str), encoding="utf-8")
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", step.name,
               "--result", str(result_path), "--context", str(context_path), "--out",
               str(out_dir), "--deadline-s", f"{allotted * SOFT_DEADLINE:.1f}",
               "--notebooks-mode", args.notebooks_mode]  # fmt: skip
        extra = {}
        if args.dry_run:
            cmd.append("--dry-run")
            if step.interpret:
                extra["TRITON_INTERPRET"] = "1"
        start = time.monotonic()
        code, output = _run_command(cmd, allotted, env=_python_env(extra),
                                    log=logs / f"{step.name}.log")  # fmt: skip
        seconds = time.monotonic() - start
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = {"status": "error", "error": "the worker wrote no result",
                      "traceback": _tail(output, 20)}  # fmt: skip
    if code is None:
        result["status"] = "timeout"
        result["error"] = f"killed at its {allotted:.0f} s budget; partial results kept"
    elif code != 0 and result.get("status") == "ok":
        result.update(status="error", error=f"worker exit {code}", traceback=_tail(output, 20))
    result.update(seconds=round(seconds, 1), allotted_s=round(allotted, 1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU rehearsal: tiny shapes, TRITON_INTERPRET=1, tiny models")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds (default 480; 175 with --dry-run)")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="results folder (default: $OUT if set, else build/gpu_check)")  # fmt: skip
    parser.add_argument("--skip", nargs="+", default=[], choices=STEP_NAMES, metavar="STEP",
                        help=f"steps to leave out: {', '.join(STEP_NAMES)}")  # fmt: skip
    parser.add_argument("--notebooks-mode", choices=("full", "quick"), default="full",
                        help="notebooks step: full mode (default; its 3000 / 6000 training "
                        "steps rarely finish in the budget) or quick mode on CUDA (every cell "
                        "runs, in a minute or two)")  # fmt: skip
    parser.add_argument("--worker", choices=STEP_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "build" / "gpu_check").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out = str(out_dir)
    if args.worker:
        return worker_main(args)

    budget = args.budget_s or (175.0 if args.dry_run else 480.0)
    t0 = time.monotonic()
    import torch  # the parent only asks whether CUDA exists; steps run in subprocesses

    cuda = torch.cuda.is_available()
    skipped: dict[str, str] = {}
    for step in STEPS:
        missing = _missing(step.requires)
        if step.name in args.skip:
            skipped[step.name] = "--skip"
        elif missing:
            skipped[step.name] = f"missing package(s): {', '.join(missing)}"
        elif step.cuda and not cuda and not args.dry_run:
            skipped[step.name] = "no CUDA device (use --dry-run to rehearse on the CPU)"
    plan = print_plan(STEPS, skipped, args.dry_run, budget)
    meta = {
        "dry_run": args.dry_run, "budget_s": budget, "steps": STEP_NAMES,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__, "argv": sys.argv[1:], "finished": False,
        # The device is named by the environment step: the parent never initialises CUDA (a
        # GPU in exclusive-process mode would then refuse the step subprocesses).
        "device": "CUDA device" if cuda and not args.dry_run else f"CPU {platform.machine()}",
    }  # fmt: skip
    results: dict[str, dict] = {}
    for step in STEPS:
        left = budget - RESERVE_S - (time.monotonic() - t0)
        print(f"\n== {step.name} ({left:.0f} s left)", flush=True)
        if step.name in skipped:
            results[step.name] = {"status": "skipped", "reason": skipped[step.name]}
        else:
            need, allotted = step.allotment(args.dry_run, left)
            if need > left:
                results[step.name] = {
                    "status": "skipped",
                    "reason": f"not enough time left: needs {need:.0f} s, {max(left, 0):.0f} s left",
                }
            else:
                results[step.name] = run_step(step, args, allotted, results, out_dir)
        r = results[step.name]
        print(f"== {step.name}: {r['status']}" + (f" in {r['seconds']} s" if "seconds" in r else "")
              + f" - {r.get('reason') or r.get('summary') or r.get('error', '')}", flush=True)  # fmt: skip
        meta["wall_s"] = round(time.monotonic() - t0, 1)
        write_results(out_dir, meta, plan, results)
    meta.update(finished=True, wall_s=round(time.monotonic() - t0, 1))
    path = write_results(out_dir, meta, plan, results)
    # The summary and verdicts once more at the end, where a device tool's output tail is.
    text = path.read_text(encoding="utf-8")
    print("\n" + text[text.index("## Steps") : text.index("\n## ", text.index("## Target"))])
    bad = [n for n, r in results.items() if r["status"] in ("error", "failed", "timeout")]
    print(f"\ngpu_check: {meta['wall_s']:.0f} s; results in {path} (+ .json); "
          + (f"problems: {', '.join(bad)}" if bad else "no step failed"), flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
