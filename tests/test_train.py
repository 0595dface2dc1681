"""The training loop on a tiny box regressor: learning, lr schedule, lr_mult, accumulation,
clipping, NaN and empty batches, logs, evaluation hook, config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from labkit.engine import train as train_module
from labkit.engine.train import (
    TrainConfig,
    build_optimizer,
    build_param_groups,
    lr_factor,
    parse_losses,
    train,
)
from labkit.recipes import Recipe

torch.set_num_threads(1)


class BoxDataset(torch.utils.data.Dataset):
    """32x32 images with one bright square; the target is its box. ``empty`` images have none."""

    def __init__(self, n: int, seed: int = 0, empty: bool = False, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            x1, y1 = torch.randint(0, 20, (2,), generator=g).tolist()
            size = int(torch.randint(6, 12, (1,), generator=g))
            img = torch.zeros(3, 32, 32, dtype=dtype)
            img[:, y1 : y1 + size, x1 : x1 + size] = 1.0
            box = torch.tensor([[x1, y1, x1 + size, y1 + size]], dtype=dtype)
            self.items.append((img, box[:0] if empty else box))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, box = self.items[i]
        return {"img": img, "gt_bboxes": box, "gt_labels": torch.zeros(len(box), dtype=torch.long)}


def collate(items):
    return {
        "img": torch.stack([it["img"] for it in items]),
        "gt_bboxes": [it["gt_bboxes"] for it in items],
        "gt_labels": [it["gt_labels"] for it in items],
    }


class TinyDetector(nn.Module):
    """Detector-shaped toy: ``backbone`` conv, ``head`` linear; ``loss(batch)`` is L1 on the box."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 16, 4)
        self.to(dtype)

    def loss(self, batch):
        feat = nn.functional.adaptive_avg_pool2d(self.backbone(batch["img"]), 4).flatten(1)
        pred = self.head(feat)
        has_box = torch.tensor([len(b) > 0 for b in batch["gt_bboxes"]], device=pred.device)
        target = torch.stack(
            [b[0] / 32 if len(b) else pred.new_zeros(4) for b in batch["gt_bboxes"]]
        )
        err = (pred - target).abs().sum(1) * has_box
        return {
            "loss_bbox": err.sum() / has_box.sum().clamp(min=1) / 4,
            "loss_reg": [0.01 * pred.square().mean(), 0.0 * pred.sum()],
            "num_pos": has_box.sum().float(),  # logged, not summed: no "loss" in the key
        }


def loader(n=8, batch_size=4, **kw):
    return DataLoader(BoxDataset(n, **kw), batch_size=batch_size, collate_fn=collate)


def quiet(**kw):
    base = {"progress": False, "warmup_iters": 0, "milestones": (), "log_every": 1}
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_loss_decreases():
    torch.manual_seed(0)
    model = TinyDetector()
    hist = train(model, loader(16, 4), quiet(epochs=15, optimizer="adamw", lr=0.01), device="cpu")
    losses = hist.series("loss_bbox")[1]
    assert len(losses) == 60
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    rec = hist.train[-1]
    assert rec["loss"] == pytest.approx(rec["loss_bbox"] + rec["loss_reg"], rel=1e-6)
    assert rec["num_pos"] == 4.0 and rec["iter"] == 60 and rec["epoch"] == 15


def test_warmup_and_step_schedule_match_hand_values():
    # 3 optimizer steps per epoch; warm-up over 4 steps from 0.1; milestone at epoch 2.
    cfg = quiet(epochs=3, lr=0.1, warmup_iters=4, warmup_ratio=0.1, milestones=(2,))
    hist = train(TinyDetector(), loader(6, 2), cfg, device="cpu")
    expected = [0.1 * f for f in (0.1, 0.4, 0.7, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1)]
    assert [r["lr"] for r in hist.train] == pytest.approx(expected)
    # Iteration milestones; mmengine LinearLR(start_factor=1e-3, end=500) closed form.
    cfg_iter = quiet(
        lr=1.0, warmup_iters=500, warmup_ratio=1e-3, milestones=(600, 900), by_epoch=False
    )
    assert lr_factor(0, cfg_iter, 10) == pytest.approx(1e-3)
    assert lr_factor(250, cfg_iter, 10) == pytest.approx(1e-3 + 0.999 * 250 / 499)
    assert lr_factor(499, cfg_iter, 10) == 1.0
    assert lr_factor(600, cfg_iter, 10) == pytest.approx(0.1)
    assert lr_factor(950, cfg_iter, 10) == pytest.approx(0.01)
    # by_epoch: milestone 8 with 100 steps per epoch starts at step 800.
    cfg_ep = quiet(lr=1.0, milestones=(8, 11))
    assert lr_factor(799, cfg_ep, 100) == 1.0 and lr_factor(800, cfg_ep, 100) == pytest.approx(0.1)


class NamedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.encoder = nn.ModuleDict(
            {"sampling_offsets": nn.Linear(2, 2), "value_proj": nn.Linear(2, 2)}
        )
        self.reference_points = nn.Linear(2, 2)


def test_lr_mult_groups_follow_longest_matching_key():
    model = NamedModel()
    model.backbone.bias.requires_grad_(False)
    cfg = quiet(
        lr=0.2, lr_mult={"backbone": 0.1, "sampling_offsets": 0.5, "offsets": 0.0, "points": 0.3}
    )
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["param_names"] == ["backbone.weight"]  # frozen bias left out
    assert groups["sampling_offsets"]["param_names"] == [
        "encoder.sampling_offsets.weight",
        "encoder.sampling_offsets.bias",
    ]
    assert "offsets" not in groups  # the longer key won every match, the empty group is dropped
    assert groups["points"]["param_names"] == ["reference_points.weight", "reference_points.bias"]
    assert groups["default"]["param_names"] == [
        "encoder.value_proj.weight",
        "encoder.value_proj.bias",
    ]
    lrs = {name: g["lr"] for name, g in groups.items()}
    assert lrs == pytest.approx(
        {"default": 0.2, "backbone": 0.02, "sampling_offsets": 0.1, "points": 0.06}
    )
    with pytest.raises(ValueError, match="trainable"):
        build_param_groups(nn.Linear(2, 2).requires_grad_(False), {})


def test_lr_mult_zero_freezes_a_group_in_training():
    torch.manual_seed(0)
    model = TinyDetector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = quiet(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, lr_mult={"backbone": 0.0})
    train(model, loader(8, 4), cfg, device="cpu")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone"))
    assert not torch.equal(before["head.weight"], after["head.weight"])


def _params_after(batch_size, accum, n=8, **kw):
    torch.manual_seed(0)
    model = TinyDetector(torch.float64)
    cfg = quiet(epochs=1, lr=0.1, accum_steps=accum, **kw)
    hist = train(model, loader(n, batch_size, dtype=torch.float64), cfg, device="cpu")
    return model, hist


