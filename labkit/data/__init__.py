"""Datasets, transforms and batching: COCO-format data, synthetic shapes, tree crowns."""

from labkit.data.coco import CocoDetection, load_image
from labkit.data.collate import collate, make_loader
from labkit.data.paths import data_root
from labkit.data.shapes import CLASSES as SHAPES_CLASSES
from labkit.data.shapes import make_shapes, shapes_dataset, shapes_sample
from labkit.data.transforms import (
    Compose,
    Normalize,
    Pad,
    RandomFlip,
    RandomScaleCrop,
    Resize,
    ToTensor,
    crop_train_transforms,
    test_transforms,
    train_transforms,
)

__all__ = [
    "SHAPES_CLASSES",
    "CocoDetection",
    "Compose",
    "Normalize",
    "Pad",
    "RandomFlip",
    "RandomScaleCrop",
    "Resize",
    "ToTensor",
    "collate",
    "crop_train_transforms",
    "data_root",
    "load_image",
    "make_loader",
    "make_shapes",
    "shapes_dataset",
    "shapes_sample",
    "test_transforms",
    "train_transforms",
]
