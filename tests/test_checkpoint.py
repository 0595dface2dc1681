"""Checkpoints: atomic saves, clear load errors, and bit-identical resume of the train loop."""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import labkit
from labkit.engine.checkpoint import (
    CHECKSUM_KEY,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from labkit.engine.rng import capture_rng, restore_rng
from labkit.engine.train import TrainConfig, train

torch.set_num_threads(1)


class Jitter:
    """A transform with its own numpy Generator, like labkit.data's RandomFlip."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __call__(self, img):
        return img + float(self.rng.normal(0, 0.05))


class NoisyBoxes(torch.utils.data.Dataset):
    """Random augmentation from all three global RNGs and a transform's own Generator, so
    resume must restore each of them."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.imgs = torch.rand(n, 3, 16, 16, generator=g)
        self.boxes = torch.rand(n, 4, generator=g)
        self.transforms = [Jitter()]

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        img = self.imgs[i] + 0.1 * torch.randn(3, 16, 16)
        if random.random() < 0.5:
            img = img.flip(-1)
        scale = float(np.random.uniform(0.9, 1.1))
        return self.transforms[0](img * scale), self.boxes[i]


def collate(items):
    return {"img": torch.stack([i for i, _ in items]), "target": torch.stack([b for _, b in items])}


class DropoutRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4 * 7 * 7, 4)

    def loss(self, batch):
        pred = self.head(self.drop(self.backbone(batch["img"])))
        return {
            "loss_bbox": (pred - batch["target"]).abs().mean(),
            "loss_l2": 0.1 * pred.square().mean(),
        }


