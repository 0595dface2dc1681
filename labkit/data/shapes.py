"""Synthetic "shapes" detection data in COCO format: deterministic, multi-scale, occluded, cluttered.

Each image has a textured background (colour gradient, smooth blotches, sometimes stripes, light
grain), distractor marks (lines, arcs, dots, scribbles) and 0-14 objects of five classes
(``CLASSES``). Object sizes ``sqrt(w * h)`` are drawn log-uniformly from 8 px to 85 % of the
image with a bias towards small ones, so every FPN level (strides 8-128 on 512 px images)
gets objects and small ones are common. Aspect ratios span 1:3 to 3:1. Objects are painted in a
random depth order (larger ones tend to be further back), so later objects occlude earlier
ones, and a few thin lines are drawn over everything. Some images hold a "crowd": a cluster of
tiny ellipses annotated as one ``iscrowd`` box (an ignore region for training).

Annotations are modal, like COCO's: an object's box is the tight box of its *visible* pixels,
``area`` is its visible pixel count, and an object less than ``MIN_VISIBLE`` (35 %) visible is
dropped: its remaining pixels stay in the image as unlabelled clutter.

The same seed gives the same PNG and JSON bytes: every image has its own ``numpy``
generator seeded by ``(seed, split, index)`` and nothing time-dependent is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from labkit.data.coco import CocoDetection
from labkit.data.paths import default_root
from labkit.data.transforms import ToTensor

__all__ = [
    "CLASSES",
    "MIN_VISIBLE",
    "make_shapes",
    "render_shapes",
    "shapes_dataset",
    "shapes_sample",
]

CLASSES = ("ellipse", "rectangle", "triangle", "ring", "cross")
MIN_VISIBLE = 0.35
GENERATOR_VERSION = 2
MIN_SIZE = 8.0
MAX_SIZE_FRACTION = 0.85
_SPLIT_CODES = {"train": 0, "val": 1, "sample": 2}


def _upsample_linear(grid: np.ndarray, out: int) -> np.ndarray:
    """Bilinear upsampling of ``[g, g, C]`` to ``[out, out, C]`` (small_size-pixel centres).

    Plain elementwise arithmetic, so the bytes are the same on every machine.
    """
    g = grid.shape[0]
    pos = np.clip((np.arange(out) + 0.5) * g / out - 0.5, 0, g - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, g - 1)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None, None] + grid[i1] * f[:, None, None]
    return rows[:, i0] * (1 - f)[None, :, None] + rows[:, i1] * f[None, :, None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 ``[S, S, 3]`` background: gradient + smooth blotches (+ stripes sometimes).

    Built at quarter resolution and upsampled, which keeps it smooth and cheap to compress.
    Only elementwise arithmetic on arrays (no array sin/cos, whose SIMD versions may differ
    between CPUs), so a seed gives the same bytes everywhere.
    """
    small_size = (size + 3) // 4
    c0, c1 = rng.uniform(30, 225, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(small_size, dtype=np.float64) / small_size
    t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    grid = int(rng.integers(3, 10))
    blotch = _upsample_linear(rng.normal(0, 1, size=(grid, grid, 3)), small_size)
    img = img + float(rng.uniform(8, 30)) * blotch
    if rng.random() < 0.3:
        period = rng.uniform(4, 12)  # in quarter-resolution pixels
        phase = math.cos(angle + 1.0) * coords[None, :] + math.sin(angle + 1.0) * coords[:, None]
        wave = phase * small_size / period
        triangle = 4 * np.abs(wave - np.floor(wave) - 0.5) - 1  # in [-1, 1]
        img = img + rng.uniform(6, 16) * triangle[..., None]
    low = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(low.resize((size, size), Image.Resampling.BILINEAR))


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least somewhat away from ``avoid`` (so objects stay visible)."""
    for _ in range(8):
        c = rng.integers(0, 256, size=3)
        if np.abs(c - avoid).sum() > 120:
            break
    return tuple(int(v) for v in c)


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int) -> None:
    """Distractor marks that are not objects: lines, arcs, dots and scribbles."""
    for _ in range(n):
        kind = rng.integers(0, 4)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:
            length, ang = rng.uniform(10, size / 2), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(ang), y + length * math.sin(ang))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            r = rng.uniform(6, 60)
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(40, 200), colour, 2)
        elif kind == 2:
            for _ in range(int(rng.integers(3, 12))):
                px, py = x + rng.normal(0, 15), y + rng.normal(0, 15)
                draw.point([(px, py), (px + 1, py), (px, py + 1)], fill=colour)
        else:
            steps = rng.normal(0, 8, size=(int(rng.integers(4, 12)), 2)).cumsum(0) + (x, y)
            draw.line([tuple(p) for p in steps], fill=colour, width=int(rng.integers(1, 3)))


def _draw_clutter_lines_on_top(
    canvas: Image.Image, ids: Image.Image, rng: np.random.Generator, size: int
) -> None:
    """A few thin lines over everything; they hide object pixels (id 0 = not an object)."""
    draw, draw_ids = ImageDraw.Draw(canvas), ImageDraw.Draw(ids)
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = rng.uniform(0, size, size=(2, 2))
        width = int(rng.integers(1, 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([tuple(p0), tuple(p1)], fill=colour, width=width)
        draw_ids.line([tuple(p0), tuple(p1)], fill=0, width=width)


def _object_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Binary ``L`` mask ``(w, h)`` of one object filling its box (a crowd is many tiny dots)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    box = [0, 0, w - 1, h - 1]
    if kind == "ellipse":
        draw.ellipse(box, fill=255)
    elif kind == "rectangle":
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        a = rng.uniform(0, 1)
        side = rng.integers(0, 4)  # where the apex points: up, down, left, right
        if side == 0:
            pts = [(a * (w - 1), 0), (w - 1, h - 1), (0, h - 1)]
        elif side == 1:
            pts = [(a * (w - 1), h - 1), (w - 1, 0), (0, 0)]
        elif side == 2:
            pts = [(0, a * (h - 1)), (w - 1, 0), (w - 1, h - 1)]
        else:
            pts = [(w - 1, a * (h - 1)), (0, 0), (0, h - 1)]
        draw.polygon(pts, fill=255)
    elif kind == "ring":
        width = max(2, int(min(w, h) * rng.uniform(0.12, 0.3)))
        draw.ellipse(box, outline=255, width=width)
    elif kind == "cross":
        th, tw = max(2, int(h * rng.uniform(0.2, 0.4))), max(2, int(w * rng.uniform(0.2, 0.4)))
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        draw.rectangle([0, cy - th / 2, w - 1, cy + th / 2], fill=255)
        draw.rectangle([cx - tw / 2, 0, cx + tw / 2, h - 1], fill=255)
    else:  # crowd of tiny dots
        for _ in range(int(rng.integers(12, 40))):
            r = rng.uniform(1.5, 3.5)
            x, y = rng.uniform(r, w - r), rng.uniform(r, h - r)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return mask


def _sample_objects(rng: np.random.Generator, size: int) -> list[dict]:
    """Object kinds and boxes ``(x, y, w, h)`` for one image, in painting order (back to front)."""
    n = 0 if rng.random() < 0.03 else int(rng.integers(1, 15))
    max_size = MAX_SIZE_FRACTION * size
    objects = []
    for _ in range(n):
        label = int(rng.integers(0, len(CLASSES)))
        # u**1.7 biases the log-size towards the small end: small objects are common
        s = math.exp(math.log(MIN_SIZE) + rng.random() ** 1.7 * math.log(max_size / MIN_SIZE))
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        w = int(round(min(max(s * math.sqrt(ratio), 4), 0.95 * size)))
        h = int(round(min(max(s / math.sqrt(ratio), 4), 0.95 * size)))
        x = int(round(rng.uniform(-0.1 * w, size - 0.9 * w)))
        y = int(round(rng.uniform(-0.1 * h, size - 0.9 * h)))
        objects.append({"kind": CLASSES[label], "label": label, "box": (x, y, w, h)})
    if rng.random() < 0.15:
        w, h = (int(v) for v in rng.integers(24, 110, size=2))
        x, y = (int(v) for v in rng.integers(0, size - 24, size=2))
        objects.append({"kind": "crowd", "label": CLASSES.index("ellipse"), "box": (x, y, w, h)})
    depth = [-math.log(o["box"][2] * o["box"][3]) / 2 + rng.normal(0, 0.7) for o in objects]
    return [objects[i] for i in np.argsort(depth, kind="stable")]


def render_shapes(rng: np.random.Generator, image_size: int = 512) -> tuple[np.ndarray, list[dict]]:
    """Draw one image and its annotations.

    Returns:
        ``img``: uint8 ``[S, S, 3]`` RGB; ``anns``: list of ``{"bbox": [x1, y1, x2, y2]`` (ints,
        visible extent), ``"label"`` (index into ``CLASSES``), ``"area"`` (visible pixels),
        ``"iscrowd"`` (0/1)``}`` in painting order.
    """
    size = image_size
    bg = _background(rng, size)
    canvas = Image.fromarray(bg)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(draw, rng, size, int(rng.integers(4, 16)))
    ids = Image.new("L", (size, size), 0)
    mean_bg = bg[::8, ::8].reshape(-1, 3).mean(0)
    placed = []
    for k, obj in enumerate(_sample_objects(rng, size)):
        x, y, w, h = obj["box"]
        mask = _object_mask(obj["kind"], w, h, rng)
        colour = _colour(rng, mean_bg)
        canvas.paste(colour, (x, y), mask)
        if rng.random() < 0.4:  # a darker outline on some objects
            edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(3)))
            canvas.paste(tuple(max(0, c - 70) for c in colour), (x, y), edge)
        ids.paste(k + 1, (x, y), mask)
        placed.append((obj, int((np.asarray(mask) > 0).sum())))
    _draw_clutter_lines_on_top(canvas, ids, rng, size)
    img = np.asarray(canvas).copy()
    # sparse speckle noise: texture without making every PNG row incompressible
    speckle = rng.random((size, size)) < 0.005
    img[speckle] = rng.integers(0, 256, size=(int(speckle.sum()), 3), dtype=np.uint8)
    id_map = np.asarray(ids)
    anns = []
    for k, (obj, full_area) in enumerate(placed):
        x, y, w, h = obj["box"]
        x0, y0 = max(x, 0), max(y, 0)
        region = id_map[y0 : y + h, x0 : x + w] == k + 1
        visible = int(region.sum())
        if full_area == 0 or visible < MIN_VISIBLE * full_area:
            continue
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        box = [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1]
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        anns.append(
            {
                "bbox": box,
                "label": obj["label"],
                "area": visible,
                "iscrowd": int(obj["kind"] == "crowd"),
            }
        )
    return img, anns


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_split(root: str, split: str, num: int, seed: int, image_size: int) -> dict[str, str]:
    """Render ``num`` images of ``split`` and write them plus ``instances_{split}.json``; return file hashes."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    hashes, images, annotations = {}, [], []
    for i in range(num):
        img, anns = render_shapes(_image_rng(seed, split, i), image_size)
        rel = f"{split}/{i:06d}.png"
        data = _png_bytes(img)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
        images.append({"id": i + 1, "file_name": rel, "width": image_size, "height": image_size})
        for a in anns:
            x1, y1, x2, y2 = a["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": a["label"] + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": a["area"],
                    "iscrowd": a["iscrowd"],
                }
            )
    coco = {
        "info": {
            "description": "labkit synthetic shapes",
            "version": GENERATOR_VERSION,
            "seed": seed,
        },
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }
    rel = f"instances_{split}.json"
    data = json.dumps(coco, separators=(",", ":")).encode()
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)
    hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _manifest_ok(root: str, params: dict) -> bool:
    """True when ``root`` already holds exactly what ``params`` would generate."""
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("params") != params:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(_file_sha256(os.path.join(root, p)) == h for p, h in files.items())


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def make_shapes(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int = 256,
    num_val: int = 64,
    image_size: int = 512,
) -> dict:
    """Write the shapes dataset under ``root`` (idempotent) and return its manifest.

    ``root=None`` means ``data/shapes`` of this checkout (see :func:`labkit.data.paths.data_root`).
    Layout: ``root/train/000000.png ...``, ``root/val/...``, ``root/instances_train.json``,
    ``root/instances_val.json`` (``file_name`` relative to ``root``; category ids 1-5 in
    ``CLASSES`` order) and ``root/manifest.json`` (the parameters and each file's SHA-256).
    If the manifest matches the parameters and every file's hash, nothing is written;
    otherwise the splits are regenerated from scratch.

    Returns:
        ``{"params": {...}, "files": {relative path: sha256}, "generated": bool}``.
    """
    root = default_root("shapes", root)
    params = {
        "seed": _check_int(seed, "seed", 0),
        "num_train": _check_int(num_train, "num_train", 0),
        "num_val": _check_int(num_val, "num_val", 0),
        "image_size": _check_int(image_size, "image_size", 64),
        "version": GENERATOR_VERSION,
    }
    if _manifest_ok(root, params):
        with open(os.path.join(root, "manifest.json")) as f:
            return {**json.load(f), "generated": False}
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    files: dict[str, str] = {}
    files.update(
        _write_split(root, "train", params["num_train"], params["seed"], params["image_size"])
    )
    files.update(_write_split(root, "val", params["num_val"], params["seed"], params["image_size"]))
    manifest = {"params": params, "files": files}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return {**manifest, "generated": True}


