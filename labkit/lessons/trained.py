"""Trained models for the lessons' analyses, and the data to run them on: the zoo's by default,
or your own checkpoint (labkit's or mmdetection's) on your own COCO-format images.

    model = trained_model("paa")                     # the zoo's PAA, seed 0 (what notebook 02 shows)
    model = trained_model("paa", checkpoint="paa_r50_fpn_1x_coco_20200821-936edec3.pth")
    val_set = analysis_dataset("paa", "instances_val2017.json:val2017/", checkpoint=...)

A labkit checkpoint (``labkit train``) records its recipe, data, image size and classes; an
mmdetection checkpoint is converted by :func:`labkit.convert.from_mmdet` and names no data, so
``data`` is then required and the images are resized to mmdetection's COCO test scale
(``(800, 1333)``). ``labkit eval`` reads checkpoints and ``--data`` through the same functions
(:func:`labkit.data.spec.build_dataset`, :func:`~labkit.data.spec.check_classes`,
:func:`labkit_checkpoint`, :func:`load_mmdet_model`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labkit.data.spec import build_dataset, check_classes, relative_note

if TYPE_CHECKING:  # recipes, convert and zoo are imported late below: not every head at import
    from torch import nn

__all__ = [
    "MMDET_TEST_SIZE",
    "AnalysisSample",
    "analysis_dataset",
    "analysis_sample",
    "build_recipe_model",
    "checkpoint_recipe",
    "describe_trained",
    "labkit_checkpoint",
    "load_mmdet_model",
    "mmdet_classes",
    "trained_model",
    "untrained_like",
]

MMDET_TEST_SIZE = (800, 1333)  # mmdetection's COCO test Resize scale=(1333, 800), as (h, w) limits

# The head class each dense recipe's mmdetection config names (``bbox_head=dict(type=...)``):
# ATSS and PAA share every key name, so only the config text tells them apart.
_MMDET_HEADS = {
    "retinanet": "RetinaHead",
    "atss": "ATSSHead",
    "paa": "PAAHead",
    "fcos": "FCOSHead",
    "foveabox": "FoveaHead",
    "fsaf": "FSAFHead",
    "reppoints": "RepPointsHead",
}
# A key only some mmdetection architectures have, first match wins (to say what a checkpoint is).
_MMDET_SIGNATURES = (
    ("query_head.", "co_deformable_detr"),
    ("bbox_head.cls_branches.", "deformable_detr"),
    ("roi_head.", "faster_rcnn"),
    ("bbox_head.reppoints_cls_out.", "reppoints"),
    ("bbox_head.conv_centerness.", "fcos"),
    ("bbox_head.atss_cls.", "atss or paa"),
    ("bbox_head.retina_cls.", "retinanet or fsaf"),
    ("bbox_head.conv_cls.", "foveabox"),
)
_UNKNOWN = "no architecture labkit converts"
# Analyses that any of several recipes can feed: notebook 04 reads the decoder's sampling of
# any Deformable-DETR, plain (mmdetection's) or Co-DETR's (the zoo's entry is Co-DETR's model
# without auxiliary heads). The checkpoint's own recipe is used when it is one of these.
_ANALYSIS_RECIPES = {"deformable_detr": ("co_deformable_detr", "deformable_detr")}


def mmdet_classes(meta: Mapping) -> list[str]:
    """The class names an mmdetection checkpoint's ``meta`` records: 3.x's
    ``dataset_meta["classes"]`` or 2.x's ``CLASSES`` (``[]`` when neither is there)."""
    classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES") or []
    return [str(c) for c in classes]


