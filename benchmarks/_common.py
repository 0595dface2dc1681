"""Timing and table helpers shared by every benchmark script (never used by tests)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work so a timer measures the kernel, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeat: int = 5,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def time_side_by_side(
    fns: Sequence[Callable[[], object]],
    calls_per_round: Sequence[int],
    *,
    rounds: int = 5,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Median wall time (s) of each ``fns[i]()``, timed in interleaved rounds.

    Each round times ``calls_per_round[i]`` calls of every function in turn, so that a slow
    spell of a shared machine hits all of them alike and their ratio stays fair. One
    untimed round first warms caches and allocators.
    """
    times: list[list[float]] = [[] for _ in fns]
    for round_index in range(rounds + 1):
        for fn, calls, out in zip(fns, calls_per_round, times, strict=True):
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                sync(device)
                if round_index:
                    out.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak CUDA memory of one ``fn()`` call in MiB (``None`` on CPU, where torch does not track it)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def describe_device(device: torch.device | str) -> str:
    """A one-line name of the machine a table was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print (and return) a Markdown table, floats shown with 4 significant digits."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text + "\n")
    return text
