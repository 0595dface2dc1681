"""A detection dataset over any COCO instances JSON, parsed the way mmdetection's CocoDataset does."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from labkit.data.transforms import ToTensor

__all__ = ["CocoDetection", "load_image", "validate_coco"]


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """uint8 ``round(v * 255 / 65535)`` of 16-bit values (``v / 257`` is never a tie)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a uint8 RGB array ``[H, W, 3]`` (grey and RGBA are converted).

    16-bit grey images (PNG's ``I;16`` and, from a PNG, ``I``) are scaled to 8 bits,
    ``round(v * 255 / 65535)``, instead of PIL's clipping at 255. Other integer or float
    images (32-bit ``I`` TIFFs, ``F``) have no known range and raise ``ValueError`` naming
    the file, as does an image PIL refuses as a decompression bomb.
    """
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
                grey = _scale_16bit(np.asarray(im).astype(np.int64).clip(0, 65535))
                return np.repeat(grey[:, :, None], 3, axis=2)
            if im.mode in ("I", "F"):
                raise ValueError(
                    f"path: {os.fspath(path)!r} is a {im.mode!r}-mode image (32-bit "
                    f"{'integer' if im.mode == 'I' else 'float'}) with no known value range; "
                    "expected an 8-bit or 16-bit image"
                )
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as err:
        raise Image.DecompressionBombError(
            f"path: {os.fspath(path)!r} is too large to decode safely ({err}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from err


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(entry: dict, key: str, where: str, ann_file: str) -> object:
    if not isinstance(entry, dict):
        raise ValueError(f"{ann_file}: {where} must be an object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{ann_file}: {where} has no '{key}' field")
    return entry[key]


def validate_coco(data: object, ann_file: str = "<dict>") -> None:
    """Raise ``ValueError`` naming the file and field if ``data`` is not a usable instances JSON.

    Checks the top-level ``images``/``categories`` lists (``annotations`` may be absent, as in
    test splits), unique ids, image ``file_name``/``width``/``height``, and for each
    annotation an existing ``image_id`` and ``category_id`` and a ``bbox`` of four finite
    numbers with non-negative width and height.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"{ann_file}: missing top-level field '{key}'")
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: field '{key}' must be a list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{ann_file}: field 'annotations' must be a list")
    image_ids: set = set()
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        img_id = _require(img, "id", where, ann_file)
        if not isinstance(img_id, int) or isinstance(img_id, bool):
            raise ValueError(f"{ann_file}: {where}.id must be an int, got {img_id!r}")
        if img_id in image_ids:
            raise ValueError(f"{ann_file}: {where}.id {img_id} is not unique")
        image_ids.add(img_id)
        if not isinstance(_require(img, "file_name", where, ann_file), str):
            raise ValueError(f"{ann_file}: {where}.file_name must be a string")
        for key in ("width", "height"):
            v = _require(img, key, where, ann_file)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{ann_file}: {where}.{key} must be a positive int, got {v!r}")
    cat_ids: set = set()
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        cat_id = _require(cat, "id", where, ann_file)
        if not isinstance(cat_id, int) or isinstance(cat_id, bool):
            raise ValueError(f"{ann_file}: {where}.id must be an int, got {cat_id!r}")
        if cat_id in cat_ids:
            raise ValueError(f"{ann_file}: {where}.id {cat_id} is not unique")
        cat_ids.add(cat_id)
        if not isinstance(_require(cat, "name", where, ann_file), str):
            raise ValueError(f"{ann_file}: {where}.name must be a string")
    ann_ids: set = set()
    for i, ann in enumerate(anns):
        where = f"annotations[{i}]"
        ann_id = _require(ann, "id", where, ann_file)
        if ann_id in ann_ids:
            raise ValueError(f"{ann_file}: {where}.id {ann_id} is not unique")
        ann_ids.add(ann_id)
        if _require(ann, "image_id", where, ann_file) not in image_ids:
            raise ValueError(f"{ann_file}: {where}.image_id {ann['image_id']!r} is not in 'images'")
        if _require(ann, "category_id", where, ann_file) not in cat_ids:
            raise ValueError(
                f"{ann_file}: {where}.category_id {ann['category_id']!r} is not in 'categories'"
            )
        bbox = _require(ann, "bbox", where, ann_file)
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(
                f"{ann_file}: {where}.bbox must be [x, y, w, h] with 4 finite numbers, got {bbox!r}"
            )
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{ann_file}: {where}.bbox has a negative width or height: {bbox}")
        if "area" in ann and not _is_number(ann["area"]):
            raise ValueError(f"{ann_file}: {where}.area must be a finite number")


