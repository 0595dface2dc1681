"""Priors for dense heads: anchor boxes (AnchorGenerator) and anchor points (PointGenerator).

Ordering and values match mmdetection 3.x (``AnchorGenerator``, ``MlvlPointGenerator``):

- base anchors of a level are ratio-major with scales innermost (``scale_major=True``);
- over a level's grid, x varies fastest, then y, and the anchor index is innermost, so anchor
  ``a`` at cell ``(row, col)`` sits at flat index ``(row * W + col) * A + a``;
- levels are returned as a list, finest stride first (heads concatenate them in that order).

Strides are ``int`` or ``(stride_w, stride_h)`` tuples; feature map sizes are ``(h, w)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from labkit._validation import check_tensor

__all__ = [
    "AnchorGenerator",
    "PointGenerator",
    "anchor_inside_flags",
    "featmap_sizes_from_shape",
]

Stride = int | float | tuple[int, int] | tuple[float, float]


def _pair(stride: Stride, name: str) -> tuple:
    if isinstance(stride, (int, float)) and not isinstance(stride, bool):
        return (stride, stride)
    if isinstance(stride, Sequence) and len(stride) == 2:
        return tuple(stride)
    raise ValueError(f"{name}: expected a number or a (w, h) pair, got {stride!r}")


def _check_featmap_sizes(featmap_sizes: Sequence, num_levels: int) -> list[tuple[int, int]]:
    if len(featmap_sizes) != num_levels:
        raise ValueError(
            f"featmap_sizes: expected {num_levels} (h, w) sizes, one per level, got "
            f"{len(featmap_sizes)}"
        )
    sizes = []
    for size in featmap_sizes:
        if len(size) != 2:
            raise ValueError(f"featmap_sizes: each size must be (h, w), got {tuple(size)!r}")
        sizes.append((int(size[0]), int(size[1])))
    return sizes


def featmap_sizes_from_shape(
    input_shape: Sequence[int], strides: Sequence[Stride]
) -> list[tuple[int, int]]:
    """Feature map ``(h, w)`` of each level for a padded input of ``input_shape = (h, w)``.

    A stride-2 3x3 convolution with padding 1 maps a side ``n`` to ``ceil(n / 2)``, and a stack
    of them to ``ceil(n / stride)``: e.g. RetinaNet on a 1216x800 batch has maps 152x100,
    76x50, 38x25, 19x13 and 10x7 for strides 8 to 128.
    """
    if len(input_shape) < 2:
        raise ValueError(f"input_shape: expected (h, w), got {input_shape!r}")
    h, w = input_shape[0], input_shape[1]
    sizes = []
    for stride in strides:
        stride_w, stride_h = _pair(stride, "strides")
        sizes.append((math.ceil(h / stride_h), math.ceil(w / stride_w)))
    return sizes


def _meshgrid_xy(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened grid with x varying fastest: ``xx = [x0, x1, .., x0, x1, ..]``, ``yy = [y0, y0, ..]``."""
    xx = x.repeat(y.shape[0])
    yy = y.view(-1, 1).repeat(1, x.shape[0]).view(-1)
    return xx, yy


def _valid_size(
    featmap_size: tuple[int, int], stride: tuple, pad_shape: Sequence[int]
) -> tuple[int, int]:
    # A cell is valid when its top-left pixel lies inside the (per-image) padded input: the
    # batch may be padded further than this image, and cells over that extra padding are off.
    feat_h, feat_w = featmap_size
    h, w = pad_shape[0], pad_shape[1]
    return min(math.ceil(h / stride[1]), feat_h), min(math.ceil(w / stride[0]), feat_w)


def _grid_valid(
    featmap_size: tuple[int, int], valid_size: tuple[int, int], device: torch.device | str
) -> Tensor:
    feat_h, feat_w = featmap_size
    valid_x = torch.zeros(feat_w, dtype=torch.bool, device=device)
    valid_y = torch.zeros(feat_h, dtype=torch.bool, device=device)
    valid_x[: valid_size[1]] = True
    valid_y[: valid_size[0]] = True
    valid_xx, valid_yy = _meshgrid_xy(valid_x, valid_y)
    return valid_xx & valid_yy  # [H * W]


