"""collate: bottom-right padding, padding masks exactly on padding, batch_input_shape; make_loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.data import RandomFlip, ToTensor, collate, make_loader


def item(h: int, w: int, img_shape=None, k: int = 1, value: float = 1.0) -> dict:
    return {
        "img": torch.full((3, h, w), value),
        "gt_bboxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]] * k),
        "gt_labels": torch.zeros(k, dtype=torch.long),
        "gt_bboxes_ignore": torch.zeros(0, 4),
        "img_meta": {"img_shape": img_shape or (h, w), "pad_shape": (h, w), "image_id": k},
    }


def test_pads_bottom_right_and_masks_padding():
    batch = collate([item(4, 6, value=1.0), item(5, 3, value=2.0, k=2)])
    assert batch["img"].shape == (2, 3, 5, 6)
    assert batch["padding_mask"].shape == (2, 5, 6) and batch["padding_mask"].dtype == torch.bool
    assert (batch["img"][0, :, :4, :6] == 1).all() and (batch["img"][0, :, 4:] == 0).all()
    assert (batch["img"][1, :, :5, :3] == 2).all() and (batch["img"][1, :, :, 3:] == 0).all()
    expected0 = torch.ones(5, 6, dtype=torch.bool)
    expected0[:4, :6] = False
    expected1 = torch.ones(5, 6, dtype=torch.bool)
    expected1[:5, :3] = False
    assert torch.equal(batch["padding_mask"][0], expected0)
    assert torch.equal(batch["padding_mask"][1], expected1)
    assert [m["batch_input_shape"] for m in batch["img_metas"]] == [(5, 6), (5, 6)]
    assert [len(b) for b in batch["gt_bboxes"]] == [1, 2]
    assert [len(b) for b in batch["gt_labels"]] == [1, 2]
    assert all(b.shape == (0, 4) for b in batch["gt_bboxes_ignore"])


def test_mask_marks_pad_transform_padding_too():
    # an image padded to 8x8 by Pad, real content 6x5: the mask is True outside img_shape
    batch = collate([item(8, 8, img_shape=(6, 5))])
    mask = batch["padding_mask"][0]
    assert not mask[:6, :5].any()
    assert mask[6:].all() and mask[:, 5:].all()
    assert int(mask.sum()) == 64 - 30


def test_size_divisor_rounds_batch_up():
    batch = collate([item(33, 10), item(20, 65)], size_divisor=32)
    assert batch["img"].shape == (2, 3, 64, 96)
    assert batch["img_metas"][0]["batch_input_shape"] == (64, 96)
    assert int((~batch["padding_mask"][0]).sum()) == 33 * 10


def test_input_metas_not_mutated():
    items = [item(4, 4)]
    collate(items)
    assert "batch_input_shape" not in items[0]["img_meta"]


def test_bad_batches():
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(TypeError, match="items"):
        collate(item(4, 4))
    bad = item(4, 4)
    bad["img"] = bad["img"].numpy()
    with pytest.raises(TypeError, match=r"items\[0\]\['img'\]"):
        collate([bad])
    with pytest.raises(ValueError, match="size_divisor"):
        collate([item(4, 4)], size_divisor=0)


class _Toy(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return item(4 + i % 3, 5, k=i + 1)


def test_make_loader_is_seeded():
    def order(seed):
        loader = make_loader(_Toy(), batch_size=3, shuffle=True, seed=seed)
        return [m["image_id"] for b in loader for m in b["img_metas"]]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(1, 11))
    plain = make_loader(_Toy(), batch_size=4, size_divisor=8)
    first = next(iter(plain))
    assert first["img"].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(_Toy(), batch_size=0)


class _Flipping(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.flip = RandomFlip(0.5, seed=0)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        raw = {"img": np.zeros((4, 4, 3), np.uint8), "img_meta": {"img_shape": (4, 4)}}
        return ToTensor()(self.flip(raw))


def test_random_flip_differs_across_workers_but_repeats_across_runs():
    def flips(seed):
        loader = make_loader(_Flipping(), batch_size=1, num_workers=2, seed=seed)
        return [b["img_metas"][0]["flip"] for b in loader]

    first = flips(0)
    assert first == flips(0)
    # batches alternate between the two workers; identical generators would repeat in pairs
    assert first[0::2] != first[1::2]
