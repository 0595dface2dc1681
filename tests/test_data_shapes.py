"""Synthetic shapes: same seed same bytes, idempotent cache, sizes spanning every FPN level."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from labkit.data import collate, shapes_dataset, shapes_sample, train_transforms
from labkit.data.shapes import CLASSES, MIN_SIZE, make_shapes, render_shapes


def _hashes(root) -> dict:
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)["files"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_a")
    manifest = make_shapes(root, seed=0, num_train=6, num_val=3, image_size=256)
    return root, manifest


def test_layout_and_manifest(small):
    root, manifest = small
    assert manifest["generated"] is True
    files = manifest["files"]
    assert sorted(p for p in files if p.endswith(".json")) == [
        "instances_train.json",
        "instances_val.json",
    ]
    assert sum(p.startswith("train/") for p in files) == 6
    assert sum(p.startswith("val/") for p in files) == 3
    assert manifest["params"]["seed"] == 0 and manifest["params"]["image_size"] == 256


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    root, manifest = small
    again = make_shapes(tmp_path / "b", seed=0, num_train=6, num_val=3, image_size=256)
    assert again["files"] == manifest["files"]
    other = make_shapes(tmp_path / "c", seed=1, num_train=6, num_val=3, image_size=256)
    assert set(other["files"]) == set(manifest["files"])
    differ = [p for p in other["files"] if other["files"][p] != manifest["files"][p]]
    assert len(differ) == len(manifest["files"])


def test_second_call_is_a_noop_and_changed_params_regenerate(tmp_path):
    root = tmp_path / "s"
    make_shapes(root, seed=0, num_train=2, num_val=1, image_size=128)
    png = root / "train" / "000000.png"
    mtime = png.stat().st_mtime_ns
    second = make_shapes(root, seed=0, num_train=2, num_val=1, image_size=128)
    assert second["generated"] is False
    assert png.stat().st_mtime_ns == mtime
    changed = make_shapes(root, seed=0, num_train=3, num_val=1, image_size=128)
    assert changed["generated"] is True
    assert sorted(os.listdir(root / "train")) == ["000000.png", "000001.png", "000002.png"]
    # a train prefix does not depend on the split length
    assert changed["files"]["train/000000.png"] == second["files"]["train/000000.png"]
    png.write_bytes(b"corrupt")
    assert make_shapes(root, seed=0, num_train=3, num_val=1, image_size=128)["generated"] is True


def test_dataset_items_are_consistent(small):
    root, _ = small
    ds = shapes_dataset("val", root=root, seed=0, num_train=6, num_val=3, image_size=256)
    assert ds.classes == list(CLASSES)
    assert ds.cat_ids == [1, 2, 3, 4, 5]
    assert len(ds) == 3
    for i in range(len(ds)):
        it = ds[i]
        assert it["img"].shape == (3, 256, 256)
        b = it["gt_bboxes"]
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert (b >= 0).all() and (b <= 256).all()
        assert ((it["gt_labels"] >= 0) & (it["gt_labels"] < len(CLASSES))).all()
    batch = collate([ds[0], ds[1]])
    assert batch["img"].shape == (2, 3, 256, 256)


def test_size_spread_covers_small_and_large_objects():
    sizes, ratios, crowd, empty = [], [], 0, 0
    for i in range(60):
        _, anns = render_shapes(np.random.default_rng([5, 0, i]), 512)
        empty += not anns
        for a in anns:
            x1, y1, x2, y2 = a["bbox"]
            if a["iscrowd"]:
                crowd += 1
                continue
            sizes.append(np.sqrt((x2 - x1) * (y2 - y1)))
            ratios.append((x2 - x1) / (y2 - y1))
    sizes = np.array(sizes)
    assert (sizes < 16).sum() > 20  # P3 territory, common
    assert (sizes > 256).sum() >= 3  # P6/P7 territory
    assert ((sizes > 32) & (sizes < 128)).sum() > 20
    assert np.median(sizes) < 64  # weighted towards small objects
    assert np.percentile(ratios, 5) < 0.6 and np.percentile(ratios, 95) > 1.7
    assert crowd >= 1
    assert sizes.min() >= MIN_SIZE / 4


def test_occluded_objects_use_visible_extent():
    # every kept box is tight: visible pixels of the object touch all four sides
    img, anns = render_shapes(np.random.default_rng([0, 0, 0]), 256)
    assert img.dtype == np.uint8 and img.shape == (256, 256, 3)
    for a in anns:
        x1, y1, x2, y2 = a["bbox"]
        assert 0 < a["area"] <= (x2 - x1) * (y2 - y1)


def test_shapes_sample_is_deterministic_and_in_memory():
    a, b, c = shapes_sample(3), shapes_sample(3), shapes_sample(4)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["gt_bboxes"], b["gt_bboxes"])
    assert not torch.equal(a["img"], c["img"])
    assert a["img"].shape == (3, 512, 512)
    assert a["gt_bboxes"].shape[0] == a["gt_labels"].shape[0]
    t = shapes_sample(3, image_size=256, transforms=train_transforms((128, 128), flip_prob=0.0))
    assert t["img"].shape == (3, 128, 128)
    assert t["img_meta"]["scale_factor"] == (0.5, 0.5, 0.5, 0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train"):
        make_shapes("/nonexistent/never", num_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes("/nonexistent/never", image_size=16)
    with pytest.raises(ValueError, match="split"):
        shapes_dataset("test")


def test_default_root_is_the_checkouts_data_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from labkit.data import data_root

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    assert data_root() == repo / "data"
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.chdir(tmp_path)
    make_shapes(seed=2, num_train=1, num_val=1, image_size=64)
    assert (tmp_path / "shapes" / "instances_val.json").is_file()