def _check_mmdet_head(meta: Mapping, recipe: str) -> None:
    """Refuse a checkpoint whose config text builds another dense recipe's head."""
    text = meta.get("cfg") or meta.get("config")
    if recipe not in _MMDET_HEADS or not isinstance(text, str):
        return
    # `type='PAAHead'` (a config file's text) or `'type': 'PAAHead'` (a dict's repr)
    heads = set(re.findall(r"\btype['\"]?\s*[=:]\s*['\"](\w+Head)['\"]", text))
    known = sorted(heads & set(_MMDET_HEADS.values()))
    if known and _MMDET_HEADS[recipe] not in known:
        other = next(k for k, v in _MMDET_HEADS.items() if v == known[0])
        raise ValueError(
            f"checkpoint: its config builds mmdetection's {known[0]} (labkit's {other!r}), not "
            f"the {_MMDET_HEADS[recipe]} of {recipe!r}"
        )


def _mmdet_guess(state: Mapping) -> str:
    for prefix, name in _MMDET_SIGNATURES:
        if any(key.startswith(prefix) for key in state):
            return name
    return _UNKNOWN


def load_mmdet_model(
    checkpoint: str | os.PathLike | Mapping, recipe: str
) -> tuple[nn.Module, list]:
    """Convert an mmdetection checkpoint (a path or a loaded dict) to labkit recipe ``recipe``.

    Besides :func:`labkit.convert.from_mmdet`'s key checks, refuses a checkpoint whose config
    text builds another dense head (an ATSS given as PAA: the two share every key name), and
    says what a checkpoint of another architecture looks like.

    Returns:
        ``(model, classes)``: the model in eval mode (e.g. a ``SingleStageDetector`` whose
        ``forward(img: Tensor[B, 3, H, W])`` gives the head outputs per level) and the class
        names its ``meta`` records (``[]`` when none).

    Raises:
        ValueError / TypeError / OSError: starting ``checkpoint:`` (or the recipe argument
            :func:`~labkit.convert.from_mmdet` names), saying what is wrong.
    """
    from labkit.convert import from_mmdet, load_mmdet_state

    state, meta = load_mmdet_state(checkpoint)
    _check_mmdet_head(meta, recipe)
    try:
        model = from_mmdet({"meta": meta, "state_dict": state}, recipe)
    except ValueError as err:
        guess = _mmdet_guess(state)
        if recipe in guess.split(" or "):
            raise
        raise ValueError(f"{err} (its keys look like mmdetection's {guess})") from err
    return model, mmdet_classes(meta)


def labkit_checkpoint(path: str | os.PathLike, recipes: Mapping | None = None) -> dict:
    """A checkpoint saved by ``labkit train`` (or the zoo), read and verified with
    :func:`labkit.engine.checkpoint.load_checkpoint`; its ``recipe`` must name one of
    ``recipes`` (default ``labkit.recipes.RECIPES``).

    Returns:
        The checkpoint dict: ``model`` (the state dict), ``recipe`` (``name``, ``kwargs``,
        ``data``, ``image_size``, ``classes``), ...
    """
    from labkit.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    recipe = ckpt.get("recipe") or {}
    if "name" not in recipe:
        raise _no_recipe(path)
    if recipe["name"] not in _recipes(recipes):
        raise ValueError(f"checkpoint: its model {recipe['name']!r} is not a known recipe")
    return ckpt


def _no_recipe(path: str | os.PathLike) -> ValueError:
    return ValueError(
        f"checkpoint: {os.fspath(path)} stores no model recipe (saved outside `labkit train` "
        "without recipe=...); load it in Python with labkit.engine.checkpoint.load_checkpoint"
    )


def _recipes(recipes: Mapping | None) -> Mapping:
    if recipes is not None:
        return recipes
    from labkit.recipes import RECIPES

    return RECIPES


def build_recipe_model(ckpt: Mapping, recipes: Mapping | None = None) -> nn.Module:
    """The model of a :func:`labkit_checkpoint`: its recipe built with the recorded arguments,
    its weights loaded (float16 zoo weights into the float32 model), in eval mode."""
    from labkit.engine.checkpoint import load_model_state

    recipe = ckpt["recipe"]
    model = _recipes(recipes)[recipe["name"]].build(**recipe.get("kwargs", {}))
    load_model_state(model, ckpt["model"])
    return model.eval()


