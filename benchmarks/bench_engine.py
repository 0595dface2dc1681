"""Backbone + FPN step cost, and what the training loop's bookkeeping costs over a bare loop.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_engine [--quick] [--device cpu|cuda]

Table 1: forward + backward of backbone + FPN (P3-P7, RetinaNet layout) on a batch of 2
images, per backbone, with its parameter count and the ratio to the tiny CPU backbone.
Table 2: the same small detector-shaped model trained for N steps by ``labkit.engine.train``
(schedule, loss parsing, one host sync per step, history, tqdm off) and by a bare
``loss.backward(); opt.step()`` loop; on CUDA also with bf16 autocast.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks._common import describe_device, peak_memory_mb, print_table, time_call
from labkit import device as pick_device
from labkit.engine.train import TrainConfig, train
from labkit.nn.backbones import build_backbone
from labkit.nn.fpn import FPN


def backbone_table(dev: torch.device, size: int, names: list[str], repeat: int) -> str:
    rows = []
    base = None
    for name in names:
        body = build_backbone(name, out_indices=(1, 2, 3), norm_eval=False).to(dev)
        neck = FPN(body.out_channels, 64 if name == "tiny" else 256, 5, add_extra_convs="on_input")
        neck.to(dev)
        x = torch.randn(2, 3, size, size, device=dev)

        def step(body=body, neck=neck, x=x):
            sum(o.mean() for o in neck(body(x))).backward()

        seconds = time_call(step, device=dev, warmup=1, repeat=repeat)
        base = base or seconds
        params = sum(p.numel() for m in (body, neck) for p in m.parameters()) / 1e6
        rows.append(
            [name, params, seconds * 1e3, 2 / seconds, seconds / base, peak_memory_mb(step, dev)]
        )
    return print_table(
        f"Backbone + FPN forward+backward, batch 2 at {size}x{size} ({describe_device(dev)})",
        ["backbone", "params (M)", "ms / step", "images / s", "time vs tiny", "peak MiB"],
        rows,
    )


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("tiny", out_indices=(3,))
        self.head = nn.Linear(256, 4)

    def loss(self, batch):
        feat = self.backbone(batch["img"])[0].mean((2, 3))
        return {"loss_bbox": (self.head(feat) - batch["target"]).abs().mean()}


def _batches(n: int, size: int, dev: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "img": torch.randn(2, 3, size, size, generator=g).to(dev),
            "target": torch.rand(2, 4, generator=g).to(dev),
        }
        for _ in range(n)
    ]


def loop_table(dev: torch.device, size: int, steps: int) -> str:
    batches = _batches(steps, size, dev)
    rows = []

    def bare() -> float:
        torch.manual_seed(0)
        model = _Toy().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        start = time.perf_counter()
        for batch in batches:
            model.loss(batch)["loss_bbox"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def loop(amp: bool) -> float:
        torch.manual_seed(0)
        model = _Toy()
        cfg = TrainConfig(
            epochs=1, lr=1e-3, warmup_iters=10, milestones=(), progress=False, log_every=10, amp=amp
        )
        start = time.perf_counter()
        train(model, batches, cfg, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    bare()  # warm-up (allocator, kernels)
    # Alternate the two and keep each one's best of 3: a shared machine's noise is one-sided.
    t_bare, t_loop = float("inf"), float("inf")
    for _ in range(3):
        t_bare, t_loop = min(t_bare, bare()), min(t_loop, loop(False))
    rows.append(["bare loop", t_bare / steps * 1e3, 1.0])
    rows.append(["labkit train()", t_loop / steps * 1e3, t_loop / t_bare])
    if dev.type == "cuda":
        t_amp = min(loop(True) for _ in range(3))
        rows.append(["labkit train(), bf16 autocast", t_amp / steps * 1e3, t_amp / t_bare])
    return print_table(
        f"Training loop overhead, {steps} steps, batch 2 at {size}x{size} ({describe_device(dev)})",
        ["loop", "ms / step", "time vs bare"],
        rows,
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and resnet18 at 256 px only")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    dev = pick_device(args.device)
    if args.quick:
        size, names, repeat, steps = 256, ["tiny", "resnet18"], 3, 10
    else:
        size, names, repeat, steps = 512, ["tiny", "resnet18", "resnet34", "resnet50"], 5, 50
    return backbone_table(dev, size, names, repeat) + "\n\n" + loop_table(dev, size, steps)


if __name__ == "__main__":
    main()
