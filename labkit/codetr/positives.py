"""AuxPositives: the positive samples an auxiliary head hands to Co-DETR as extra decoder queries.

Co-DETR trains one-to-many heads (ATSS, Faster R-CNN) on the encoder memory and turns each
head's positives into one extra group of positive queries whose targets are known, so the
decoder learns from many positives without Hungarian matching. Every such head returns the
same small structure, one entry per image, in the resized image's pixel frame (the frame of
``gt_bboxes``, before any padding):

* ``coords[i]: Tensor[P_i, 4]`` xyxy pixels -- where each positive sits: the anchor (RPN,
  ATSS) or the sampled proposal (RoI head; the GTs added as proposals come first);
* ``labels[i]: LongTensor[P_i]`` in ``0..C-1`` -- the class of the matched ground truth;
* ``targets[i]: Tensor[P_i, 4]`` xyxy pixels -- the matched ground-truth box (the regression
  target in decoded form);
* ``feats[i]: Tensor[P_i, D]`` or ``None`` -- optional content features of each positive
  (the RoI head gives its RoIAlign features averaged over the 7x7 grid, as Co-DETR's
  ``with_coord_feat`` uses them; these keep their gradient).

Only positives are listed: Co-DETR's query head keeps the entries whose label is a
foreground class, so negatives would be dropped there anyway. ``normalized(img_metas)``
gives the DETR frame (``cxcywh`` in ``[0, 1]`` of ``img_shape``) the query head needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.boxes import normalize_bboxes


@dataclass
class AuxPositives:
    """Per-image positives of an auxiliary head (see the module docstring for the fields)."""

    coords: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]
    feats: list[Tensor] | None = None

    def __post_init__(self) -> None:
        n = len(self.coords)
        for name in ("labels", "targets") + (("feats",) if self.feats is not None else ()):
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"{name}: expected {n} entries (one per image), got {len(values)}")
            for i, (c, v) in enumerate(zip(self.coords, values, strict=True)):
                if v.shape[0] != c.shape[0]:
                    raise ValueError(
                        f"{name}[{i}]: expected {c.shape[0]} rows like coords[{i}], got {v.shape[0]}"
                    )

    @property
    def num_images(self) -> int:
        """Number of images ``B``."""
        return len(self.coords)

    @property
    def num_positives(self) -> list[int]:
        """``P_i`` for every image."""
        return [int(c.shape[0]) for c in self.coords]

    def normalized(self, img_metas: list[dict]) -> tuple[list[Tensor], list[Tensor]]:
        """``(coords, targets)`` as normalized ``cxcywh`` relative to each image's ``img_shape``."""
        if len(img_metas) != self.num_images:
            raise ValueError(
                f"img_metas: expected {self.num_images} entries (one per image), got {len(img_metas)}"
            )
        coords, targets = [], []
        for c, t, meta in zip(self.coords, self.targets, img_metas, strict=True):
            shape = tuple(meta["img_shape"][:2])
            coords.append(normalize_bboxes(c, shape))
            targets.append(normalize_bboxes(t, shape))
        return coords, targets

    @classmethod
    def empty(cls, num_images: int, device: torch.device | str = "cpu") -> AuxPositives:
        """No positives in any of ``num_images`` images."""
        boxes = [torch.zeros(0, 4, device=device) for _ in range(num_images)]
        labels = [torch.zeros(0, dtype=torch.long, device=device) for _ in range(num_images)]
        return cls(boxes, labels, [b.clone() for b in boxes])
