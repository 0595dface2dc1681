"""Convert Pascal VOC XML annotations to a COCO instances dict."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from PIL import Image

__all__ = ["parse_voc_xml", "voc_to_coco"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _text(node: ET.Element, tag: str, xml_path: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_path}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def parse_voc_xml(xml_path: str | os.PathLike) -> dict:
    """Read one VOC XML: ``{"filename", "width", "height", "objects": [{"name", "bbox", "difficult"}]}``.

    ``bbox`` is ``[xmin, ymin, xmax, ymax]`` as floats, exactly as written; ``width``/``height``
    are ``None`` when ``<size>`` is missing. Raises ``ValueError`` naming the file and tag on
    malformed input.
    """
    xml_path = os.fspath(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not valid XML ({e})") from None
    filename = _text(root, "filename", xml_path)
    size = root.find("size")
    width = height = None
    if size is not None and size.find("width") is not None:
        width, height = int(_text(size, "width", xml_path)), int(_text(size, "height", xml_path))
    objects = []
    for i, obj in enumerate(root.findall("object")):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_path}: <object> {i} has no <bndbox>")
        try:
            bbox = [float(_text(box, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise ValueError(f"{xml_path}: <object> {i} <bndbox>: {e}") from None
        if not all(math.isfinite(v) for v in bbox) or bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            raise ValueError(f"{xml_path}: <object> {i} has an invalid <bndbox> {bbox}")
        difficult = obj.find("difficult")
        objects.append(
            {
                "name": _text(obj, "name", xml_path),
                "bbox": bbox,
                "difficult": difficult is not None and (difficult.text or "0").strip() == "1",
            }
        )
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def _find_image(image_dir: str, filename: str, xml_path: str) -> str:
    """The image file for ``filename``; falls back to the same stem with another extension."""
    base = os.path.basename(filename)
    if os.path.isfile(os.path.join(image_dir, base)):
        return base
    stem = os.path.splitext(base)[0]
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(os.path.join(image_dir, stem + ext)):
            return stem + ext
    raise ValueError(
        f"{xml_path}: image {filename!r} (or {stem}.png/.jpg/...) not found in {image_dir}"
    )


def voc_to_coco(
    xml_paths: Sequence[str | os.PathLike],
    image_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    minus_one: bool = False,
) -> dict:
    """Build a COCO instances dict from VOC XML files.

    Args:
        xml_paths: one XML per image; image ids are ``1..N`` in this order.
        image_dir: where the images are; an XML's ``<filename>`` is looked up there, falling
            back to the same stem with a common extension (``OSBS_029.tif`` → ``OSBS_029.png``).
            Width and height come from the image file itself.
        class_names: category order (ids ``1..C``); ``None`` = sorted names found. An object
            whose name is not in ``class_names`` raises ``ValueError``.
        minus_one: subtract 1 from every coordinate, as mmdetection's VOC converter does for
            the 1-based VOC devkit. Off by default: data such as deepforest's uses 0-based
            pixel edges (``xmax`` reaches the image width).

    Boxes become ``[xmin, ymin, xmax - xmin, ymax - ymin]`` (no ``+1``); ``difficult``
    objects become ``iscrowd=1`` so a :class:`CocoDetection` treats them as ignore boxes,
    like mmdetection's converter.
    """
    image_dir = os.fspath(image_dir)
    parsed = [(os.fspath(p), parse_voc_xml(p)) for p in xml_paths]
    found = sorted({o["name"] for _, rec in parsed for o in rec["objects"]})
    names = list(found if class_names is None else class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"class_names: names must be unique, got {names}")
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, (xml_path, rec) in enumerate(parsed, start=1):
        file_name = _find_image(image_dir, rec["filename"], xml_path)
        with Image.open(os.path.join(image_dir, file_name)) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in rec["objects"]:
            if obj["name"] not in cat_id:
                raise ValueError(
                    f"{xml_path}: object name {obj['name']!r} is not in class_names {names}"
                )
            x1, y1, x2, y2 = (v - 1 for v in obj["bbox"]) if minus_one else obj["bbox"]
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[obj["name"]],
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": int(obj["difficult"]),
                }
            )
    categories = [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in names]
    return {"images": images, "annotations": annotations, "categories": categories}