class AnchorGenerator:
    """Anchor boxes for every location of every feature level (mmdetection's ``AnchorGenerator``).

    Args:
        strides: one stride per level, ``int`` or ``(stride_w, stride_h)``.
        ratios: anchor aspect ratios ``h / w``; an anchor keeps the area of its scale
            (``w = size * scale / sqrt(ratio)``, ``h = size * scale * sqrt(ratio)``).
        scales: anchor sizes as multiples of the base size. Give either ``scales`` or
            ``octave_base_scale`` and ``scales_per_octave``.
        base_sizes: base size per level; defaults to the level's (smaller) stride.
        scale_major: order base anchors ratio-major with scales innermost (True, mmdetection's
            default) or scale-major with ratios innermost (False).
        octave_base_scale, scales_per_octave: RetinaNet's scales
            ``octave_base_scale * 2 ** (i / scales_per_octave)``, ``i = 0 .. scales_per_octave - 1``.
        centers: per level ``(x, y)`` centre of the base anchors relative to the cell's top-left
            corner; cannot be combined with ``center_offset``.
        center_offset: the centre as a fraction of the base size (0: anchors are centred on
            the cell's top-left pixel, as in mmdetection 2.x and 3.x; 0.5: centred in the cell).

    Example:
        >>> gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[1.0], base_sizes=[9])
        >>> gen.grid_priors([(2, 2)])[0]
        tensor([[-4.5000, -4.5000,  4.5000,  4.5000],
                [11.5000, -4.5000, 20.5000,  4.5000],
                [-4.5000, 11.5000,  4.5000, 20.5000],
                [11.5000, 11.5000, 20.5000, 20.5000]])
    """

    def __init__(
        self,
        strides: Sequence[Stride],
        ratios: Sequence[float],
        scales: Sequence[float] | None = None,
        base_sizes: Sequence[float] | None = None,
        scale_major: bool = True,
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
        centers: Sequence[tuple[float, float]] | None = None,
        center_offset: float = 0.0,
    ) -> None:
        if len(strides) == 0:
            raise ValueError("strides: expected at least one level, got none")
        if not 0 <= center_offset <= 1:
            raise ValueError(f"center_offset: expected a value in [0, 1], got {center_offset}")
        if center_offset != 0 and centers is not None:
            raise ValueError("centers: cannot be set together with a non-zero center_offset")
        if centers is not None and len(centers) != len(strides):
            raise ValueError(
                f"centers: expected one (x, y) per level ({len(strides)}), got {len(centers)}"
            )
        self.strides = [_pair(s, "strides") for s in strides]
        self.base_sizes = [min(s) for s in self.strides] if base_sizes is None else list(base_sizes)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError(
                f"base_sizes: expected one per level ({len(self.strides)}), got "
                f"{len(self.base_sizes)}"
            )
        octave = octave_base_scale is not None and scales_per_octave is not None
        if octave == (scales is not None):
            raise ValueError(
                "scales: give either scales or octave_base_scale with scales_per_octave, "
                f"not both or neither (scales={scales}, octave_base_scale={octave_base_scale}, "
                f"scales_per_octave={scales_per_octave})"
            )
        if scales is None:
            # Computed in float64 then stored as float32, as mmdetection does via numpy.
            scales = [
                2 ** (i / scales_per_octave) * octave_base_scale for i in range(scales_per_octave)
            ]
        # float32, as mmdetection stores them (torch.Tensor(...)); lists, tuples, arrays or tensors
        self.scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1).cpu()
        self.ratios = torch.as_tensor(ratios, dtype=torch.float32).reshape(-1).cpu()
        for name, values in (("scales", self.scales), ("ratios", self.ratios)):
            if values.numel() == 0 or not bool((values > 0).all()) or not values.isfinite().all():
                raise ValueError(f"{name}: expected positive finite numbers, got {values.tolist()}")
        self.octave_base_scale = octave_base_scale
        self.scales_per_octave = scales_per_octave
        self.scale_major = scale_major
        self.centers = centers
        self.center_offset = center_offset
        self.base_anchors = [
            self._base_anchors(size, None if centers is None else centers[i])
            for i, size in enumerate(self.base_sizes)
        ]

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.strides)

    @property
    def num_base_anchors(self) -> list[int]:
        """Anchors per location on each level (``len(ratios) * len(scales)``)."""
        return [a.shape[0] for a in self.base_anchors]

    @property
    def num_base_priors(self) -> list[int]:
        """Alias of :attr:`num_base_anchors` (mmdetection's name shared with point priors)."""
        return self.num_base_anchors

    def _base_anchors(self, base_size: float, center: tuple[float, float] | None) -> Tensor:
        """Base anchors ``Tensor[A, 4]`` of one level, centred on ``center`` (cell coordinates)."""
        w = h = base_size
        if center is None:
            x_center, y_center = self.center_offset * w, self.center_offset * h
        else:
            x_center, y_center = center
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (w * w_ratios[:, None] * self.scales[None, :]).view(-1)
            hs = (h * h_ratios[:, None] * self.scales[None, :]).view(-1)
        else:
            ws = (w * self.scales[:, None] * w_ratios[None, :]).view(-1)
            hs = (h * self.scales[:, None] * h_ratios[None, :]).view(-1)
        return torch.stack(
            [x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws, y_center + 0.5 * hs],
            dim=-1,
        )

    def single_level_grid_priors(
        self,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Anchors ``Tensor[H * W * A, 4]`` of one level, x fastest and anchor index innermost."""
        base_anchors = self.base_anchors[level_idx].to(device).to(dtype)  # [A, 4]
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride_w
        shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride_h
        shift_xx, shift_yy = _meshgrid_xy(shift_x, shift_y)
        shifts = torch.stack([shift_xx, shift_yy, shift_xx, shift_yy], dim=-1)  # [H * W, 4]
        return (base_anchors[None, :, :] + shifts[:, None, :]).view(-1, 4)  # [H * W * A, 4]

    def grid_priors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Anchors of every level: a list of ``Tensor[H_l * W_l * A_l, 4]``, finest level first.

        Args:
            featmap_sizes: ``(h, w)`` of each level's feature map.
            dtype, device: of the returned anchors.
        """
        sizes = _check_featmap_sizes(featmap_sizes, self.num_levels)
        return [
            self.single_level_grid_priors(size, i, dtype=dtype, device=device)
            for i, size in enumerate(sizes)
        ]

    def grid_anchors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Same as :meth:`grid_priors`; takes ``device`` second, like mmdetection's old name."""
        if isinstance(device, torch.dtype):  # called as grid_anchors(sizes, dtype, device)
            device, dtype = (dtype if not isinstance(dtype, torch.dtype) else "cpu"), device
        return self.grid_priors(featmap_sizes, dtype=dtype, device=device)

    def sparse_priors(
        self,
        prior_idxs: Tensor,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Anchors ``Tensor[K, 4]`` at flat indices ``prior_idxs: LongTensor[K]`` of one level."""
        prior_idxs = check_tensor(prior_idxs, "prior_idxs")
        height, width = featmap_size
        num_base = self.num_base_anchors[level_idx]
        base_id = prior_idxs % num_base
        x = (prior_idxs // num_base) % width * self.strides[level_idx][0]
        y = (prior_idxs // width // num_base) % height * self.strides[level_idx][1]
        shifts = torch.stack([x, y, x, y], 1).to(dtype).to(device)
        return shifts + self.base_anchors[level_idx][base_id.cpu(), :].to(device)

    def valid_flags(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        pad_shape: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Which anchors sit on cells inside this image's padded shape.

        Args:
            featmap_sizes: ``(h, w)`` per level, of the batch's feature maps.
            pad_shape: ``(h, w)`` of this image after its own padding (``img_meta["pad_shape"]``);
                cells whose top-left corner ``(col * stride, row * stride)`` falls beyond it,
                i.e. over padding added only to match other images of the batch, are invalid.

        Returns:
            A list of ``BoolTensor[H_l * W_l * A_l]``, ordered like :meth:`grid_priors`.
        """
        sizes = _check_featmap_sizes(featmap_sizes, self.num_levels)
        return [
            self.single_level_valid_flags(
                size,
                _valid_size(size, self.strides[i], pad_shape),
                self.num_base_anchors[i],
                device,
            )
            for i, size in enumerate(sizes)
        ]

    def single_level_valid_flags(
        self,
        featmap_size: tuple[int, int],
        valid_size: tuple[int, int],
        num_base_anchors: int,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``BoolTensor[H * W * A]``: True for anchors of the first ``valid_size = (h, w)`` cells."""
        if valid_size[0] > featmap_size[0] or valid_size[1] > featmap_size[1]:
            raise ValueError(f"valid_size: {valid_size} exceeds featmap_size {featmap_size}")
        valid = _grid_valid(featmap_size, valid_size, device)
        return valid[:, None].expand(valid.shape[0], num_base_anchors).reshape(-1)

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(strides={self.strides}, ratios={self.ratios.tolist()}, "
            f"scales={self.scales.tolist()}, base_sizes={self.base_sizes}, "
            f"scale_major={self.scale_major}, centers={self.centers}, "
            f"center_offset={self.center_offset})"
        )


def anchor_inside_flags(
    flat_anchors: Tensor,
    valid_flags: Tensor,
    img_shape: Sequence[int],
    allowed_border: float = 0,
) -> Tensor:
    """Anchors that are valid and lie inside the image, up to ``allowed_border`` pixels outside.

    Args:
        flat_anchors: ``Tensor[N, 4]`` all levels concatenated.
        valid_flags: ``BoolTensor[N]`` from :meth:`AnchorGenerator.valid_flags`.
        img_shape: ``(h, w)`` of the unpadded image.
        allowed_border: how far (pixels) an anchor may stick out. A negative value turns the
            border test off (only ``valid_flags`` count), as RetinaNet's ``allowed_border=-1``.

    Returns:
        ``BoolTensor[N]``: ``x1 >= -b``, ``y1 >= -b``, ``x2 < w + b``, ``y2 < h + b`` (note the
        strict ``<`` on the far side, as in mmdetection).
    """
    flat_anchors = check_tensor(flat_anchors, "flat_anchors")
    valid_flags = check_tensor(valid_flags, "valid_flags")
    if flat_anchors.dim() != 2 or flat_anchors.shape[1] != 4:
        raise ValueError(f"flat_anchors: expected shape [N, 4], got {tuple(flat_anchors.shape)}")
    if valid_flags.shape != flat_anchors.shape[:1]:
        raise ValueError(
            f"valid_flags: expected shape [{flat_anchors.shape[0]}], got {tuple(valid_flags.shape)}"
        )
    if allowed_border < 0:
        return valid_flags
    img_h, img_w = img_shape[0], img_shape[1]
    return (
        valid_flags
        & (flat_anchors[:, 0] >= -allowed_border)
        & (flat_anchors[:, 1] >= -allowed_border)
        & (flat_anchors[:, 2] < img_w + allowed_border)
        & (flat_anchors[:, 3] < img_h + allowed_border)
    )


class PointGenerator:
    """Prior points at feature-map cells for anchor-free heads (mmdetection's ``MlvlPointGenerator``).

    Args:
        strides: one stride per level, ``int`` or ``(stride_w, stride_h)``.
        offset: where in a cell the point sits, as a fraction of the stride: 0.5 (the
            default) puts it at the cell centre ``((col + 0.5) * stride, (row + 0.5) * stride)``;
            FCOS in mmdetection 3.x and ATSS-style heads use 0.5, RepPoints uses 0.
    """

    def __init__(self, strides: Sequence[Stride], offset: float = 0.5) -> None:
        if len(strides) == 0:
            raise ValueError("strides: expected at least one level, got none")
        self.strides = [_pair(s, "strides") for s in strides]
        self.offset = offset

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        """One point per location on every level."""
        return [1] * len(self.strides)

    def single_level_grid_priors(
        self,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_stride: bool = False,
    ) -> Tensor:
        """Points ``Tensor[H * W, 2]`` ``(x, y)`` of one level (``[H * W, 4]`` with the
        ``(stride_w, stride_h)`` appended when ``with_stride``), x fastest."""
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = ((torch.arange(0, feat_w, device=device) + self.offset) * stride_w).to(dtype)
        shift_y = ((torch.arange(0, feat_h, device=device) + self.offset) * stride_h).to(dtype)
        shift_xx, shift_yy = _meshgrid_xy(shift_x, shift_y)
        if not with_stride:
            return torch.stack([shift_xx, shift_yy], dim=-1)
        n = shift_xx.shape[0]
        strides_w = shift_xx.new_full((n,), stride_w)
        strides_h = shift_xx.new_full((n,), stride_h)
        return torch.stack([shift_xx, shift_yy, strides_w, strides_h], dim=-1)

    def grid_priors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_stride: bool = False,
    ) -> list[Tensor]:
        """Points of every level, finest first: ``Tensor[H_l * W_l, 2]`` (or ``4`` with strides)."""
        sizes = _check_featmap_sizes(featmap_sizes, self.num_levels)
        return [
            self.single_level_grid_priors(size, i, dtype, device, with_stride)
            for i, size in enumerate(sizes)
        ]

    def valid_flags(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        pad_shape: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """``BoolTensor[H_l * W_l]`` per level: cells inside this image's ``pad_shape`` (h, w)."""
        sizes = _check_featmap_sizes(featmap_sizes, self.num_levels)
        return [
            self.single_level_valid_flags(
                size, _valid_size(size, self.strides[i], pad_shape), device
            )
            for i, size in enumerate(sizes)
        ]

    def single_level_valid_flags(
        self,
        featmap_size: tuple[int, int],
        valid_size: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``BoolTensor[H * W]``: True for the first ``valid_size = (h, w)`` cells."""
        if valid_size[0] > featmap_size[0] or valid_size[1] > featmap_size[1]:
            raise ValueError(f"valid_size: {valid_size} exceeds featmap_size {featmap_size}")
        return _grid_valid(featmap_size, valid_size, device)

    def sparse_priors(
        self,
        prior_idxs: Tensor,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Points ``Tensor[K, 2]`` at flat indices ``prior_idxs: LongTensor[K]`` of one level."""
        prior_idxs = check_tensor(prior_idxs, "prior_idxs")
        height, width = featmap_size
        x = (prior_idxs % width + self.offset) * self.strides[level_idx][0]
        y = ((prior_idxs // width) % height + self.offset) * self.strides[level_idx][1]
        return torch.stack([x, y], 1).to(dtype).to(device)

    def __repr__(self) -> str:
        return f"PointGenerator(strides={self.strides}, offset={self.offset})"
