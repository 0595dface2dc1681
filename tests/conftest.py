"""Shared pytest setup: headless matplotlib, modest threading, a tiny COCO dataset fixture."""

from __future__ import annotations

import contextlib
import io
import os
import socket

# Before torch is imported. Notebook kernels (papermill, nbval) inherit this too: 2 threads is
# what CI has and what notebook baselines were recorded with, so float sums reduce alike.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Kernels started by the tests (papermill, nbval) draw explorers once instead of opening
# ipywidgets comms, which can block nbclient (see labkit.notebook.explorer).
os.environ.setdefault("LABKIT_HEADLESS", "1")

import matplotlib  # noqa: E402

# Headless plots in this process only; MPLBACKEND is left alone so kernels keep inline figures.
matplotlib.use("Agg")

import pytest  # noqa: E402


class TinyCoco:
    """The minimal dataset face evaluation needs: ``.coco``, ``.cat_ids``, ``.classes``."""

    def __init__(self, coco_dict: dict):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = coco_dict
            self.coco.createIndex()
        cats = sorted(coco_dict["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.classes = tuple(c["name"] for c in cats)
        self.num_classes = len(cats)

    def __len__(self) -> int:
        return len(self.coco.getImgIds())


def make_tiny_coco(images: list[dict], anns: list[tuple], categories: list[dict]) -> TinyCoco:
    """Build a :class:`TinyCoco` from ``anns = [(image_id, category_id, [x1, y1, x2, y2]), ...]``."""
    annotations = []
    for k, (image_id, cat_id, (x1, y1, x2, y2)) in enumerate(anns, start=1):
        w, h = x2 - x1, y2 - y1
        annotations.append(
            {
                "id": k,
                "image_id": image_id,
                "category_id": cat_id,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return TinyCoco({"images": images, "annotations": annotations, "categories": categories})


@pytest.fixture
def tiny_coco() -> TinyCoco:
    """Two 200x200 images, two classes with non-contiguous ids (3 "circle", 7 "square"), 3 boxes."""
    images = [
        {"id": 1, "file_name": "a.png", "height": 200, "width": 200},
        {"id": 2, "file_name": "b.png", "height": 200, "width": 200},
    ]
    categories = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    anns = [
        (1, 3, [10.0, 10.0, 60.0, 60.0]),
        (1, 7, [100.0, 100.0, 180.0, 190.0]),
        (2, 7, [20.0, 30.0, 40.0, 45.0]),
    ]
    return make_tiny_coco(images, anns, categories)


@pytest.fixture
def make_coco():
    """Factory fixture: ``make_coco(images, anns, categories) -> TinyCoco`` (see ``make_tiny_coco``)."""
    return make_tiny_coco


def write_tiny_notebook(path, body: str, kernel: str = "labkit") -> None:
    """Write a minimal lesson-shaped notebook: parameters cell, setup, ``body``, exercises."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    book = new_notebook()
    book.metadata["kernelspec"] = {
        "name": kernel,
        "display_name": "Python (labkit)",
        "language": "python",
    }
    params = new_code_cell('quick = True\ndevice = "auto"\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    book.cells = [
        new_markdown_cell("# A tiny lesson"),
        params,
        new_code_cell(
            "import labkit.notebook\nsession = labkit.notebook.setup(quick, device, seed)"
        ),
        new_code_cell(body),
        new_markdown_cell("## Exercises\n1. Exercise: change the seed."),
    ]
    nbformat.write(book, str(path))


@pytest.fixture
def make_notebook():
    """Factory fixture: ``make_notebook(path, body)`` writes a tiny lesson notebook."""
    return write_tiny_notebook


@pytest.fixture(scope="session")
def labkit_kernel() -> str:
    """Name of the Jupyter kernel notebooks run on; registers ``labkit`` for this Python if missing."""
    from labkit.run_notebooks import ensure_kernel

    return ensure_kernel("labkit")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
