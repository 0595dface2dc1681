"""Notebook 03's live demo setting: the data and schedule of ``fcos_demo_setup``."""

import torch

from labkit.lessons.training import fcos_demo_setup


def test_quick_demo_is_32_train_and_16_val_images_at_256_px_for_16_steps():
    train_loader, val_loader, val_set, config = fcos_demo_setup(quick=True, seed=0)
    assert len(train_loader.dataset) == 32 and len(val_set) == 16
    assert val_loader.dataset is val_set
    assert len(train_loader) == 8 and len(val_loader) == 2  # batches of 4 and of 8
    batch = next(iter(train_loader))
    assert batch["img"].shape == (4, 3, 256, 256)
    assert next(iter(val_loader))["img"].shape == (8, 3, 256, 256)
    assert config.epochs * len(train_loader) == 16
    assert (config.optimizer, config.lr, config.weight_decay) == ("adamw", 2e-3, 1e-4)
    assert (config.warmup_iters, config.milestones, config.max_norm) == (4, (2,), 10.0)
    assert (config.progress, config.log_every, config.eval_every) == (False, 1, 100)


def test_full_demo_uses_whole_splits_at_512_px_for_12_epochs():
    train_loader, _, val_set, config = fcos_demo_setup(quick=False, seed=0)
    assert len(train_loader.dataset) > 32 and len(val_set) > 16
    assert next(iter(train_loader))["img"].shape == (4, 3, 512, 512)
    assert (config.epochs, config.lr, config.warmup_iters, config.milestones) == (
        12, 1e-3, 200, (8, 11)
    )  # fmt: skip


def test_seed_fixes_the_shuffle():
    first = next(iter(fcos_demo_setup(quick=True, seed=3)[0]))
    again = next(iter(fcos_demo_setup(quick=True, seed=3)[0]))
    torch.testing.assert_close(first["img"], again["img"])
    ids = [m["image_id"] for m in first["img_metas"]]
    assert ids == [m["image_id"] for m in again["img_metas"]] and len(set(ids)) == 4
