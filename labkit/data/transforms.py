"""Image + box transforms that keep ``img_meta`` in step (mmdetection's Resize, RandomFlip, Normalize, Pad).

An item travels through the pipeline as a dict: ``img`` (numpy ``[H, W, 3]``, uint8 or float32,
RGB), ``gt_bboxes`` (numpy float32 ``[K, 4]`` xyxy pixels), ``gt_labels`` (int64 ``[K]``),
``gt_bboxes_ignore`` (float32 ``[G, 4]``) and ``img_meta`` (``ori_shape``, ``img_shape``,
``pad_shape``, ``scale_factor`` as ``(w, h, w, h)``, ``flip``, ``flip_direction``).
``ToTensor`` comes last and turns the arrays into tensors (``img`` becomes ``[3, H, W]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BOX_KEYS = ("gt_bboxes", "gt_bboxes_ignore")
FLIP_DIRECTIONS = ("horizontal", "vertical", "diagonal")

__all__ = [
    "RandomScaleCrop",
    "crop_train_transforms",
    "BOX_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "Pad",
    "RandomFlip",
    "Resize",
    "ToTensor",
    "rescale_size",
    "test_transforms",
    "train_transforms",
]


def _check_item(item: object, name: str) -> dict:
    """Check that ``item`` is a pipeline dict holding a numpy ``[H, W, 3]`` image and ``img_meta``."""
    if not isinstance(item, dict):
        raise TypeError(f"{name}: expected an item dict, got {type(item).__name__}")
    for key in ("img", "img_meta"):
        if key not in item:
            raise ValueError(f"{name}: item has no {key!r} key (keys: {sorted(item)})")
    img = item["img"]
    if not isinstance(img, np.ndarray):
        raise TypeError(
            f"{name}: item['img'] must be a numpy [H, W, 3] array (put ToTensor last), "
            f"got {type(img).__name__}"
        )
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: item['img'] must have shape [H, W, 3], got {img.shape}")
    return item


def _check_scale_pair(value: object, name: str) -> tuple[int, int]:
    """Return ``value`` as a pair of positive ints or raise naming ``name``."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        or min(value) <= 0
    ):
        raise ValueError(f"{name}: expected a pair of positive ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def rescale_size(old_hw: tuple[int, int], scale: tuple[int, int] | float) -> tuple[int, int]:
    """New ``(h, w)`` for a keep-ratio resize, exactly as ``mmcv.rescale_size``.

    A pair ``scale`` gives the long- and short-edge limits (its order does not matter): the
    factor is ``min(max(scale) / max(h, w), min(scale) / min(h, w))``. A number is the factor
    itself. Sizes round half up: ``int(w * factor + 0.5)``.
    """
    h, w = old_hw
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if scale <= 0:
            raise ValueError(f"scale: a scale factor must be positive, got {scale}")
        factor = float(scale)
    else:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_image(img: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``[H, W, 3]`` array (half-pixel centres, no antialias, like cv2)."""
    if img.shape[:2] == tuple(new_hw):
        return img.copy()
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=new_hw, mode="bilinear", align_corners=False)[0]
    out = out.permute(1, 2, 0).numpy()
    if img.dtype == np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


class Compose:
    """Apply transforms in order: ``Compose([Resize(...), RandomFlip(...), ...])(item)``."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
            raise TypeError(f"transforms: expected a list of callables, got {type(transforms)}")
        for i, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"transforms[{i}]: expected a callable, got {type(t).__name__}")
        self.transforms = list(transforms)

    def __call__(self, item: dict) -> dict:
        for t in self.transforms:
            item = t(item)
        return item

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize the image and scale its boxes (mmdetection ``Resize``).

    Args:
        scale: ``(h, w)``. With ``keep_ratio`` it is a pair of edge limits (long edge at most
            ``max(scale)``, short edge at most ``min(scale)``, as mmdetection's ``(1333, 800)``);
            without, the exact output size. An int ``s`` means ``(s, s)``; a float with
            ``keep_ratio`` is a plain factor (mmcv ``imrescale`` with a number).
        keep_ratio: keep the aspect ratio (mmcv ``imrescale``) or stretch to ``scale``.
        clip_object_border: clip the scaled boxes to the new image, as mmdetection does.

    The recorded ``scale_factor`` is ``(w_scale, h_scale, w_scale, h_scale)`` with
    ``w_scale = new_w / w`` (the real ratio after rounding, not the nominal factor); boxes are
    multiplied by it. A second ``Resize`` multiplies into it, so it always maps the original
    image to the current one.
    """

    def __init__(
        self,
        scale: tuple[int, int] | float,
        keep_ratio: bool = True,
        clip_object_border: bool = True,
    ) -> None:
        if not isinstance(keep_ratio, bool):
            raise TypeError(f"keep_ratio: expected a bool, got {type(keep_ratio).__name__}")
        if isinstance(scale, (int, np.integer)) and not isinstance(scale, bool):
            scale = (int(scale), int(scale))  # an int means a square size, as in mmdetection 3.x
        if isinstance(scale, float):
            if not keep_ratio:
                raise ValueError("scale: a float factor is only allowed with keep_ratio=True")
            if not scale > 0 or not math.isfinite(scale):
                raise ValueError(f"scale: a scale factor must be positive and finite, got {scale}")
            self.scale: tuple[int, int] | float = float(scale)
        else:
            self.scale = _check_scale_pair(scale, "scale")
        self.keep_ratio = keep_ratio
        self.clip_object_border = clip_object_border

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "Resize")
        img = item["img"]
        h, w = img.shape[:2]
        new_hw = rescale_size((h, w), self.scale) if self.keep_ratio else self.scale
        if min(new_hw) < 1:
            raise ValueError(f"Resize: image of size {(h, w)} would shrink to {new_hw}")
        item = dict(item)
        item["img"] = _resize_image(img, new_hw)
        w_scale, h_scale = new_hw[1] / w, new_hw[0] / h
        factor = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
        for key in BOX_KEYS:
            if key in item:
                boxes = np.asarray(item[key], dtype=np.float32).reshape(-1, 4) * factor
                if self.clip_object_border:
                    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_hw[1])
                    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_hw[0])
                item[key] = boxes
        meta = dict(item["img_meta"])
        old = meta.get("scale_factor", (1.0, 1.0, 1.0, 1.0))
        meta["scale_factor"] = tuple(float(o) * float(f) for o, f in zip(old, factor, strict=True))
        meta["img_shape"] = tuple(new_hw)
        meta["pad_shape"] = tuple(new_hw)
        meta["keep_ratio"] = self.keep_ratio
        item["img_meta"] = meta
        return item

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio})"


def flip_boxes(boxes: np.ndarray, img_hw: tuple[int, int], direction: str) -> np.ndarray:
    """Mirror ``[N, 4]`` xyxy boxes inside an image of size ``img_hw`` (mmdetection's rule).

    Horizontal: ``x1' = w - x2``, ``x2' = w - x1``; vertical the same with ``h``; diagonal both.
    """
    check_direction(direction)
    h, w = img_hw
    flipped = boxes.copy()
    if direction in ("horizontal", "diagonal"):
        flipped[:, 0] = w - boxes[:, 2]
        flipped[:, 2] = w - boxes[:, 0]
    if direction in ("vertical", "diagonal"):
        flipped[:, 1] = h - boxes[:, 3]
        flipped[:, 3] = h - boxes[:, 1]
    return flipped


def check_direction(direction: object) -> str:
    """Raise ``ValueError`` unless ``direction`` is horizontal, vertical or diagonal."""
    if direction not in FLIP_DIRECTIONS:
        raise ValueError(f"direction: expected one of {FLIP_DIRECTIONS}, got {direction!r}")
    return direction  # type: ignore[return-value]


class _SeededTransform:
    """A random transform with its own seeded ``numpy`` generator (``self.rng``), reseeded per
    DataLoader worker. ``labkit.engine.rng`` captures ``self.rng`` for exact resumes."""

    seed: int | None
    rng: np.random.Generator
    _worker_seed: int | None = None

    def _generator(self) -> np.random.Generator:
        # DataLoader workers each get a copy of this object; without reseeding they would all
        # draw the same numbers. The worker seed comes from the loader's own (seeded) generator.
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.rng = np.random.default_rng([0 if self.seed is None else self.seed, info.seed])
        return self.rng


class RandomFlip(_SeededTransform):
    """Flip the image and its boxes with probability ``prob`` (mmdetection ``RandomFlip``).

    Args:
        prob: flip probability in ``[0, 1]``.
        direction: ``"horizontal"``, ``"vertical"`` or ``"diagonal"``.
        seed: seeds this transform's own ``numpy`` generator, so a run is repeatable.

    Sets ``img_meta["flip"]`` and ``img_meta["flip_direction"]`` (``None`` when not flipped).
    Flipping is measured in the current (unpadded) image, so put it before ``Pad``.
    """

    def __init__(self, prob: float = 0.5, direction: str = "horizontal", seed: int | None = 0):
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
            raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
        self.prob = float(prob)
        self.direction = check_direction(direction)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker_seed = None

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "RandomFlip")
        do_flip = bool(self._generator().random() < self.prob)
        item = dict(item)
        meta = dict(item["img_meta"])
        meta["flip"] = do_flip
        meta["flip_direction"] = self.direction if do_flip else None
        item["img_meta"] = meta
        if not do_flip:
            return item
        img = item["img"]
        if self.direction in ("horizontal", "diagonal"):
            img = img[:, ::-1]
        if self.direction in ("vertical", "diagonal"):
            img = img[::-1]
        item["img"] = np.ascontiguousarray(img)
        for key in BOX_KEYS:
            if key in item:
                boxes = np.asarray(item[key], dtype=np.float32).reshape(-1, 4)
                item[key] = flip_boxes(boxes, img.shape[:2], self.direction)
        return item

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob}, direction={self.direction!r})"


class RandomScaleCrop(_SeededTransform):
    """Scale jitter then a random square crop: train near native resolution on a small input.

    The image is resized by a factor drawn uniformly from ``scale_range`` (of its current
    size), then a random ``crop_size x crop_size`` window is cut (a smaller image is kept
    whole). Boxes are shifted and clipped to the window; one keeps its label only if at least
    ``min_visible`` of its area lies inside and it is at least 2 px wide and high (its pixels
    stay either way, as with any random crop). Detectors are fully convolutional, so a model
    trained on crops is tested on whole images.

    Args:
        crop_size: side of the square window in pixels.
        scale_range: ``(low, high)`` resize factors, ``0 < low <= high``.
        min_visible: share of a box's area that must survive the crop.
        seed: seeds this transform's own generator.
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.6, 1.0),
        min_visible: float = 0.3,
        seed: int | None = 0,
    ) -> None:
        if (
            isinstance(crop_size, bool)
            or not isinstance(crop_size, (int, np.integer))
            or crop_size < 1
        ):
            raise ValueError(f"crop_size: expected a positive int, got {crop_size!r}")
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high or not math.isfinite(high):
            raise ValueError(f"scale_range: expected 0 < low <= high, got {tuple(scale_range)}")
        if not 0 <= min_visible <= 1:
            raise ValueError(f"min_visible: expected a fraction in [0, 1], got {min_visible!r}")
        self.crop_size, self.scale_range, self.min_visible = (
            int(crop_size),
            (low, high),
            min_visible,
        )
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker_seed = None

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "RandomScaleCrop")
        rng = self._generator()
        h, w = item["img"].shape[:2]
        factor = rng.uniform(*self.scale_range)
        item = Resize((max(1, round(h * factor)), max(1, round(w * factor))), keep_ratio=False)(
            item
        )
        h, w = item["img"].shape[:2]
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        item = dict(item)
        item["img"] = np.ascontiguousarray(item["img"][y0 : y0 + ch, x0 : x0 + cw])
        shift = np.array([x0, y0, x0, y0], dtype=np.float32)
        for key in BOX_KEYS:
            if key not in item:
                continue
            boxes = np.asarray(item[key], dtype=np.float32).reshape(-1, 4)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            moved = boxes - shift
            moved[:, 0::2] = moved[:, 0::2].clip(0, cw)
            moved[:, 1::2] = moved[:, 1::2].clip(0, ch)
            bw, bh = moved[:, 2] - moved[:, 0], moved[:, 3] - moved[:, 1]
            keep = (bw >= 2) & (bh >= 2) & (bw * bh >= self.min_visible * np.maximum(area, 1e-6))
            item[key] = moved[keep]
            if key == "gt_bboxes":
                item["gt_labels"] = np.asarray(item["gt_labels"])[keep]
        meta = dict(item["img_meta"])
        meta["img_shape"] = meta["pad_shape"] = (ch, cw)
        meta["crop_offset"] = (x0, y0)
        item["img_meta"] = meta
        return item

    def __repr__(self) -> str:
        return f"RandomScaleCrop(crop_size={self.crop_size}, scale_range={self.scale_range})"


