"""Check the Triton kernel against the reference on CPU, through ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so the check runs in a
fresh Python subprocess: the calling process (a test session, a notebook) keeps its own
triton untouched. ``python -m labkit.detr.interpret_check`` prints the result as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["random_cases", "compare_case", "run_interpreted_check"]


def random_cases(num_cases: int = 6, seed: int = 0, max_work: int = 48) -> list[dict]:
    """Small random problem sizes: odd level sizes, 1-8 heads and points, batch 1-3.

    The interpreter's time grows with ``bs * heads * levels * points`` (programs times unrolled
    loop bodies), so each case keeps that product at most ``max_work``, dropping levels and
    images first. The first two cases pin the extremes: 1 head x 8 points, 8 heads x 1 point.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    cases = []
    for i in range(num_cases):
        heads = [1, 8][i] if i < 2 else pick(1, 8)
        points = [8, 1][i] if i < 2 else pick(1, 8)
        levels, bs = pick(1, 4), pick(1, 3)
        while bs * heads * levels * points > max_work and (levels > 1 or bs > 1):
            if levels > 1:
                levels -= 1
            else:
                bs -= 1
        cases.append(
            dict(
                bs=bs,
                num_queries=pick(1, 9),
                num_heads=heads,
                head_dims=[4, 32][i] if i < 2 else pick(2, 20),
                num_points=points,
                shapes=[(pick(1, 7), pick(1, 7)) for _ in range(levels)],
            )
        )
    return cases


def compare_case(case: dict, seed: int = 0) -> dict:
    """Max abs differences kernel vs reference for one case: output and the three gradients."""
    import torch

    from labkit.detr.ms_deform_attn import (
        level_start_index_from_shapes,
        multi_scale_deformable_attn_pytorch,
    )
    from labkit.detr.ms_deform_attn_triton import ms_deform_attn_triton

    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case["shapes"], dtype=torch.long)
    starts = level_start_index_from_shapes(shapes)
    bs, nq, heads = case["bs"], case["num_queries"], case["num_heads"]
    dims, points, levels = case["head_dims"], case["num_points"], len(case["shapes"])
    num_keys = int(shapes.prod(1).sum())
    value = torch.randn(bs, num_keys, heads, dims, generator=gen)
    # Some locations fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(bs, nq, heads, levels, points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(bs, nq, heads, levels, points, generator=gen)
    grad_out = torch.randn(bs, nq, heads * dims, generator=gen)
    results = []
    for fn in (multi_scale_deformable_attn_pytorch, ms_deform_attn_triton):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out)
        results.append((out, *grads))
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    return {
        name: float((a - b).detach().abs().max()) if a.numel() else 0.0
        for name, a, b in zip(names, results[0], results[1], strict=True)
    }


def run_interpreted_check(num_cases: int = 6, seed: int = 0, timeout: float = 120.0) -> dict:
    """Run ``compare_case`` on ``random_cases`` in a subprocess with ``TRITON_INTERPRET=1``.

    Returns:
        ``{"ok": bool, "cases": [...], "max_abs_diff": {name: float}, "error": str|None}``;
        ``ok`` is False (with ``error``) when triton is missing or the interpreter fails.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "labkit.detr.interpret_check", str(num_cases), str(seed)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "cases": [], "max_abs_diff": {}, "error": "timed out"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"ok": False, "cases": [], "max_abs_diff": {}, "error": "\n".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(num_cases: int, seed: int) -> dict:
    cases = random_cases(num_cases, seed)
    diffs = [compare_case(case, seed + i) for i, case in enumerate(cases)]
    worst = {name: max(d[name] for d in diffs) for name in diffs[0]}
    return {"ok": True, "cases": cases, "per_case": diffs, "max_abs_diff": worst, "error": None}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (or call run_interpreted_check())")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print(json.dumps(_main(n, s)))
