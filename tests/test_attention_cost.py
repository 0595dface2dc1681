"""Notebook 04's cost measurements: encoder level shapes, measured peak memory, the sweep."""

import pytest
import torch

from labkit.lessons.attention_cost import encoder_cost_sweep, encoder_shapes, peak_rss_mib


def test_encoder_shapes_round_up_per_stride():
    assert encoder_shapes(800, 1333) == [(100, 167), (50, 84), (25, 42), (13, 21)]
    assert encoder_shapes(128, 128) == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_peak_rss_sees_a_large_temporary_allocation():
    mib = peak_rss_mib(lambda: torch.ones(16, 2**20).sum())  # 64 MiB of float32, then freed
    if mib is None:
        pytest.skip("no /proc/self/clear_refs (not Linux): peak RSS cannot be measured here")
    assert 60 <= mib <= 100


def test_sweep_rows_and_dense_memory_growing_faster_than_tokens():
    rows = encoder_cost_sweep([64, 128], repeat=1)
    assert [(r["method"], r["image_size"]) for r in rows] == [
        ("dense", 64),
        ("reference", 64),
        ("dense", 128),
        ("reference", 128),
    ]
    assert [r["num_tokens"] for r in rows[::2]] == [85, 340]  # 8x8+4x4+2x2+1x1, 16^2+8^2+4^2+2^2
    assert all(r["ms"] > 0 and r["mib"] >= 0 for r in rows)