class Normalize:
    """Subtract ``mean`` and divide by ``std`` per channel; the image becomes float32.

    Args:
        mean, std: three values in 0-255 pixel units (ImageNet's by default).
        to_rgb: labkit loads images as RGB, so ``True`` leaves the channel order alone;
            ``False`` feeds BGR (as an mmdetection config with ``to_rgb=False`` would, since
            mmcv loads BGR). ``mean``/``std`` are in the order of the channels fed.

    Records ``img_meta["img_norm_cfg"] = {"mean", "std", "to_rgb"}``.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        to_rgb: bool = True,
    ) -> None:
        mean_a = np.asarray(mean, dtype=np.float32)
        std_a = np.asarray(std, dtype=np.float32)
        if mean_a.shape != (3,) or not np.isfinite(mean_a).all():
            raise ValueError(f"mean: expected 3 finite values, got {mean!r}")
        if std_a.shape != (3,) or not np.isfinite(std_a).all() or (std_a <= 0).any():
            raise ValueError(f"std: expected 3 positive finite values, got {std!r}")
        self.mean, self.std, self.to_rgb = mean_a, std_a, bool(to_rgb)
        self._cfg = {
            "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std),
            "to_rgb": self.to_rgb,
        }

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "Normalize")
        img = item["img"].astype(np.float32)
        if not self.to_rgb:
            img = img[..., ::-1]
        item = dict(item)
        item["img"] = np.ascontiguousarray((img - self.mean) / self.std, dtype=np.float32)
        meta = dict(item["img_meta"])
        meta["img_norm_cfg"] = dict(self._cfg)
        item["img_meta"] = meta
        return item

    def __repr__(self) -> str:
        return (
            f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()}, to_rgb={self.to_rgb})"
        )


class Pad:
    """Pad the image bottom-right with ``pad_val`` (mmdetection ``Pad``); boxes do not move.

    Args:
        size: pad to exactly ``(h, w)`` (must not be smaller than the image).
        size_divisor: pad each side up to a multiple of it, ``ceil(h / d) * d``.
        pad_to_square: pad to ``max(h, w)`` on both sides (then to ``size_divisor`` if given).
        pad_val: fill value (0, which after ``Normalize`` is the mean colour).

    Give exactly one of ``size`` and ``size_divisor`` (mmcv 2.x would silently ignore ``size``
    when both are set), or ``pad_to_square``. Sets ``img_meta["pad_shape"]``; ``img_shape``
    keeps the unpadded size.
    """

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        size_divisor: int | None = None,
        pad_to_square: bool = False,
        pad_val: float = 0.0,
    ) -> None:
        if pad_to_square and size is not None:
            raise ValueError("size: must be None when pad_to_square=True")
        if not pad_to_square and (size is None) == (size_divisor is None):
            raise ValueError("size, size_divisor: give exactly one of them")
        self.size = None if size is None else _check_scale_pair(size, "size")
        if size_divisor is not None and (
            isinstance(size_divisor, bool)
            or not isinstance(size_divisor, (int, np.integer))
            or size_divisor <= 0
        ):
            raise ValueError(f"size_divisor: expected a positive int, got {size_divisor!r}")
        self.size_divisor = None if size_divisor is None else int(size_divisor)
        self.pad_to_square = bool(pad_to_square)
        self.pad_val = float(pad_val)

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "Pad")
        img = item["img"]
        h, w = img.shape[:2]
        ph, pw = h, w
        if self.pad_to_square:
            ph = pw = max(h, w)
        if self.size is not None:
            ph, pw = self.size
            if ph < h or pw < w:
                raise ValueError(f"size: {self.size} is smaller than the image {(h, w)}")
        if self.size_divisor is not None:
            d = self.size_divisor
            ph, pw = int(math.ceil(ph / d)) * d, int(math.ceil(pw / d)) * d
        item = dict(item)
        if (ph, pw) != (h, w):
            padded = np.full((ph, pw, 3), self.pad_val, dtype=img.dtype)
            padded[:h, :w] = img
            item["img"] = padded
        meta = dict(item["img_meta"])
        meta["pad_shape"] = (ph, pw)
        item["img_meta"] = meta
        return item

    def __repr__(self) -> str:
        return (
            f"Pad(size={self.size}, size_divisor={self.size_divisor}, "
            f"pad_to_square={self.pad_to_square}, pad_val={self.pad_val})"
        )


class ToTensor:
    """Turn the arrays into tensors: ``img`` float32 ``[3, H, W]``, boxes float32, labels int64."""

    def __call__(self, item: dict) -> dict:
        item = _check_item(item, "ToTensor")
        item = dict(item)
        img = np.ascontiguousarray(item["img"].transpose(2, 0, 1), dtype=np.float32)
        item["img"] = torch.from_numpy(img)
        for key in BOX_KEYS:
            if key in item:
                boxes = np.asarray(item[key], dtype=np.float32).reshape(-1, 4)
                item[key] = torch.from_numpy(np.ascontiguousarray(boxes))
        if "gt_labels" in item:
            item["gt_labels"] = torch.as_tensor(np.asarray(item["gt_labels"]), dtype=torch.int64)
        return item

    def __repr__(self) -> str:
        return "ToTensor()"


def train_transforms(
    scale: tuple[int, int] = (512, 512),
    size_divisor: int | None = 32,
    flip_prob: float = 0.5,
    seed: int | None = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """mmdetection's training pipeline: Resize(keep_ratio) → RandomFlip → Normalize → Pad → ToTensor."""
    return _flip_and_finish(Resize(scale, keep_ratio=True), flip_prob, seed, size_divisor, mean, std)