def test_grad_accumulation_equals_one_big_batch():
    small, hist_small = _params_after(batch_size=4, accum=2)
    big, hist_big = _params_after(batch_size=8, accum=1)
    assert len(hist_small.train) == len(hist_big.train) == 1
    for (name, a), b in zip(small.state_dict().items(), big.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    assert hist_small.train[0]["loss"] == pytest.approx(hist_big.train[0]["loss"], abs=1e-12)
    # 3 batches with accum_steps=2: two optimizer steps, the second over one batch.
    _, hist_odd = _params_after(batch_size=4, accum=2, n=12)
    assert [r["iter"] for r in hist_odd.train] == [1, 2]


def test_grad_clipping_limits_the_update():
    torch.manual_seed(0)
    model = TinyDetector(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    # Recompute the unclipped gradient norm of the first batch by hand.
    batch = next(iter(loader(8, 8, dtype=torch.float64)))
    total, _ = parse_losses(model.loss(batch))
    grads = torch.autograd.grad(total, list(model.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert norm > 0.05
    cfg = quiet(max_iters=1, lr=1.0, momentum=0.0, weight_decay=0.0, max_norm=0.05)
    hist = train(model, loader(8, 8, dtype=torch.float64), cfg, device="cpu")
    assert hist.train[0]["grad_norm"] == pytest.approx(norm, rel=1e-9)
    step = torch.linalg.vector_norm(
        torch.stack(
            [(p.detach() - b).norm() for p, b in zip(model.parameters(), before, strict=True)]
        )
    )
    assert step.item() == pytest.approx(0.05, rel=1e-4)


class NanAtSecondCall(TinyDetector):
    calls = 0

    def loss(self, batch):
        losses = super().loss(batch)
        self.calls += 1
        if self.calls == 2:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses


def test_nan_loss_stops_with_the_key_and_keeps_parameters():
    torch.manual_seed(0)
    model = NanAtSecondCall()
    with pytest.raises(FloatingPointError, match=r"loss_bbox became nan at iteration 2"):
        train(model, loader(8, 2), quiet(epochs=1, lr=0.01), device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ConstantLossOnEmpty(TinyDetector):
    def loss(self, batch):
        if all(len(b) == 0 for b in batch["gt_bboxes"]):
            return {"loss_cls": torch.zeros(()), "loss_bbox": torch.zeros(())}  # no graph at all
        return super().loss(batch)


def test_batches_without_boxes_train_fine():
    torch.manual_seed(0)
    empty = DataLoader(BoxDataset(4, empty=True), batch_size=2, collate_fn=collate)
    hist = train(ConstantLossOnEmpty(), empty, quiet(epochs=2, lr=0.01), device="cpu")
    assert [r["loss"] for r in hist.train] == [0.0] * 4
    hist = train(TinyDetector(), empty, quiet(epochs=1, lr=0.01), device="cpu")
    assert all(math.isfinite(r["loss"]) for r in hist.train)


def test_jsonl_log_eval_hook_and_checkpoint_files(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(model, loader, dataset, device, progress=True):
        calls.append((model.training, dataset))
        return {"AP": 0.25 * len(calls), "AP50": 0.5, "per_class": {"square": 0.25}}

    monkeypatch.setattr("labkit.engine.evaluate.evaluate", fake_evaluate)
    model = TinyDetector()
    model.recipe = {"name": "tiny", "kwargs": {}}
    cfg = quiet(epochs=2, lr=0.01, log_every=2)
    hist = train(
        model,
        loader(6, 2),
        cfg,
        val_loader=loader(2, 2),
        val_dataset="VAL",
        work_dir=tmp_path,
        device="cpu",
    )
    assert calls == [(False, "VAL"), (False, "VAL")]
    assert [v["AP"] for v in hist.val] == [0.25, 0.5] and hist.val[1]["epoch"] == 2
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    modes = [line["mode"] for line in lines]
    assert modes == ["start", "train", "val", "train", "train", "val"]
    train_lines = [line for line in lines if line["mode"] == "train"]
    assert [line["iter"] for line in train_lines] == [2, 4, 6]
    assert {"lr", "loss", "loss_bbox", "loss_reg", "time", "data_time", "epoch"} <= set(
        train_lines[0]
    )
    # Each log line averages its window of steps.
    assert train_lines[0]["loss"] == pytest.approx(
        (hist.train[0]["loss"] + hist.train[1]["loss"]) / 2
    )
    assert lines[0]["config"]["lr"] == 0.01 and lines[0]["iters_per_epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_1.pth",
        "epoch_2.pth",
        "latest.pth",
        "log.jsonl",
    ]
    latest = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert latest["iter"] == 6 and latest["epoch"] == 2 and latest["recipe"]["name"] == "tiny"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("max_iters", -3),
        ("optimizer", "adam"),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("momentum", 1.5),
        ("weight_decay", -1.0),
        ("warmup_iters", -1),
        ("warmup_ratio", 0.0),
        ("milestones", (11, 8)),
        ("gamma", 0.0),
        ("max_norm", 0.0),
        ("accum_steps", 0),
        ("amp_dtype", "float8"),
        ("lr_mult", {"backbone": -1.0}),
        ("log_every", 1.5),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_bad_train_arguments():
    with pytest.raises(TypeError, match="epoch"):
        train(TinyDetector(), loader(), epoch=3)  # typo of "epochs"
    with pytest.raises(TypeError, match="loss"):
        train(nn.Linear(2, 2), loader(), quiet())
    with pytest.raises(ValueError, match="train_loader"):
        train(TinyDetector(), DataLoader(BoxDataset(0), batch_size=2, collate_fn=collate), quiet())
    with pytest.raises(TypeError, match="loss_bbox"):
        parse_losses({"loss_bbox": 1.0})
    with pytest.raises(ValueError, match="no key contains 'loss'"):
        parse_losses({"acc": torch.ones(())})


class DtypeRecorder(TinyDetector):
    """``TinyDetector`` that records the dtype its convolution computed in (its L1 loss is
    dtype-safe, so it declares ``supports_cpu_amp`` like the dense detectors)."""

    supports_cpu_amp = True

    def __init__(self):
        super().__init__()
        self.conv_dtypes = []
        self.backbone.register_forward_hook(lambda m, i, o: self.conv_dtypes.append(o.dtype))


def test_amp_on_cpu_autocasts_to_bfloat16():
    model = DtypeRecorder()
    hist = train(model, loader(4, 2), quiet(max_iters=2, amp=True), device="cpu")
    assert model.conv_dtypes == [torch.bfloat16, torch.bfloat16]
    assert len(hist.train) == 2 and math.isfinite(hist.train[-1]["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32


def test_amp_on_cpu_refuses_a_model_that_does_not_declare_it():
    with pytest.raises(ValueError, match="amp: bf16 autocast on a CPU"):
        train(TinyDetector(), loader(4, 2), quiet(max_iters=1, amp=True), device="cpu")


def test_float16_amp_on_cpu_warns_and_trains_in_float32():
    model = DtypeRecorder()
    with pytest.warns(
        UserWarning,
        match=r"float16 acts on CUDA \(and bfloat16 on a CPU\); training in float32 on cpu",
    ):
        hist = train(model, loader(4, 2), quiet(max_iters=1, amp=True, amp_dtype="float16"))
    assert model.conv_dtypes == [torch.float32]
    assert len(hist.train) == 1
    assert train_module.History().series("loss") == ([], [])


def test_stopping_inside_an_epoch_still_evaluates_once(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "labkit.engine.evaluate.evaluate", lambda *a, **k: calls.append(1) or {"AP": 0.1}
    )
    hist = train(
        TinyDetector(),
        loader(8, 2),
        quiet(max_iters=3),
        val_loader=loader(2, 2),
        val_dataset="V",
        device="cpu",
    )
    assert len(calls) == 1 and hist.val[0]["iter"] == 3 and hist.val[0]["epoch"] == 1


def _cli(argv, recipes, monkeypatch):
    import argparse

    from labkit.engine import cli

    class Named(BoxDataset):
        num_classes, classes = 1, ("square",)

    monkeypatch.setattr(
        cli, "build_dataset", lambda spec, split, size, *crop: Named(4 if split == "train" else 2)
    )
    monkeypatch.setattr(
        "labkit.data.make_loader",
        lambda ds, batch_size=2, shuffle=False, num_workers=0, seed=0: DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        ),
    )
    monkeypatch.setattr(
        "labkit.engine.evaluate.evaluate",
        lambda model, *a, **k: {"AP": 0.5, "w": model.head.bias.sum().item()},
    )
    monkeypatch.setattr("labkit.engine.evaluate.format_table", lambda m: f"AP {m['AP']}")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"), recipes=recipes)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_then_eval_rebuilds_the_model_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    built = []

    def tiny(num_classes, width=8):
        built.append((num_classes, width))
        return TinyDetector()

    schedule = TrainConfig(optimizer="adamw", lr=1e-4, max_norm=1.0)
    recipes = {"tiny": Recipe("tiny", tiny, schedule, "a test recipe")}
    work = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--model-arg", "width=16", "--epochs", "2", "--lr", "0.01"]
    argv += [
        "--warmup-iters",
        "0",
        "--work-dir",
        str(work),
        "--no-progress",
        "--image-size",
        "64,96",
    ]
    assert _cli(argv, recipes, monkeypatch) == 0
    assert built == [(1, 16)]
    ckpt = torch.load(work / "latest.pth", weights_only=True)
    assert ckpt["recipe"] == {
        "name": "tiny",
        "kwargs": {"num_classes": 1, "width": 16},
        "data": "shapes",
        "image_size": [64, 96],
        "classes": ["square"],
    }
    assert ckpt["epoch"] == 2 and tuple(ckpt["config"]["milestones"]) == (8, 11)
    # The recipe's own schedule is the base, the --lr flag overrides it.
    assert ckpt["config"]["optimizer"] == "adamw" and ckpt["config"]["max_norm"] == 1.0
    assert ckpt["config"]["lr"] == 0.01
    out = capsys.readouterr().out
    assert "trained 4 iterations" in out and "AP 0.5" in out
    metrics_file = tmp_path / "m.json"
    assert (
        _cli(
            [
                "eval",
                "--checkpoint",
                str(work / "latest.pth"),
                "--output",
                str(metrics_file),
                "--no-progress",
            ],
            recipes,
            monkeypatch,
        )
        == 0
    )
    assert built[-1] == (1, 16)
    metrics = json.loads(metrics_file.read_text())
    assert metrics["w"] == pytest.approx(
        ckpt["model"]["head.bias"].sum().item()
    )  # trained weights loaded
    with pytest.raises(SystemExit, match="unknown 'nope'"):
        _cli(["train", "--model", "nope", "--work-dir", str(work)], recipes, monkeypatch)


def test_cli_argument_parsers():
    import argparse

    from labkit.engine.cli import parse_image_size, parse_model_arg

    assert parse_image_size("512") == (512, 512) and parse_image_size("800,1333") == (800, 1333)
    with pytest.raises(argparse.ArgumentTypeError, match="image-size"):
        parse_image_size("big")
    assert parse_model_arg("backbone=resnet50") == ("backbone", "resnet50")
    assert parse_model_arg("aux=('atss',)") == ("aux", ("atss",))
    with pytest.raises(argparse.ArgumentTypeError, match="model-arg"):
        parse_model_arg("oops")


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        (
            ("circle", "square", "triangle"),
            r"^labkit eval: --data: 'other\.json' has the same classes in another order than "
            r"the checkpoint: \['circle', 'square', 'triangle'\] vs recipe\.classes "
            r"\['square', 'circle', 'triangle'\]; label i must be the same class in both",
        ),
        (
            ("square", "circle", "star"),
            r"^labkit eval: --data: 'other\.json' has other classes than the checkpoint: "
            r"\['square', 'circle', 'star'\] vs recipe\.classes",
        ),
        (
            ("a", "b", "c", "d", "e"),
            r"^labkit eval: --data: 'other\.json' has 5 classes \['a', 'b', 'c', 'd', 'e'\] but "
            r"the checkpoint's model predicts 3 \(recipe\.classes \['square', 'circle', "
            r"'triangle'\]\); evaluate on data with the classes it was trained on$",
        ),
    ],
)
def test_cli_eval_refuses_other_classes_before_inference(tmp_path, monkeypatch, classes, match):
    import argparse

    from labkit.engine import cli
    from labkit.engine.checkpoint import save_checkpoint

    built = []
    recipes = {"tiny": Recipe("tiny", lambda **kw: built.append(kw) or TinyDetector(), quiet(), "")}
    trained = ["square", "circle", "triangle"]
    path = save_checkpoint(
        tmp_path / "c.pth",
        {
            "model": TinyDetector().state_dict(),
            "recipe": {"name": "tiny", "kwargs": {"num_classes": 3}, "classes": trained},
        },
    )

    class Data(BoxDataset):
        pass

    Data.classes, Data.num_classes = classes, len(classes)
    monkeypatch.setattr(cli, "build_dataset", lambda spec, split, size, *crop: Data(2))

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran")

    monkeypatch.setattr("labkit.engine.evaluate.evaluate", no_inference)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"), recipes=recipes)
    args = parser.parse_args(["eval", "--checkpoint", str(path), "--data", "other.json"])
    with pytest.raises(SystemExit, match=match):
        args.func(args)
    assert built == []  # refused before even building the model


def test_cosine_schedule_after_warmup():
    config = TrainConfig(lr_schedule="cosine", max_iters=100, warmup_iters=10, warmup_ratio=0.1)
    # warm-up x cosine: step 0 = 0.1 x 1, step 50 = 1 x 0.5, step 100 = 0
    assert train_module.lr_factor(0, config, 10) == pytest.approx(0.1)
    assert train_module.lr_factor(50, config, 10) == pytest.approx(0.5)
    assert train_module.lr_factor(100, config, 10) == pytest.approx(0.0, abs=1e-12)
    by_epochs = TrainConfig(lr_schedule="cosine", epochs=4, warmup_iters=0)
    assert train_module.lr_factor(10, by_epochs, 10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
