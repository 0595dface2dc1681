"""A dataset named on a command line or in a notebook parameter (``--data``, ``data``), and the
check that it has the classes a checkpoint was trained on.

``labkit train`` / ``labkit eval``, the zoo and the lessons' ``data`` parameter all read data
specs through :func:`build_dataset`: ``shapes``, ``shapes:N``, ``trees`` or
``PATH.json[:IMG_DIR]`` (COCO format).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from labkit import data

__all__ = ["build_dataset", "check_classes", "relative_note"]


def relative_note(path: str) -> str:
    """`` (relative to CWD)`` for a relative path: papermill runs notebooks in ``notebooks/``."""
    return "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"


def build_dataset(
    spec: str,
    split: str,
    image_size: tuple[int, int],
    crop: int | None = None,
    scale_range: tuple[float, float] = (0.6, 1.0),
    *,
    argument: str = "--data",
) -> Any:
    """The dataset named by ``spec``: ``shapes``, ``shapes:N``, ``trees`` or ``PATH.json[:IMG_DIR]``.

    ``shapes:N`` generates ``N`` training images (in ``data/shapes-nN``) instead of 256; its
    val split is the standard one (images are drawn per split and index, so they are the
    same). ``split="train"`` uses the training transforms (resize to ``image_size`` (h, w
    limits) and random flip, or with ``crop`` a random ``crop`` x ``crop`` window of the image
    scaled by a factor in ``scale_range``), anything else the test transforms (resize,
    normalize, pad). ``trees`` and a COCO file have a single split, used for both. ``IMG_DIR``
    defaults to the annotation file's folder. Errors name ``argument``.

    Returns:
        A ``CocoDetection`` whose items hold ``img: Tensor[3, H, W]``, ``gt_bboxes:
        Tensor[K, 4]`` (xyxy pixels of the resized image) and ``gt_labels: LongTensor[K]``;
        ``.classes`` lists the class names (label ``i`` is ``classes[i]``).
    """

    if split != "train":
        transforms = data.test_transforms(image_size)
    elif crop is not None:
        transforms = data.crop_train_transforms(crop, scale_range)
    else:
        transforms = data.train_transforms(image_size)
    if spec == "shapes" or spec.startswith("shapes:"):
        _, _, count = spec.partition(":")
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"{argument}: expected shapes:N with N a positive int, got {spec!r}")
        num_train = int(count) if count else 256
        if split != "train" or num_train == 256:  # the val split is the same for every N
            return data.shapes_dataset(
                "train" if split == "train" else "val", transforms=transforms
            )
        root = os.path.join(data.data_root(), f"shapes-n{num_train}")
        return data.shapes_dataset("train", root=root, transforms=transforms, num_train=num_train)
    if spec == "trees":
        from labkit.data.trees import trees_dataset

        return trees_dataset(transforms=transforms)
    ann_file, sep, img_dir = spec.partition(".json:")
    ann_file = ann_file + ".json" if sep else spec
    if not ann_file.endswith(".json"):
        raise ValueError(
            f"{argument}: expected 'shapes', 'trees' or PATH.json[:IMG_DIR], got {spec!r}"
        )
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(
            f"{argument}: no annotation file at {ann_file!r}{relative_note(ann_file)}"
        )
    return data.CocoDetection(ann_file, img_dir or os.path.dirname(ann_file) or ".", transforms)


def check_classes(recipe: Mapping, dataset: Any, spec: str, *, argument: str = "--data") -> None:
    """Raise ``ValueError`` (naming ``argument``) unless ``dataset`` has the classes, in the
    order, the checkpoint was trained on (``recipe["classes"]``, else the count
    ``recipe["kwargs"]["num_classes"]``; nothing known, nothing checked): label ``i`` of the
    model must mean class ``i`` of the data, or every name drawn and every per-class AP is
    wrong."""
    trained = [str(c) for c in recipe.get("classes") or []]
    num_trained = recipe.get("kwargs", {}).get("num_classes", len(trained) or None)
    names = [str(c) for c in getattr(dataset, "classes", None) or []]
    num_data = getattr(dataset, "num_classes", len(names) or None)
    if num_trained is not None and num_data is not None and num_trained != num_data:
        raise ValueError(
            f"{argument}: {spec!r} has {num_data} classes {names} but the checkpoint's "
            f"model predicts {num_trained} (recipe.classes {trained}); evaluate on data with the "
            "classes it was trained on"
        )
    if trained and names and trained != names:
        how = (
            "the same classes in another order"
            if sorted(trained) == sorted(names)
            else "other classes"
        )
        raise ValueError(
            f"{argument}: {spec!r} has {how} than the checkpoint: {names} vs "
            f"recipe.classes {trained}; label i must be the same class in both (labels follow "
            "the order of the JSON's 'categories'), so reorder them or use the training data"
        )