def _flip_and_finish(
    first: Callable[[dict], dict],
    flip_prob: float,
    seed: int | None,
    size_divisor: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> Compose:
    """``first`` → RandomFlip → Normalize → (Pad) → ToTensor: the training pipelines' tail."""
    steps = [first, RandomFlip(flip_prob, "horizontal", seed=seed), Normalize(mean, std)]
    if size_divisor is not None:
        steps.append(Pad(size_divisor=size_divisor))
    steps.append(ToTensor())
    return Compose(steps)


def crop_train_transforms(
    crop_size: int,
    scale_range: tuple[float, float] = (0.6, 1.0),
    size_divisor: int | None = 32,
    flip_prob: float = 0.5,
    seed: int | None = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Training on crops: RandomScaleCrop → RandomFlip → Normalize → Pad → ToTensor (the zoo's
    setting: 320-px crops of 0.6-1x scaled 512-px images, tested on the whole 512-px images)."""
    crop = RandomScaleCrop(crop_size, scale_range, seed=seed)
    return _flip_and_finish(crop, flip_prob, seed, size_divisor, mean, std)


def test_transforms(
    scale: tuple[int, int] = (512, 512),
    size_divisor: int | None = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """mmdetection's test pipeline: Resize(keep_ratio) → Normalize → Pad → ToTensor (no flip)."""
    steps: list[Callable[[dict], dict]] = [Resize(scale, keep_ratio=True), Normalize(mean, std)]
    if size_divisor is not None:
        steps.append(Pad(size_divisor=size_divisor))
    steps.append(ToTensor())
    return Compose(steps)


# pytest collects module-level names starting with "test" from any test file that imports them.
test_transforms.__test__ = False  # type: ignore[attr-defined]
