"""Co-DETR through the real training loop: overfit, exact resume, DDP (gloo, 2 processes), logs."""

from __future__ import annotations

import json
import os

import matplotlib.pyplot as plt
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from labkit.data import collate
from labkit.engine import distributed as dist_utils
from labkit.engine.train import build_optimizer, train
from labkit.recipes import RECIPES, co_deformable_detr, schedule
from labkit.viz import plot_loss_curves
from tests.test_codetr import NUM_CLASSES, make_batch


def items(n: int = 2) -> list[dict]:
    """``n`` synthetic images (128 x 96 and 96 x 128, alternating) as dataset items."""
    batch = make_batch()
    out = []
    for i in range(n):
        j = i % 2
        meta = {k: v for k, v in batch["img_metas"][j].items() if k != "batch_input_shape"}
        h, w = meta["img_shape"]
        out.append(
            {
                "img": batch["img"][j, :, :h, :w] + 0.01 * i,
                "gt_bboxes": batch["gt_bboxes"][j],
                "gt_labels": batch["gt_labels"][j],
                "gt_bboxes_ignore": torch.zeros(0, 4),
                "img_meta": {**meta, "image_id": i},
            }
        )
    return out


def model(aux=("atss", "faster_rcnn")):
    torch.manual_seed(0)
    return co_deformable_detr(NUM_CLASSES, aux=aux, backbone="tiny", num_queries=20)


def test_schedule_is_co_detrs_optimisation():
    cfg = schedule("co_deformable_detr")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.max_norm) == ("adamw", 2e-4, 1e-4, 0.1)
    assert (cfg.epochs, cfg.milestones, cfg.warmup_iters) == (12, (11,), 0)
    net = model()
    groups = build_optimizer(net, cfg).param_groups
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert set(lr_of) == {n for n, _ in net.named_parameters()}
    for name, lr in lr_of.items():
        slow = name.startswith("backbone.") or "sampling_offsets" in name
        assert lr == pytest.approx(2e-5 if slow else 2e-4), name
    assert lr_of["encoder.layers.0.self_attn.sampling_offsets.weight"] == pytest.approx(2e-5)
    assert lr_of["aux_queries.pos_trans.0.weight"] == pytest.approx(2e-4)


@pytest.mark.slow
def test_overfit_two_images_loss_drops():
    loader = DataLoader(items(2), batch_size=2, collate_fn=collate)
    net = model(("atss",))
    hist = train(
        net,
        loader,
        schedule("co_deformable_detr", max_iters=12, lr=1e-3, progress=False, log_every=1),
    )
    losses = [r["loss"] for r in hist.train]
    assert losses[-1] < 0.7 * losses[0], losses
    for key in ("loss_cls", "loss_cls_aux0", "loss_cls0"):  # query head, aux queries, ATSS
        assert hist.train[-1][key] < hist.train[0][key], key


@pytest.mark.slow
def test_resume_gives_bit_identical_next_losses(tmp_path):
    def loader():
        g = torch.Generator().manual_seed(0)
        return DataLoader(items(4), batch_size=1, shuffle=True, generator=g, collate_fn=collate)

    cfg = dict(max_iters=4, progress=False, log_every=1, checkpoint_every=1)
    full = train(model(), loader(), schedule("co_deformable_detr", **cfg), device="cpu")
    first = train(
        model(),
        loader(),
        schedule("co_deformable_detr", **{**cfg, "max_iters": 2}),
        work_dir=tmp_path / "w",
    )
    torch.manual_seed(123)  # resume must restore every RNG, whatever happened in between
    resumed = train(
        model(),
        loader(),
        schedule("co_deformable_detr", **cfg),
        work_dir=tmp_path / "w",
        resume=True,
        device="cpu",
    )
    assert [r["loss"] for r in first.train] == [r["loss"] for r in full.train[:2]]
    assert len(resumed.train) == 4
    for a, b in zip(resumed.train[2:], full.train[2:], strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {
            k: v for k, v in b.items() if k != "time"
        }
    # the JSON-lines log feeds the loss-curve plot
    lines = [json.loads(x) for x in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss_cls_aux1" in r]
    assert [r["iter"] for r in train_lines] == [1, 2, 3, 4]
    ax = plot_loss_curves(tmp_path / "w" / "log.jsonl")
    assert any(line.get_label() == "loss_cls_aux1" for line in ax.get_lines())
    plt.close("all")


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    dist_utils.init_distributed(backend="gloo")
    try:
        net = model()
        loader = DataLoader(items(4), batch_size=1, collate_fn=collate)
        # every parameter gets a gradient each step, so DDP runs without find_unused_parameters
        hist = train(
            net, loader, schedule("co_deformable_detr", max_iters=2, progress=False, log_every=1)
        )
        torch.save(
            {"params": net.state_dict(), "losses": [r["loss"] for r in hist.train]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist_utils.cleanup()


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path, free_port):
    mp.start_processes(_worker, args=(free_port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    assert ranks[0]["losses"] == ranks[1]["losses"]  # logged losses are all-reduced
    assert not torch.equal(ranks[0]["params"]["level_embed"], model().level_embed)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deformable_detr", "co_deformable_detr"])
def test_cli_trains_detrs_with_their_own_schedule(tmp_path, name):
    import argparse

    from labkit.engine.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), {name: RECIPES[name]})
    model_args = ["--model-arg", "backbone='tiny'", "--model-arg", "num_queries=10"]
    if name == "co_deformable_detr":
        model_args += ["--model-arg", "aux=('atss',)"]
    args = parser.parse_args(
        ["train", "--model", name, *model_args, "--max-iters", "1"]
        + ["--image-size", "96", "--no-eval", "--no-progress", "--work-dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    ckpt = torch.load(tmp_path / "latest.pth", weights_only=True)
    cfg = ckpt["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["max_norm"], cfg["weight_decay"]) == (
        "adamw",
        2e-4,
        0.1,
        1e-4,
    )
    assert cfg["warmup_iters"] == 0
    assert cfg["lr_mult"] == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    assert (cfg["epochs"], tuple(cfg["milestones"])) == (
        (50, (40,)) if name == "deformable_detr" else (12, (11,))
    )
    if name == "co_deformable_detr":
        assert ckpt["recipe"]["kwargs"]["aux"] == ("atss",)


def test_gradient_accumulation_and_amp_request_through_co_detr():
    loader = DataLoader(items(2), batch_size=1, collate_fn=collate)
    net = model(("atss",))
    before = net.aux_heads[0].head.atss_cls.weight.detach().clone()
    # Co-DETR's losses are not cast to float32, so bf16 autocast on a CPU is refused by name
    with pytest.raises(ValueError, match="amp: bf16 autocast on a CPU"):
        train(net, loader, schedule("co_deformable_detr", max_iters=1, amp=True, progress=False))
    hist = train(
        net, loader, schedule("co_deformable_detr", max_iters=1, accum_steps=2, progress=False)
    )
    assert len(hist.train) == 1 and "loss_cls_aux0" in hist.train[0]
    assert hist.train[0]["grad_norm"] > 0
    assert not torch.equal(before, net.aux_heads[0].head.atss_cls.weight)