def make_loader(n=12, batch_size=2, seed=0):
    return DataLoader(
        NoisyBoxes(n),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


def fresh_model(seed):
    torch.manual_seed(seed)  # different seeds: the resumed model must get everything from the file
    return DropoutRegressor()


def config(**kw):
    base = dict(progress=False, lr=0.05, warmup_iters=3, milestones=(2,), log_every=1, max_norm=1.0)
    return TrainConfig(**{**base, **kw})


def losses(history):
    return [(r["iter"], r["epoch"], r["lr"], r["loss"], r["loss_bbox"]) for r in history.train]


def run_straight(cfg, seed=0):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model = fresh_model(seed)
    hist = train(model, make_loader(), cfg, device="cpu")
    return model, hist


@pytest.mark.parametrize(
    ("full", "first", "optimizer"),
    [
        ({"epochs": 2}, {"epochs": 1}, "sgd"),  # resume at an epoch boundary
        ({"max_iters": 10}, {"max_iters": 4}, "adamw"),  # resume in the middle of epoch 1
    ],
)
def test_resume_is_bit_identical(tmp_path, full, first, optimizer):
    model_a, hist_a = run_straight(config(optimizer=optimizer, **full))
    # Interrupted run: same seeds, stop early, then a new process-like start.
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model_b = fresh_model(0)
    train(
        model_b,
        make_loader(),
        config(optimizer=optimizer, **first),
        work_dir=tmp_path,
        device="cpu",
    )
    torch.manual_seed(999)  # the resumed process starts from unrelated RNG states
    random.seed(999)
    np.random.seed(999)
    model_c = fresh_model(7)
    hist_c = train(
        model_c,
        make_loader(seed=5),
        config(optimizer=optimizer, **full),
        work_dir=tmp_path,
        resume=True,
        device="cpu",
    )
    assert losses(hist_c) == losses(hist_a)  # exact float equality, step by step
    for (name, a), c in zip(
        model_a.state_dict().items(), model_c.state_dict().values(), strict=True
    ):
        assert torch.equal(a, c), name


def test_resume_when_nothing_is_saved_starts_fresh(tmp_path):
    _, hist = run_straight(config(max_iters=2))
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    hist_b = train(
        fresh_model(0),
        make_loader(),
        config(max_iters=2),
        work_dir=tmp_path,
        resume=True,
        device="cpu",
    )
    assert losses(hist_b) == losses(hist)
    # A finished run resumed with the same schedule does nothing more.
    hist_c = train(
        fresh_model(3),
        make_loader(),
        config(max_iters=2),
        work_dir=tmp_path,
        resume=True,
        device="cpu",
    )
    assert losses(hist_c) == losses(hist)


def test_checkpoint_contents(tmp_path):
    model = fresh_model(0)
    train(
        model,
        make_loader(),
        config(epochs=1),
        work_dir=tmp_path,
        device="cpu",
        recipe={"name": "regressor", "kwargs": {"num_classes": 3}},
    )
    ckpt = load_checkpoint(tmp_path / "epoch_1.pth")
    assert ckpt["labkit_version"] == labkit.__version__
    assert ckpt["recipe"] == {"name": "regressor", "kwargs": {"num_classes": 3}}
    assert ckpt["epoch"] == 1 and ckpt["iter"] == 6 and ckpt["iter_in_epoch"] == 0
    assert ckpt["config"]["lr"] == 0.05 and len(ckpt["history"]["train"]) == 6
    assert set(ckpt["model"]) == set(model.state_dict())


def test_save_is_atomic_when_writing_crashes(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iter": 1})

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iter": 2})
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["iter"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temp file left behind


def test_load_errors_name_the_problem(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth", model)
    save_checkpoint(tmp_path / "junk.pth", {"weights": [1, 2]})
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "junk.pth", model)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth"):
        load_checkpoint(tmp_path / "text.pth")

    other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    state = other.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    save_checkpoint(tmp_path / "other.pth", {"model": state})
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "other.pth", model)
    message = str(err.value)
    assert "missing keys: 0.bias" in message and "unexpected keys: extra.weight" in message
    assert "1.weight (checkpoint (2, 3) vs model (1, 3))" in message
    before = model[1].weight.clone()
    with pytest.warns(UserWarning, match="partly loaded"):
        load_checkpoint(tmp_path / "other.pth", model, strict=False)
    assert torch.equal(model[0].weight, other[0].weight)  # matching keys loaded
    assert torch.equal(model[1].weight, before)  # mis-shaped key skipped

    # A bare state dict from a DDP-wrapped model (module. prefix) loads too.
    save_checkpoint(tmp_path / "ddp.pth", {f"module.{k}": v for k, v in other.state_dict().items()})
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    load_checkpoint(tmp_path / "ddp.pth", target)
    assert torch.equal(target[1].weight, other[1].weight)


def test_rng_capture_round_trip():
    loader = make_loader()
    state = capture_rng(loader)
    a = (
        random.random(),
        np.random.rand(),
        torch.rand(2),
        torch.rand(1, generator=loader.generator),
    )
    restore_rng(state, loader)
    b = (
        random.random(),
        np.random.rand(),
        torch.rand(2),
        torch.rand(1, generator=loader.generator),
    )
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def _flip(path, start, count):
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_are_detected(tmp_path):
    weight = torch.arange(1000, dtype=torch.float32)
    path = save_checkpoint(tmp_path / "c.pth", {"model": {"w": weight}, "iter": 3})
    assert load_checkpoint(path)["iter"] == 3  # an intact file verifies
    assert CHECKSUM_KEY not in load_checkpoint(path)
    offset = path.read_bytes().find(weight.numpy().tobytes())
    assert offset > 0  # torch stores tensor bytes uncompressed
    _flip(path, offset + 400, 200)
    # torch.load alone reads the damaged weights without complaint ...
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weight)
    # ... load_checkpoint refuses them, naming the file.
    with pytest.raises(ValueError, match=r"^path: checkpoint is corrupt: '.*c\.pth' was damaged"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint is corrupt"):
        load_checkpoint(path, nn.Linear(1, 1), strict=False)


def test_resume_refuses_a_corrupt_latest(tmp_path):
    train(fresh_model(0), make_loader(), config(epochs=1), work_dir=tmp_path, device="cpu")
    latest = tmp_path / "latest.pth"
    weight = load_checkpoint(latest)["model"]["head.weight"]
    _flip(latest, latest.read_bytes().find(weight.numpy().tobytes()), 200)
    with pytest.raises(ValueError, match=r"^path: checkpoint is corrupt: '.*latest\.pth'"):
        train(
            fresh_model(1), make_loader(), config(epochs=2), work_dir=tmp_path,
            resume=True, device="cpu",
        )  # fmt: skip
    assert load_checkpoint(tmp_path / "epoch_1.pth")["iter"] == 6  # the epoch file is intact


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    old = tmp_path / "old.pth"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, old)  # as saved before checksums
    ckpt = load_checkpoint(old)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def test_latest_is_a_copy_not_a_hard_link(tmp_path):
    train(fresh_model(0), make_loader(), config(epochs=1), work_dir=tmp_path, device="cpu")
    epoch, latest = tmp_path / "epoch_1.pth", tmp_path / "latest.pth"
    assert epoch.read_bytes() == latest.read_bytes()
    assert epoch.stat().st_nlink == 1 and latest.stat().st_nlink == 1
    assert not latest.samefile(epoch)
    _flip(latest, 1000, 200)  # damage latest in place: epoch_1.pth stays good
    assert load_checkpoint(epoch)["iter"] == 6


def test_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "latest.pth", {"model": {"w": torch.ones(2)}, "iter": 1})

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iter": 2})
    assert str(err.value) == (
        f"path: could not save the checkpoint {str(path)!r} ([Errno 28] No space left on "
        "device); the previous checkpoint at that path is intact"
    )
    assert err.value.errno == errno.ENOSPC

    def torch_writer_failure(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed")

    monkeypatch.setattr(torch, "save", torch_writer_failure)
    with pytest.raises(
        OSError, match=r"^path: could not save the checkpoint '.*new\.pth' \(\[enforce"
    ):
        save_checkpoint(tmp_path / "new.pth", {"model": {}})
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    stale = [tmp_path / ".latest.pth.tmp.99999", tmp_path / ".latest.pth.tmp.1"]
    for p in stale:
        p.write_bytes(b"")  # what a save killed mid-write leaves
    other = tmp_path / ".epoch_1.pth.tmp.5"  # another checkpoint's temp file is left alone
    other.write_bytes(b"")
    save_checkpoint(tmp_path / "latest.pth", {"model": {"w": torch.ones(1)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch_1.pth.tmp.5", "latest.pth"]
    (tmp_path / ".copy.pth.tmp.7").write_bytes(b"")
    copy_checkpoint(tmp_path / "latest.pth", tmp_path / "copy.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".epoch_1.pth.tmp.5",
        "copy.pth",
        "latest.pth",
    ]


def test_resume_from_a_checkpoint_without_epoch_names_the_key(tmp_path):
    model = fresh_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(
        tmp_path / "weights.pth", {"model": model.state_dict(), "optimizer": opt.state_dict()}
    )
    with pytest.raises(
        ValueError,
        match=r"^resume: '.*weights\.pth' is not a training checkpoint saved by train\(\): it "
        r"has no 'epoch', 'iter', 'iter_in_epoch', 'history', 'rng', 'epoch_rng' entries",
    ):
        train(fresh_model(1), make_loader(), config(epochs=1), resume=path, device="cpu")


class CrashesAt(DropoutRegressor):
    """Raises on its ``n``-th ``loss`` call, like a run killed mid-epoch."""

    def __init__(self, n):
        super().__init__()
        self.calls, self.n = 0, n

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().loss(batch)


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # epoch 1 = steps 1..6 saved; 7, 8 logged; killed
        train(CrashesAt(9), make_loader(), config(epochs=2), work_dir=tmp_path, device="cpu")
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"mode": "train", "iter": 9, "lo')  # a line the kill cut short
    before = [json.loads(line)["iter"] for line in log.read_text().splitlines()[:-1]]
    assert before == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the "start" line, then one per step
    train(
        fresh_model(1),
        make_loader(),
        config(epochs=2),
        work_dir=tmp_path,
        resume=True,
        device="cpu",
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["mode"], r["iter"]) for r in records] == [
        ("start", 0), *[("train", i) for i in range(1, 7)],
        ("start", 6), *[("train", i) for i in range(7, 13)],
    ]  # fmt: skip


def test_other_runtime_errors_of_torch_save_pass_through(tmp_path, monkeypatch):
    def unrelated(obj, f, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", unrelated)
    with pytest.raises(RuntimeError, match="^something else$"):
        save_checkpoint(tmp_path / "c.pth", {"model": {}})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_checkpoint_drops_the_killed_runs_steps(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # killed at step 4, before any checkpoint
        train(CrashesAt(4), make_loader(), config(epochs=1), work_dir=tmp_path, device="cpu")
    assert not (tmp_path / "latest.pth").exists()
    train(
        fresh_model(1),
        make_loader(),
        config(epochs=1),
        work_dir=tmp_path,
        resume=True,
        device="cpu",
    )
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["iter"]) for r in records] == [
        ("start", 0), ("start", 0), *[("train", i) for i in range(1, 7)],
    ]  # fmt: skip