def shapes_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    transforms: Callable[[dict], dict] | None = None,
    **make_kwargs,
) -> CocoDetection:
    """The shapes ``split`` ("train" or "val") as a :class:`CocoDetection`, generating it first if needed.

    ``make_kwargs`` (``seed``, ``num_train``, ``num_val``, ``image_size``) go to :func:`make_shapes`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    root = default_root("shapes", root)
    make_shapes(root, **make_kwargs)
    return CocoDetection(os.path.join(root, f"instances_{split}.json"), root, transforms)


def shapes_sample(
    seed: int = 0,
    image_size: int = 512,
    transforms: Callable[[dict], dict] | None = None,
) -> dict:
    """One freshly drawn shapes image as a dataset item, without touching the disk.

    Returns the same dict a :class:`CocoDetection` item has (``img``, ``gt_bboxes [K, 4]``,
    ``gt_labels [K]``, ``gt_bboxes_ignore [G, 4]``, ``img_meta``); with ``transforms=None``
    the image is a float ``[3, S, S]`` tensor in 0-255. The seed picks the image; samples come
    from their own stream, so they never equal a train or val image.
    """
    img, anns = render_shapes(_image_rng(_check_int(seed, "seed", 0), "sample", 0), image_size)
    normal = [a for a in anns if not a["iscrowd"]]
    crowd = [a for a in anns if a["iscrowd"]]
    shape = (image_size, image_size)
    item = {
        "img": img,
        "gt_bboxes": np.array([a["bbox"] for a in normal], dtype=np.float32).reshape(-1, 4),
        "gt_labels": np.array([a["label"] for a in normal], dtype=np.int64),
        "gt_bboxes_ignore": np.array([a["bbox"] for a in crowd], dtype=np.float32).reshape(-1, 4),
        "img_meta": {
            "image_id": int(seed),
            "file_name": f"sample_{seed}.png",
            "ori_shape": shape,
            "img_shape": shape,
            "pad_shape": shape,
            "scale_factor": (1.0, 1.0, 1.0, 1.0),
            "flip": False,
            "flip_direction": None,
        },
    }
    return (transforms or ToTensor())(item)
