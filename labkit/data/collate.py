"""Batch items into one padded tensor with a padding mask, and a seeded DataLoader around it."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["collate", "make_loader"]


def _check_items(items: object) -> list[dict]:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"items: expected a list of item dicts, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError("items: cannot collate an empty batch")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"items[{i}]: expected an item dict, got {type(item).__name__}")
        for key in ("img", "img_meta"):
            if key not in item:
                raise ValueError(f"items[{i}]: missing key {key!r}")
        img = item["img"]
        if not isinstance(img, Tensor):
            raise TypeError(
                f"items[{i}]['img']: expected a tensor [3, H, W] (end the transforms with "
                f"ToTensor), got {type(img).__name__}"
            )
        if img.dim() != 3:
            raise ValueError(f"items[{i}]['img']: expected shape [C, H, W], got {tuple(img.shape)}")
        if img.shape[0] != items[0]["img"].shape[0]:
            raise ValueError(f"items[{i}]['img']: channel count differs from items[0]")
    return list(items)


def collate(items: list[dict], size_divisor: int | None = None) -> dict:
    """Stack items into a batch padded bottom-right to the largest image.

    Args:
        items: dataset items, each ``{"img": Tensor[3, H, W], "gt_bboxes", "gt_labels",
            "gt_bboxes_ignore", "img_meta"}``.
        size_divisor: if given, the batch size is further rounded up to a multiple of it.

    Returns:
        ``{"img": Tensor[B, 3, Hp, Wp], "padding_mask": BoolTensor[B, Hp, Wp], "gt_bboxes":
        list[Tensor[K_i, 4]], "gt_labels": list[LongTensor[K_i]], "gt_bboxes_ignore":
        list[Tensor[G_i, 4]], "img_metas": list[dict]}``. ``padding_mask`` is True on every
        pixel outside the image's ``img_shape`` (so also on padding the ``Pad`` transform
        added), as mmdetection's DETR builds it; each meta gains ``batch_input_shape = (Hp, Wp)``.
    """
    items = _check_items(items)
    if size_divisor is not None and (
        isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor <= 0
    ):
        raise ValueError(f"size_divisor: expected a positive int or None, got {size_divisor!r}")
    hp = max(int(it["img"].shape[1]) for it in items)
    wp = max(int(it["img"].shape[2]) for it in items)
    if size_divisor is not None:
        hp = math.ceil(hp / size_divisor) * size_divisor
        wp = math.ceil(wp / size_divisor) * size_divisor
    first = items[0]["img"]
    imgs = first.new_zeros((len(items), first.shape[0], hp, wp))
    padding_mask = torch.ones((len(items), hp, wp), dtype=torch.bool, device=first.device)
    metas = []
    for i, it in enumerate(items):
        img = it["img"]
        imgs[i, :, : img.shape[1], : img.shape[2]] = img
        meta = dict(it["img_meta"])
        h, w = meta.get("img_shape", tuple(img.shape[1:]))
        padding_mask[i, :h, :w] = False
        meta["batch_input_shape"] = (hp, wp)
        metas.append(meta)
    empty_boxes = first.new_zeros((0, 4))
    return {
        "img": imgs,
        "padding_mask": padding_mask,
        "gt_bboxes": [it.get("gt_bboxes", empty_boxes) for it in items],
        "gt_labels": [
            it.get("gt_labels", torch.zeros(0, dtype=torch.long, device=first.device))
            for it in items
        ],
        "gt_bboxes_ignore": [it.get("gt_bboxes_ignore", empty_boxes) for it in items],
        "img_metas": metas,
    }


def make_loader(
    dataset: Dataset,
    batch_size: int = 2,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    size_divisor: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` using :func:`collate`; ``shuffle`` order is fixed by ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        collate_fn=functools.partial(collate, size_divisor=size_divisor),
    )
