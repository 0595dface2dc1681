"""PAA re-assignment: batched torch EM vs one scikit-learn GaussianMixture per GT, same inputs.

Run: ``.venv/bin/python -m benchmarks.bench_paa [--quick] [--device cuda]``

The inputs are what PAAHead hands to ``paa_reassign`` on a COCO-sized image: RetinaNet
anchors (9 per location, strides 8-128, ~182k on 800 x 1216), 50 random GTs, first-stage
positives from PAA's MaxIoU (IoU >= 0.1) and per-positive losses that fall with IoU plus
noise. The table gives the time per image of each backend (medians over interleaved rounds
of one reference call and ten torch calls), the speed-up and the share of priors whose final
label agrees.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from benchmarks._common import describe_device, print_table, time_side_by_side
from labkit.anchors import AnchorGenerator
from labkit.assigners import MaxIoUAssigner
from labkit.assigners.paa import paa_reassign

NUM_CLASSES = 80


def retinanet_anchors(image_shape: tuple[int, int], device="cpu") -> tuple[torch.Tensor, list[int]]:
    """RetinaNet anchors (strides 8-128, 3 scales x 3 ratios) of an ``(h, w)`` image."""
    gen = AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )
    h, w = image_shape
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    levels = gen.grid_priors(sizes, device=device)
    return torch.cat(levels), [len(level) for level in levels]


def random_gt_boxes(num_gts: int, image_shape: tuple[int, int], generator: torch.Generator):
    """``num_gts`` boxes with log-uniform sizes 16-400 px inside an ``(h, w)`` image."""
    h, w = image_shape
    size = torch.exp(torch.empty(num_gts, 2).uniform_(2.77, 6.0, generator=generator))
    bw, bh = size[:, 0].clamp(max=w - 1), size[:, 1].clamp(max=h - 1)
    x1 = torch.rand(num_gts, generator=generator) * (w - bw)
    y1 = torch.rand(num_gts, generator=generator) * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


def make_inputs(
    num_gts: int = 50,
    image_shape: tuple[int, int] = (800, 1216),
    seed: int = 0,
    anchors: tuple[torch.Tensor, list[int]] | None = None,
) -> dict:
    """Keyword arguments for :func:`paa_reassign` (without backend) on one synthetic image."""
    gen = torch.Generator().manual_seed(seed)
    priors, num_level = anchors if anchors is not None else retinanet_anchors(image_shape)
    gt_bboxes = random_gt_boxes(num_gts, image_shape, gen)
    gt_labels = torch.randint(0, NUM_CLASSES, (num_gts,), generator=gen)
    assign = MaxIoUAssigner(pos_iou_thr=0.1, neg_iou_thr=0.1, min_pos_iou=0.0).assign(
        priors, gt_bboxes, gt_labels
    )
    pos_inds = torch.nonzero(assign.gt_inds > 0).squeeze(1)
    pos_gt_inds = assign.gt_inds[pos_inds] - 1
    iou = assign.max_overlaps[pos_inds]
    # A trained model's loss falls with IoU; the noise makes each GT's distribution messy.
    noise = torch.rand(len(pos_inds), generator=gen)
    pos_losses = (2.0 * (1 - iou) + 0.6 * noise**2).float()
    labels = torch.full((len(priors),), NUM_CLASSES, dtype=torch.long)
    labels[pos_inds] = assign.labels[pos_inds]
    return {
        "pos_losses": pos_losses,
        "labels": labels,
        "label_weights": torch.ones(len(priors)),
        "bbox_weights": (labels < NUM_CLASSES).float()[:, None].repeat(1, 4),
        "pos_inds": pos_inds,
        "pos_gt_inds": pos_gt_inds,
        "num_level_anchors": num_level,
        "num_classes": NUM_CLASSES,
    }


def agreement(a: dict, b: dict, cov: str) -> tuple[float, int, int]:
    """Share of priors with the same label under the torch and sklearn backends."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning on a few GTs
        la, _, _, na = paa_reassign(**a, covariance_type=cov, backend="torch")
        lb, _, _, nb = paa_reassign(**b, covariance_type=cov, backend="sklearn")
    return float((la.cpu() == lb).float().mean()), na, nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller image, fewer repeats")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Interleaved rounds (one reference call, then several torch calls) so that both sides
    # see the same state of a shared machine; the torch side takes a few ms per call, the
    # reference ~150 ms, hence more torch calls per round.
    shape, num_gts, rounds = ((512, 768), 20, 3) if args.quick else ((800, 1216), 50, 7)
    torch_calls = 10
    inputs = make_inputs(num_gts, shape, seed=0)
    on_device = {
        k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
    }
    counts = torch.bincount(inputs["pos_gt_inds"], minlength=num_gts).float()
    print(
        f"{len(inputs['labels'])} anchors, {num_gts} GTs, {len(inputs['pos_inds'])} first-stage "
        f"positives ({counts.mean():.0f} per GT on average), device {describe_device(args.device)}\n"
    )
    rows = []
    for cov in ("diag", "full", "spherical", "tied"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_torch, t_sk = time_side_by_side(
                [
                    lambda cov=cov: paa_reassign(**on_device, covariance_type=cov),
                    lambda cov=cov: paa_reassign(**inputs, covariance_type=cov, backend="sklearn"),
                ],
                [torch_calls, 1],
                rounds=rounds,
                device=args.device,
            )
        agree, n_torch, n_sk = agreement(on_device, inputs, cov)
        rows.append(
            [cov, t_sk * 1e3, t_torch * 1e3, t_sk / t_torch, f"{100 * agree:.3f}", n_sk, n_torch]
        )
    print_table(
        f"PAA re-assignment per image ({num_gts} GTs, {len(inputs['labels'])} anchors)",
        ["covariance", "sklearn ms", "torch ms", "speed-up", "agree %", "pos sklearn", "pos torch"],
        rows,
    )


if __name__ == "__main__":
    main()