def _zoo_entry(zoo_name: str) -> Any:
    from labkit.zoo import ZOO

    if zoo_name not in ZOO:
        raise ValueError(f"zoo_name: expected one of {sorted(ZOO)}, got {zoo_name!r}")
    return ZOO[zoo_name]


def _peek(path: str) -> Any:
    """``torch.load`` of ``path`` without reading the tensors (memory-mapped where possible)."""
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}{relative_note(path)}")
    try:  # torch's legacy (non-zip) format cannot be memory-mapped
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # pickled objects beyond tensors, not a torch file, ...
        raise ValueError(
            f"checkpoint: torch.load(weights_only=True) could not read {path!r}: {err}"
        ) from err


def _is_labkit(raw: Any) -> bool:
    return isinstance(raw, Mapping) and ("recipe" in raw or "model" in raw)


def checkpoint_recipe(
    zoo_name: str,
    checkpoint: str | os.PathLike | None = None,
    recipe: str | None = None,
    seed: int = 0,
) -> dict:
    """What a checkpoint says about its model and data, as ``labkit train`` records it, and
    whether it fits the analysis of zoo model ``zoo_name`` (its recipe, or ``recipe``).

    ``checkpoint=None`` reads the zoo's own file (``zoo_name``, ``seed``). A labkit checkpoint
    must hold the expected recipe; an mmdetection one (anything without a labkit ``recipe`` or
    ``model`` entry) is taken as that recipe, with the classes its ``meta`` records.

    Returns:
        ``{"name", "kwargs", "classes", "data", "image_size", "format"}``: ``format`` is
        ``"labkit"`` or ``"mmdet"``; for mmdetection ``data`` and ``image_size`` are ``None``
        and ``kwargs`` is empty (the class count is known once converted).
    """
    entry = _zoo_entry(zoo_name)
    expected = recipe or entry.recipe
    accepted = (recipe,) if recipe else _ANALYSIS_RECIPES.get(zoo_name, (entry.recipe,))
    if checkpoint is None:
        if expected != entry.recipe:
            raise ValueError(
                f"recipe: {recipe!r} needs a checkpoint; the zoo's {zoo_name!r} is {entry.recipe!r}"
            )
        from labkit import zoo

        path = os.fspath(zoo.zoo_dir() / zoo.manifest_row(zoo_name, seed)["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"zoo_name: {zoo_name!r} seed {seed}: {path} is missing (git lfs? a partial "
                f"checkout?); restore it or pass checkpoint=..."
            )
    else:
        path = os.fspath(checkpoint)
    raw = _peek(path)
    if not isinstance(raw, Mapping):
        raise TypeError(f"checkpoint: {path} holds a {type(raw).__name__}, not a checkpoint dict")
    if not _is_labkit(raw):
        from labkit.convert import MMDET_RECIPES

        if expected not in MMDET_RECIPES:
            raise ValueError(f"recipe: no mmdetection conversion for {expected!r}")
        meta = raw.get("meta") if "state_dict" in raw else None
        meta = meta if isinstance(meta, Mapping) else {}
        guess = _mmdet_guess(raw.get("state_dict", raw))
        if guess in accepted:
            expected = guess
        # what the meta and the key names show, before the weights are read
        _check_mmdet_head(meta, expected)
        if guess != _UNKNOWN and expected not in guess.split(" or "):
            raise ValueError(
                f"checkpoint: its keys look like mmdetection's {guess}, but this analysis needs "
                f"{expected!r} (the zoo's {zoo_name!r})"
            )
        return {
            "name": expected,
            "kwargs": {},
            "classes": mmdet_classes(meta),
            "data": None,
            "image_size": None,
            "format": "mmdet",
        }
    found = (raw.get("recipe") or {}).get("name")
    if found is None:
        raise _no_recipe(path)
    if found in accepted:
        expected = found
    if found != expected:
        raise ValueError(
            f"checkpoint: {path} holds a labkit {found!r} model, but this analysis needs "
            f"{expected!r} (the zoo's {zoo_name!r})"
        )
    return {**raw["recipe"], "format": "labkit"}


def trained_model(
    zoo_name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    recipe: str | None = None,
    device: Any = "cpu",
    seed: int = 0,
) -> nn.Module:
    """The trained model a lesson analyses: zoo model ``zoo_name`` (``seed``), or ``checkpoint``.

    Args:
        zoo_name: the zoo entry the lesson uses (``"atss"``, ``"paa"``, ``"fcos"``, ...); its
            recipe is what the analysis needs.
        checkpoint: ``None`` for the zoo's file (hash-checked, :func:`labkit.zoo.load`); a
            labkit checkpoint (``labkit train``), which must hold that recipe; or an
            mmdetection 3.x checkpoint, converted by :func:`labkit.convert.from_mmdet`.
        recipe: the labkit recipe the checkpoint must hold (default: the zoo entry's), e.g.
            ``"retinanet"`` for notebook 01's pipeline figure, which any anchor head can draw.
        device: where the model goes.

    Returns:
        The model in eval mode on ``device``: a detector whose ``forward(img: Tensor[B, 3, H,
        W])`` (ImageNet-normalized RGB) gives the head outputs per level.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file (the message says the working directory).
        ValueError: starting ``checkpoint:`` for another recipe's checkpoint (a FCOS given to
            PAA's analysis, an ATSS whose config says so), unmapped keys or an unreadable file.
    """
    info = checkpoint_recipe(zoo_name, checkpoint, recipe, seed)
    if checkpoint is None:
        from labkit import zoo

        return zoo.load(zoo_name, seed=seed, device=device)
    path = os.fspath(checkpoint)
    if info["format"] == "labkit":
        model = build_recipe_model(labkit_checkpoint(path))
    else:
        model, _ = load_mmdet_model(_peek(path), info["name"])
    return model.to(device).eval()


def _analysis_data(
    zoo_name: str,
    data: str | None,
    checkpoint: str | os.PathLike | None,
    recipe: str | None,
    seed: int,
) -> tuple[Any, tuple[int, int]]:
    info = checkpoint_recipe(zoo_name, checkpoint, recipe, seed)
    spec = data if data is not None else info.get("data")
    if spec is None:
        raise ValueError(
            "data: an mmdetection checkpoint names no data; pass data='PATH.json[:IMG_DIR]' "
            "(COCO format, e.g. 'annotations/instances_val2017.json:val2017/')"
        )
    image_size = tuple(info.get("image_size") or MMDET_TEST_SIZE)
    dataset = build_dataset(spec, "val", image_size, argument="data")
    check_classes(info, dataset, spec, argument="data")
    return dataset, image_size


def analysis_dataset(
    zoo_name: str,
    data: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    recipe: str | None = None,
    seed: int = 0,
) -> Any:
    """The images a lesson analyses its trained model on (test transforms, ``val`` split).

    ``data`` is a ``labkit train --data`` spec (``PATH.json[:IMG_DIR]`` for COCO-format data);
    ``None`` means the data the checkpoint (by default the zoo's: the shapes val split) was
    trained on, which an mmdetection checkpoint does not name. Images are resized to the
    checkpoint's recorded image size (the zoo's 512 x 512), mmdetection's to ``(800, 1333)``
    limits. The classes must be the checkpoint's (names and order, or at least their count),
    and the checkpoint must hold the analysis's recipe (the zoo entry's, or ``recipe``).

    Returns:
        A ``CocoDetection``: items with ``img: Tensor[3, H, W]`` (normalized, padded),
        ``gt_bboxes: Tensor[K, 4]``, ``gt_labels: LongTensor[K]``; ``.classes`` names the
        labels (COCO's 80 for ``instances_val2017.json``).
    """
    return _analysis_data(zoo_name, data, checkpoint, recipe, seed)[0]


@dataclass
class AnalysisSample:
    """One image for a lesson's analysis, ready to draw and to run.

    Attributes:
        item: the image as a dataset item before normalization: ``img: Tensor[3, H, W]`` in
            0-255, ``gt_bboxes: Tensor[K, 4]`` xyxy pixels, ``gt_labels: LongTensor[K]``,
            ``img_meta`` (``img_shape`` is ``(H, W)``).
        batch: the same image collated for the model (normalized, padded: ``img: Tensor[1, 3,
            H', W']``, ``padding_mask``, ``img_metas``, ``gt_bboxes``, ``gt_labels``).
        classes: the class names of the labels.
        name: a title for it (``"shapes sample 0"``, ``"image 3: 000000000632.jpg"``).
    """

    item: dict
    batch: dict
    classes: list[str]
    name: str


def analysis_sample(
    zoo_name: str,
    data: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    recipe: str | None = None,
    index: int = 0,
    seed: int = 0,
) -> AnalysisSample:
    """The image notebook 02 runs every assigner on: by default (no ``checkpoint``, no
    ``data``) the shapes sample drawn from ``index`` at 512 x 512 (``shapes_sample``);
    otherwise image ``index`` of :func:`analysis_dataset` (``data`` or the checkpoint's own).
    ``item`` and ``batch`` hold the same resized image, so their boxes agree."""
    from labkit.data import SHAPES_CLASSES, collate, shapes_sample, test_transforms
    from labkit.data.transforms import Compose, Resize, ToTensor

    if checkpoint is None and data is None:
        checkpoint_recipe(zoo_name, None, recipe, seed)  # the zoo entry exists
        test = test_transforms((512, 512))
        return AnalysisSample(
            item=shapes_sample(seed=index),
            batch=collate([shapes_sample(seed=index, transforms=test)]),
            classes=list(SHAPES_CLASSES),
            name=f"shapes sample {index}",
        )
    dataset, image_size = _analysis_data(zoo_name, data, checkpoint, recipe, seed)
    raw = Compose([Resize(image_size, keep_ratio=True), ToTensor()])(dataset.load_item(index))
    return AnalysisSample(
        item=raw,
        batch=collate([dataset[index]]),
        classes=list(dataset.classes),
        name=f"image {index}: {raw['img_meta']['file_name']}",
    )


def describe_trained(
    zoo_name: str, checkpoint: str | os.PathLike | None = None, seed: int = 0
) -> str:
    """One line naming the model :func:`trained_model` returns, e.g. ``"zoo paa seed 0: 0.179
    COCO AP on shapes val"`` or ``"paa_r50_fpn_1x_coco_20200821-936edec3.pth: an mmdetection
    checkpoint as labkit's 'paa'"``."""
    if checkpoint is None:
        from labkit import zoo

        ap = zoo.manifest_row(zoo_name, seed)["AP"]
        return f"zoo {zoo_name} seed {seed}: {ap:.3f} COCO AP on shapes val"
    info = checkpoint_recipe(zoo_name, checkpoint, None, seed)
    kind = "a labkit" if info["format"] == "labkit" else "an mmdetection"
    return (
        f"{os.path.basename(os.fspath(checkpoint))}: {kind} checkpoint as labkit's {info['name']!r}"
    )


def untrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialised copy of ``model``'s architecture (its ``model.recipe``: name and
    keyword arguments), seeded with ``seed``, in eval mode on ``model``'s device: what the
    trained model looked like before training."""
    import torch

    from labkit.recipes import RECIPES

    recipe = getattr(model, "recipe", None)
    if not recipe:
        raise ValueError("model: it records no recipe (build it with labkit.recipes)")
    name, kwargs = recipe
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    return RECIPES[name].build(**kwargs).to(device).eval()
