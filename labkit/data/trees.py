"""Aerial tree-crown photographs with VOC boxes from the deepforest 2.1.0 wheel (MIT), as COCO.

``make_trees`` downloads the wheel with ``pip download deepforest==2.1.0 --no-deps`` (nothing is
installed or imported from it), reads ``deepforest/data/`` straight from the zip, copies the
images and VOC XMLs listed in ``TREE_IMAGES`` and converts them with :func:`voc_to_coco`:

    OSBS_029                                 400 x 400,   61 "Tree"
    SOAP_061                                 400 x 400,   37 ("Alive" 9, "Dead" 28)
    2019_YELL_2_541000_4977000_image_crop    1249 x 1035, 279 "Tree"

Layout under ``root`` (``data/trees``): ``images/*.png``, ``voc/*.xml``, ``instances_trees.json``
(categories Alive, Dead, Tree) and ``manifest.json`` (wheel and file SHA-256s).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence

from labkit.data.coco import CocoDetection
from labkit.data.paths import default_root
from labkit.data.voc import voc_to_coco

__all__ = [
    "DEEPFOREST_VERSION",
    "TREE_IMAGES",
    "fetch_deepforest_wheel",
    "make_trees",
    "trees_dataset",
]

DEEPFOREST_VERSION = "2.1.0"
TREE_IMAGES = ("OSBS_029", "SOAP_061", "2019_YELL_2_541000_4977000_image_crop")
_DATA_PREFIX = "deepforest/data/"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def fetch_deepforest_wheel(cache_dir: str | os.PathLike) -> str:
    """Path of the deepforest wheel in ``cache_dir``, downloading it with pip if it is not there."""
    cache_dir = os.fspath(cache_dir)
    pattern = os.path.join(cache_dir, f"deepforest-{DEEPFOREST_VERSION}-*.whl")
    found = sorted(glob.glob(pattern))
    if not found:
        os.makedirs(cache_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"deepforest=={DEEPFOREST_VERSION}"]
        cmd += ["--no-deps", "--only-binary=:all:", "-d", cache_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(glob.glob(pattern))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"pip could not download deepforest=={DEEPFOREST_VERSION}:\n{result.stderr[-2000:]}"
            )
    return found[0]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(wheel: str, root: str, names: Sequence[str]) -> list[str]:
    """Copy each name's XML and image out of the wheel; return the XML paths."""
    xml_dir, img_dir = os.path.join(root, "voc"), os.path.join(root, "images")
    os.makedirs(xml_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"wheel: {wheel} is not a zip archive") from None
    with zf:
        members = set(zf.namelist())
        xml_paths = []
        for name in names:
            xml_member = f"{_DATA_PREFIX}{name}.xml"
            if xml_member not in members:
                raise ValueError(f"wheel: {wheel} has no {xml_member}")
            image_members = [f"{_DATA_PREFIX}{name}{ext}" for ext in _IMAGE_EXTS]
            image_member = next((m for m in image_members if m in members), None)
            if image_member is None:
                raise ValueError(f"wheel: {wheel} has no image for {name} (looked for png/jpg)")
            for member, folder in ((xml_member, xml_dir), (image_member, img_dir)):
                with open(os.path.join(folder, os.path.basename(member)), "wb") as f:
                    f.write(zf.read(member))
            xml_paths.append(os.path.join(xml_dir, f"{name}.xml"))
    return xml_paths


def make_trees(
    root: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    names: Sequence[str] = TREE_IMAGES,
) -> dict:
    """Extract the tree-crown images and write ``root/instances_trees.json`` (idempotent).

    Args:
        root: output folder (``None``: ``data/trees`` of this checkout).
        wheel: a deepforest wheel (or any zip with ``deepforest/data/<name>.xml`` + image)
            to read instead of downloading; tests pass a tiny fake one.
        cache_dir: where the downloaded wheel is kept (default ``root/cache``).
        names: which annotated images to take.

    Returns:
        The manifest ``{"wheel", "wheel_sha256", "names", "files": {path: sha256},
        "counts": {name: boxes}, "generated": bool}``.
    """
    root = default_root("trees", root)
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        files_ok = all(
            os.path.isfile(os.path.join(root, p)) and _sha256_file(os.path.join(root, p)) == h
            for p, h in manifest.get("files", {}).items()
        )
        if manifest.get("names") == list(names) and files_ok and manifest.get("files"):
            return {**manifest, "generated": False}
    if wheel is None:
        wheel = fetch_deepforest_wheel(cache_dir or os.path.join(root, "cache"))
    wheel = os.fspath(wheel)
    xml_paths = _extract(wheel, root, names)
    coco = voc_to_coco(xml_paths, os.path.join(root, "images"))
    coco["info"] = {
        "description": f"tree crowns from deepforest {DEEPFOREST_VERSION} (MIT licence)",
        "url": "https://github.com/weecology/DeepForest",
    }
    ann_file = os.path.join(root, "instances_trees.json")
    with open(ann_file, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    counts = {n: 0 for n in names}
    for ann in coco["annotations"]:
        counts[names[ann["image_id"] - 1]] += 1
    rel_files = ["instances_trees.json"]
    rel_files += [os.path.join("images", img["file_name"]) for img in coco["images"]]
    rel_files += [os.path.relpath(p, root) for p in xml_paths]
    manifest = {
        "wheel": os.path.basename(wheel),
        "wheel_sha256": _sha256_file(wheel),
        "names": list(names),
        "counts": counts,
        "files": {p: _sha256_file(os.path.join(root, p)) for p in rel_files},
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return {**manifest, "generated": True}


def trees_dataset(
    root: str | os.PathLike | None = None,
    transforms: Callable[[dict], dict] | None = None,
    classes: Sequence[str] | None = None,
    **make_kwargs,
) -> CocoDetection:
    """The tree crowns as a :class:`CocoDetection` (fetched first if needed).

    ``classes=["Tree"]`` keeps only the OSBS/YELL trees (SOAP's boxes are then skipped, as
    mmdetection skips categories outside its class list).
    """
    root = default_root("trees", root)
    make_trees(root, **make_kwargs)
    return CocoDetection(
        os.path.join(root, "instances_trees.json"),
        os.path.join(root, "images"),
        transforms,
        classes=classes,
    )