class CocoDetection(Dataset):
    """Detection dataset over a COCO instances JSON, matching mmdetection's ``CocoDataset``.

    Args:
        ann_file: path to the instances JSON.
        img_dir: folder the images' ``file_name`` are relative to.
        transforms: callable on the item dict (see ``labkit.data.transforms``); ``None`` only
            converts to tensors (pixel values stay 0-255, not normalized).
        filter_empty: drop images with no annotation of the chosen categories (mmdetection's
            ``filter_empty_gt``); off by default so images without objects stay.
        classes: category names to keep (``None`` = all). As in mmdetection, labels follow
            the order of the ``categories`` list in the JSON, not the order given here, and
            annotations of other categories are skipped.
        check_files: raise at construction if an image file is missing.

    Label ``i`` is category id ``cat_ids[i]`` (mmdetection's ``cat2label``). Boxes ``[x, y, w,
    h]`` become ``[x, y, x + w, y + h]`` (no ``-1``); as in mmdetection's ``_parse_ann_info`` an
    annotation is skipped when ``ignore`` is set, when it does not overlap the image, when
    ``area <= 0`` or ``w < 1`` or ``h < 1``; ``iscrowd`` boxes go to ``gt_bboxes_ignore``.
    When an image file's size differs from the JSON's ``width``/``height``, loading it warns
    (once per file) and re-applies these rules against the file's real size.

    Items: ``{"img", "gt_bboxes": [K, 4], "gt_labels": [K], "gt_bboxes_ignore": [G, 4],
    "img_meta": {image_id, file_name, ori_shape, img_shape, pad_shape, scale_factor, flip,
    flip_direction}}``.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        transforms: Callable[[dict], dict] | None = None,
        filter_empty: bool = False,
        classes: Sequence[str] | None = None,
        check_files: bool = True,
    ) -> None:
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        if transforms is not None and not callable(transforms):
            raise TypeError(f"transforms: expected a callable, got {type(transforms).__name__}")
        self.transforms = transforms
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"ann_file: {self.ann_file} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"ann_file: {self.ann_file} is not valid JSON ({e})") from None
        validate_coco(data, self.ann_file)
        data.setdefault("annotations", [])
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        all_cats = data["categories"]
        if classes is not None:
            names = {c["name"] for c in all_cats}
            missing = [c for c in classes if c not in names]
            if missing:
                raise ValueError(f"classes: {missing} are not categories of {self.ann_file}")
            all_cats = [c for c in all_cats if c["name"] in set(classes)]
        # mmdetection takes coco.get_cat_ids(), i.e. the JSON's category order.
        self.cat_ids: list[int] = [c["id"] for c in all_cats]
        self.cat2label = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self.classes: list[str] = [c["name"] for c in all_cats]

        image_ids = [img["id"] for img in data["images"]]
        if filter_empty:
            with_ann = {a["image_id"] for a in data["annotations"]}
            in_cat = set()
            for cat_id in self.cat_ids:
                in_cat |= set(self.coco.catToImgs[cat_id])
            keep = in_cat & with_ann
            image_ids = [i for i in image_ids if i in keep]
        self.image_ids: list[int] = image_ids
        if check_files:
            for img_id in self.image_ids:
                path = os.path.join(self.img_dir, self.coco.imgs[img_id]["file_name"])
                if not os.path.isfile(path):
                    raise ValueError(
                        f"{self.ann_file}: image file_name {self.coco.imgs[img_id]['file_name']!r} "
                        f"of image id {img_id} not found under img_dir {self.img_dir}"
                    )
        self._anns = [self._parse(self.coco.imgs[i]) for i in self.image_ids]
        self._resized: set[int] = set()  # items whose file size differs from the JSON's

    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``C`` (labels are ``0 .. C-1``)."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _parse(self, img_info: dict, size: tuple[int, int] | None = None) -> dict:
        """Boxes, labels and ignore boxes of one image, as mmdetection's ``_parse_ann_info``.

        ``size``: the image's ``(height, width)`` when it differs from the JSON's."""
        height, width = size or (img_info["height"], img_info["width"])
        bboxes, labels, ignore = [], [], []
        for ann in self.coco.imgToAnns.get(img_info["id"], []):
            if ann.get("ignore", False):
                continue
            x1, y1, w, h = ann["bbox"]
            inter_w = max(0, min(x1 + w, width) - max(x1, 0))
            inter_h = max(0, min(y1 + h, height) - max(y1, 0))
            if inter_w * inter_h == 0:
                continue
            if ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                continue
            if ann["category_id"] not in self.cat2label:
                continue
            box = [x1, y1, x1 + w, y1 + h]
            if ann.get("iscrowd", False):
                ignore.append(box)
            else:
                bboxes.append(box)
                labels.append(self.cat2label[ann["category_id"]])
        return {
            "bboxes": np.array(bboxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.array(labels, dtype=np.int64),
            "bboxes_ignore": np.array(ignore, dtype=np.float32).reshape(-1, 4),
        }

    def get_ann_info(self, idx: int) -> dict:
        """Parsed annotations of item ``idx``: ``bboxes [K, 4]``, ``labels [K]``, ``bboxes_ignore [G, 4]`` (numpy, original pixels)."""
        ann = self._anns[idx]
        return {k: v.copy() for k, v in ann.items()}

    def img_info(self, idx: int) -> dict:
        """The JSON ``images`` entry of item ``idx``."""
        return self.coco.imgs[self.image_ids[idx]]

    def load_item(self, idx: int) -> dict:
        """Item ``idx`` before any transform: uint8 ``img [H, W, 3]`` and numpy boxes."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"idx: {idx} out of range for {len(self)} images")
        idx = idx % len(self)
        info = self.img_info(idx)
        img = load_image(os.path.join(self.img_dir, info["file_name"]))
        shape = tuple(img.shape[:2])
        if shape != (info["height"], info["width"]) and idx not in self._resized:
            # The file wins: parse again against its real size (once, then cached).
            warnings.warn(
                f"{self.ann_file}: image {info['file_name']!r} (id {info['id']}) is "
                f"{shape[1]}x{shape[0]} (width x height) but the JSON says "
                f"{info['width']}x{info['height']}; using the image's size",
                stacklevel=2,
            )
            self._anns[idx] = self._parse(info, shape)
            self._resized.add(idx)
        ann = self.get_ann_info(idx)
        meta = {
            "image_id": info["id"],
            "file_name": info["file_name"],
            "ori_shape": shape,
            "img_shape": shape,
            "pad_shape": shape,
            "scale_factor": (1.0, 1.0, 1.0, 1.0),
            "flip": False,
            "flip_direction": None,
        }
        return {
            "img": img,
            "gt_bboxes": ann["bboxes"],
            "gt_labels": ann["labels"],
            "gt_bboxes_ignore": ann["bboxes_ignore"],
            "img_meta": meta,
        }

    def __getitem__(self, idx: int) -> dict:
        item = self.load_item(idx)
        return (self.transforms or ToTensor())(item)

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file!r}, images={len(self)}, classes={self.classes}, "
            f"transforms={self.transforms!r})"
        )
