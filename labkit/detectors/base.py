"""The detector interface and its one entry point: validate a collated batch once, move it once.

Every labkit detector (one-stage, Faster R-CNN, Deformable-DETR, Co-DETR) is a ``Detector``:

* ``loss(batch) -> {"loss_*": Tensor[]}`` (the training loop sums the entries named ``loss``),
* ``predict(batch, rescale=True) -> [{"boxes": Tensor[K, 4], "scores": Tensor[K],
  "labels": LongTensor[K]}, ...]`` per image.

Both start with :meth:`Detector.inputs`, the only place a batch is checked and moved: the
checks run on the CPU copy (cheap, and the error names the argument before any device work),
then every tensor moves to the model's device once. Heads below this layer trust the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from labkit import to_device
from labkit.heads.dense_head import check_gt_instances

__all__ = ["Detector", "check_batch", "padding_mask_of"]


def check_batch(batch: object, with_gt: bool) -> None:
    """Raise ``TypeError``/``ValueError`` naming the key unless ``batch`` is ``collate``'s dict.

    Needs ``img: Tensor[B, 3, H, W]`` and ``img_metas`` (``B`` dicts), plus ``gt_bboxes`` and
    ``gt_labels`` (``B`` entries each) when ``with_gt``.
    """
    if not isinstance(batch, dict):
        raise TypeError(
            f"batch: expected the dict made by labkit.data.collate, got {type(batch).__name__}"
        )
    for key in ("img", "img_metas") + (("gt_bboxes", "gt_labels") if with_gt else ()):
        if key not in batch:
            raise ValueError(f"batch: missing key {key!r}")
    img = batch["img"]
    if not isinstance(img, Tensor):
        raise TypeError(f"img: expected a Tensor[B, 3, H, W], got {type(img).__name__}")
    if img.dim() != 4:
        raise ValueError(f"img: expected shape [B, 3, H, W], got {tuple(img.shape)}")
    if len(batch["img_metas"]) != img.shape[0]:
        raise ValueError(
            f"img_metas: expected {img.shape[0]} entries (one per image), got {len(batch['img_metas'])}"
        )


def padding_mask_of(batch: dict) -> Tensor:
    """``BoolTensor[B, H, W]``, True on padding: the batch's own mask, or one rebuilt from each
    image's ``img_shape`` (bottom-right padding), as mmdetection does."""
    mask = batch.get("padding_mask")
    if mask is not None:
        return mask
    img = batch["img"]
    mask = torch.ones(img.shape[0], *img.shape[-2:], dtype=torch.bool, device=img.device)
    for i, meta in enumerate(batch["img_metas"]):
        h, w = tuple(meta["img_shape"])[:2]
        mask[i, :h, :w] = False
    return mask


class Detector(nn.Module):
    """Base of every detector: ``num_classes``, ``device`` and the batch entry point.

    Subclasses implement ``loss(batch)`` and ``predict(batch, rescale=True)``, both starting
    with ``batch = self.inputs(batch, with_gt=...)``. ``recipe`` is ``(name, kwargs)`` when
    built by a ``labkit.recipes`` function, so a checkpoint can rebuild the model.
    """

    num_classes: int
    recipe: tuple[str, dict] | None = None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def inputs(self, batch: dict, with_gt: bool = True) -> dict:
        """Validate a collated ``batch`` (on its own device, before any move), then move it.

        Returns a copy with every tensor on :attr:`device` and ``padding_mask``
        (``BoolTensor[B, H, W]``) filled in when the batch had none. Ground truth, when
        ``with_gt``, must be ``gt_bboxes[i]: Tensor[K_i, 4]`` xyxy pixels and
        ``gt_labels[i]: LongTensor[K_i]`` in ``0..num_classes-1`` (``K_i = 0`` is valid).
        """
        check_batch(batch, with_gt)
        if with_gt:
            check_gt_instances(
                batch["gt_bboxes"],
                batch["gt_labels"],
                self.num_classes,
                batch.get("gt_bboxes_ignore"),
                batch["img_metas"],
            )
        batch = {**batch, "padding_mask": padding_mask_of(batch)}
        return to_device(batch, self.device)

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses of a collated batch: ``{"loss_*": Tensor[]}``."""
        raise NotImplementedError

    def predict(self, batch: dict, rescale: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image: ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": LongTensor[K]}``."""
        raise NotImplementedError
