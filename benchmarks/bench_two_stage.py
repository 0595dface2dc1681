"""Where a Faster R-CNN training step spends its time, and what it costs next to RetinaNet.

Run: ``.venv/bin/python -m benchmarks.bench_two_stage [--quick] [--device cuda]``

Three tables, measured in one run:

1. RoIAlign (``RoIExtractor``, 4 levels, 7x7, sampling_ratio 0) forward + backward for the
   RoIs a step samples per image (512 as in mmdetection, 128, 64), ratio to 512;
2. RPN proposals per image (sigmoid, per-level top ``nms_pre``, decode, per-level NMS) for
   ``nms_pre`` 1000 / 2000 / 4000 (test, Faster R-CNN training, Co-DETR training);
3. a whole training step (forward, loss, backward, AdamW) of ``faster_rcnn`` and
   ``retinanet`` with the same backbone on one batch, images/s and ratio to RetinaNet.

``--quick`` is the CPU setting: tiny backbone, 2 images of 320 px, 32-channel features;
the full setting uses ResNet-50, 2 images of 800 px, 256-channel features.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import describe_device, peak_memory_mb, print_table, time_call
from labkit.assigners import RandomSampler
from labkit.heads.roi_extractor import RoIExtractor
from labkit.heads.rpn import RPNHead
from labkit.recipes import faster_rcnn, retinanet


def random_boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` boxes inside a ``size`` square, sides 16 px .. size / 2 (a spread of FPN levels)."""
    wh = 16 + torch.rand(n, 2, generator=generator) * (size / 2 - 16)
    xy = torch.rand(n, 2, generator=generator) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def batch_of(num_images: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    meta = {
        "img_shape": (size, size),
        "pad_shape": (size, size),
        "ori_shape": (size, size),
        "batch_input_shape": (size, size),
        "scale_factor": (1.0,) * 4,
    }
    return {
        "img": torch.randn(num_images, 3, size, size, generator=g).to(device),
        "img_metas": [dict(meta, image_id=i) for i in range(num_images)],
        "gt_bboxes": [random_boxes(6, size, g).to(device) for _ in range(num_images)],
        "gt_labels": [torch.randint(0, 5, (6,), generator=g).to(device) for _ in range(num_images)],
    }


def bench_roi_align(size: int, channels: int, num_images: int, device: torch.device) -> None:
    extractor = RoIExtractor([4, 8, 16, 32])
    feats = [
        torch.randn(num_images, channels, size // s, size // s, device=device, requires_grad=True)
        for s in (4, 8, 16, 32)
    ]
    g = torch.Generator().manual_seed(1)
    rows, base = [], None
    for per_image in (512, 128, 64):
        rois = torch.cat(
            [
                torch.cat(
                    [torch.full((per_image, 1), float(i)), random_boxes(per_image, size, g)], 1
                )
                for i in range(num_images)
            ]
        ).to(device)

        def step(rois=rois):
            extractor(feats, rois).sum().backward()

        t = time_call(step, device=device)
        base = base or t
        rows.append([per_image, t * 1e3, base / t, peak_memory_mb(step, device)])
    print_table(
        f"RoIAlign fwd+bwd, {num_images} images, {channels} ch, {describe_device(device)}",
        ["RoIs / image", "ms", "speed-up vs 512", "peak MiB"],
        rows,
    )


def bench_proposals(size: int, channels: int, device: torch.device) -> None:
    head = RPNHead(channels, channels).to(device)
    feats = [
        torch.randn(1, channels, size // s, size // s, device=device) for s in (4, 8, 16, 32, 64)
    ]
    meta = batch_of(1, size, device)["img_metas"]
    with torch.no_grad():
        outs = head(feats)
    rows, base = [], None
    for nms_pre in (1000, 2000, 4000):
        cfg = head.with_test_cfg(nms_pre=nms_pre)

        def run(cfg=cfg):
            head.predict_by_feat(*outs, batch_img_metas=meta, cfg=cfg)

        t = time_call(run, device=device)
        base = base or t
        n = head.predict_by_feat(*outs, batch_img_metas=meta, cfg=cfg)[0]["boxes"].shape[0]
        rows.append([nms_pre, t * 1e3, t / base, n])
    print_table(
        f"RPN proposals per image, {size} px, {describe_device(device)}",
        ["nms_pre", "ms", "time vs 1000", "proposals kept"],
        rows,
    )


def bench_step(backbone: str, size: int, device: torch.device) -> None:
    batch = batch_of(2, size, device)
    rows, base = [], None
    for name, build in (("retinanet", retinanet), ("faster_rcnn", faster_rcnn)):
        torch.manual_seed(0)
        model = build(5, backbone=backbone).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            losses = model.loss(batch)
            total = sum(v for k, v in losses.items() if "loss" in k)
            opt.zero_grad()
            total.backward()
            opt.step()

        t = time_call(step, device=device, warmup=2, repeat=5)
        base = base or t
        rows.append([name, t * 1e3, 2 / t, base / t, peak_memory_mb(step, device)])
    # Faster R-CNN with 64 sampled RoIs (the tests' setting): how much of the step is RoIAlign
    model.head.roi_head.sampler = RandomSampler(64, 0.25)
    t = time_call(step, device=device, warmup=1, repeat=5)
    rows.append(["faster_rcnn (64 RoIs)", t * 1e3, 2 / t, base / t, peak_memory_mb(step, device)])
    print_table(
        f"Training step, 2 x {size} px, {backbone}, {describe_device(device)}",
        ["detector", "ms / step", "images / s", "speed vs retinanet", "peak MiB"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU setting")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, channels, backbone = (320, 32, "tiny") if args.quick else (800, 256, "resnet50")
    bench_roi_align(size, channels, 2, device)
    bench_proposals(size, channels, device)
    bench_step(backbone, size, device)


if __name__ == "__main__":
    main()
