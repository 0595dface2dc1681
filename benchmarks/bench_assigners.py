"""MaxIoU and ATSS assignment time per image on COCO-sized inputs (~182k anchors, 50 GTs).

Run: ``.venv/bin/python -m benchmarks.bench_assigners [--quick] [--device cuda]``

A batch of 16 images (``--quick``: 4 images, 20 GTs) with RetinaNet anchors on an
800 x 1216 input, assigned image by image as the heads do. The table gives the time per
image and the positives per GT each assigner produces.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import describe_device, peak_memory_mb, print_table, sync
from benchmarks.bench_paa import random_gt_boxes, retinanet_anchors
from labkit.assigners import ATSSAssigner, MaxIoUAssigner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 images, 20 GTs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    num_images, num_gts = (4, 20) if args.quick else (16, 50)
    shape = (800, 1216)
    priors, num_level = retinanet_anchors(shape, device=args.device)
    gen = torch.Generator().manual_seed(0)
    gts = [random_gt_boxes(num_gts, shape, gen).to(args.device) for _ in range(num_images)]
    labels = [torch.randint(0, 80, (num_gts,), generator=gen).to(args.device) for _ in gts]
    assigners = {
        "MaxIoU (RetinaNet: 0.5 / 0.4)": lambda g, lab: MaxIoUAssigner(0.5, 0.4).assign(
            priors, g, lab
        ),
        "ATSS (topk 9)": lambda g, lab: ATSSAssigner(9).assign(priors, num_level, g, lab),
    }
    print(
        f"{num_images} images x {len(priors)} anchors x {num_gts} GTs on "
        f"{describe_device(args.device)}\n"
    )
    rows = []
    for name, assign in assigners.items():
        assign(gts[0], labels[0])  # warm-up
        sync(args.device)
        start = time.perf_counter()
        num_pos = 0
        for g, lab in zip(gts, labels, strict=True):
            num_pos += int((assign(g, lab).gt_inds > 0).sum())
        sync(args.device)
        per_image = (time.perf_counter() - start) / num_images
        mem = peak_memory_mb(lambda a=assign: a(gts[0], labels[0]), args.device)
        rows.append([name, per_image * 1e3, num_pos / (num_images * num_gts), mem])
    print_table(
        f"Assignment per image ({len(priors)} anchors, {num_gts} GTs, batch of {num_images})",
        ["assigner", "ms / image", "positives / GT", "peak MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
