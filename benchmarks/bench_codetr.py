"""Co-DETR training cost with 0, 1 and 2 auxiliary heads, and inference cost vs Deformable-DETR.

Run: ``.venv/bin/python -m benchmarks.bench_codetr [--quick] [--device cuda] [--amp]``

One table, every configuration measured in the same run on the same fixed batch of shapes
training images: median time of one training step (forward, loss, backward, AdamW step with
Co-DETR's clipping), images/s, the ratio to the query head alone (``aux=()``), and peak CUDA
memory (``-`` on CPU). A second table times ``predict`` of Co-DETR against Deformable-DETR
with the same settings: the auxiliary heads are training-only, so the ratio should be ~1.

``--quick``: tiny backbone, 160 px, batch 2 (CPU). Full: ResNet-50, 800 px, batch 2, 300
queries -- Co-DETR's setting; with ``--amp`` the step runs in bf16 autocast (CUDA only).

``--accuracy STEPS`` instead trains each configuration in ``--aux`` from the same seed for
STEPS optimizer steps on the shapes train split (Co-DETR's AdamW and clipping, constant
learning rate ``--lr``) and prints COCO AP on the val split: the comparison of notebook 05
at a chosen length, e.g. one process per configuration to use several cores::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_codetr --quick --accuracy 3000 --aux none
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_codetr --quick --accuracy 3000 --aux atss
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks._common import describe_device, peak_memory_mb, print_table, time_side_by_side
from labkit.data.collate import collate
from labkit.data.shapes import shapes_dataset
from labkit.data.transforms import test_transforms
from labkit.engine.train import build_optimizer
from labkit.recipes import co_deformable_detr, deformable_detr

AUX_SETTINGS = [(), ("atss",), ("faster_rcnn",), ("atss", "faster_rcnn")]


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeat: int
) -> dict[str, float]:
    """Median seconds of each ``fn`` over ``repeat`` round-robin rounds (see
    ``time_side_by_side``), by name."""
    seconds = time_side_by_side(list(fns.values()), [1] * len(fns), rounds=repeat, device=device)
    return dict(zip(fns, seconds, strict=True))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_step(model, batch: dict, device: torch.device, amp: bool):
    """One optimizer step of ``model`` on ``batch`` (Co-DETR's AdamW, grad clip 0.1)."""
    from labkit.recipes import schedule

    optimizer = build_optimizer(model, schedule("co_deformable_detr"))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = model.loss(batch)
        total = sum(v for k, v in losses.items() if "loss" in k)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    return step


def accuracy(args, device: torch.device, size: int, backbone: str, queries: int, amp: bool):
    """Train each ``args.aux`` configuration for ``args.accuracy`` steps; print COCO AP."""
    from labkit.data.collate import make_loader
    from labkit.lessons.training import train_and_evaluate
    from labkit.recipes import schedule

    transforms = test_transforms(scale=(size, size))
    train_set = shapes_dataset("train", transforms=transforms)
    val_set = shapes_dataset("val", transforms=transforms)
    rows = []
    for name in args.aux:
        aux = () if name == "none" else tuple(name.split("+"))
        torch.manual_seed(args.seed)
        model = co_deformable_detr(
            train_set.num_classes, aux=aux, backbone=backbone, num_queries=queries
        )
        config = schedule(
            "co_deformable_detr",
            max_iters=args.accuracy, lr=args.lr, milestones=(), progress=True,
            log_every=50, eval_every=10**6, amp=amp,
        )  # fmt: skip
        train_loader = make_loader(
            train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed
        )
        start = time.perf_counter()
        run = train_and_evaluate(
            model, train_loader, make_loader(val_set, batch_size=4), val_set, config, device
        )
        minutes = (time.perf_counter() - start) / 60
        m, last = run["metrics"], run["history"].train[-1]
        rows.append([name, args.seed, args.accuracy, minutes, m["AP"], m["AP50"], last["loss_cls"]])
    print_table(
        f"Co-DETR vs Deformable-DETR on shapes, {backbone}, {size}px, batch {args.batch_size}, "
        f"{queries} queries, lr {args.lr:g} -- {describe_device(device)}",
        ["aux heads", "seed", "steps", "train+eval min", "AP", "AP50", "last loss_cls"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 160 px (CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="image size (160 quick, 800 full)")
    parser.add_argument(
        "--accuracy",
        type=int,
        metavar="STEPS",
        help="train STEPS steps per configuration, report AP",
    )
    parser.add_argument(
        "--aux", nargs="+", default=["none", "atss", "atss+faster_rcnn"],
        help="configurations for --accuracy: none, atss, faster_rcnn, atss+faster_rcnn",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (--accuracy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import labkit

    device = labkit.device(args.device)
    amp = args.amp and device.type == "cuda"
    size = args.size or (160 if args.quick else 800)
    backbone = "tiny" if args.quick else "resnet50"
    queries = 100 if args.quick else 300
    if args.accuracy:
        accuracy(args, device, size, backbone, queries, amp)
        return
    ds = shapes_dataset("train", transforms=test_transforms(scale=(size, size)))
    batch = _to(collate([ds[i] for i in range(args.batch_size)]), device)
    n = args.batch_size
    repeat = 5 if args.quick else 10

    steps, models = {}, {}
    for aux in AUX_SETTINGS:
        torch.manual_seed(0)
        model = co_deformable_detr(ds.num_classes, aux=aux, backbone=backbone, num_queries=queries)
        model.to(device).train()
        name = "+".join(aux) or "none (query head only)"
        steps[name] = make_step(model, batch, device, amp)
        models[name] = model
    seconds = interleaved_medians(steps, device, repeat)
    base = next(iter(seconds.values()))
    rows = []
    for (name, sec), aux in zip(seconds.items(), AUX_SETTINGS, strict=True):
        memory = peak_memory_mb(steps[name], device)
        rows.append([name, len(aux), sec * 1000, n / sec, sec / base, memory])
    title = (
        f"Co-DETR training step, {backbone}, {size}px, batch {n}, {queries} queries, "
        f"{'bf16 AMP' if amp else 'fp32'} -- {describe_device(device)}"
    )
    header = ["aux heads", "#aux", "step ms", "images/s", "x query head only", "peak MiB"]
    print_table(title, header, rows)

    co = models["atss+faster_rcnn"]
    ffn = co.decoder.layers[0].ffn.layers[0].out_features
    ddetr = deformable_detr(
        ds.num_classes, backbone=backbone, num_queries=queries, mixed_selection=True,
        feedforward_channels=ffn, dropout=0.0,
    )  # fmt: skip
    ddetr.load_state_dict(co.state_dict(), strict=False)
    predictors = {"Deformable-DETR": ddetr, "Co-DETR (atss+faster_rcnn)": co}
    for model in predictors.values():
        model.to(device).eval()
    calls = {name: (lambda m=m: m.predict(batch)) for name, m in predictors.items()}
    seconds = interleaved_medians(calls, device, repeat)
    rows = []
    for name, model in predictors.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        ratio = seconds[name] / seconds["Deformable-DETR"]
        memory = peak_memory_mb(calls[name], device)
        rows.append([name, params, seconds[name] * 1000, n / seconds[name], ratio, memory])
    print_table(
        f"Inference (predict), {backbone}, {size}px, batch {n} -- {describe_device(device)}",
        ["model", "params (M, incl. training-only)", "ms", "images/s", "x D-DETR", "peak MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
