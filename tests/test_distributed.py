"""DDP on CPU: two gloo processes through the real train loop match one process on the global
batch, with and without gradient accumulation.

Equality to single-process training is checked to 1e-12 in float64, not bitwise: DDP averages
two per-rank mean gradients ((g0 + g1) / 2) while one process averages eight samples at once,
so the float summation order differs. Between the two ranks the parameters must be bitwise
identical, since both apply the same all-reduced gradient.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from labkit.engine import distributed as dist_utils
from labkit.engine.train import TrainConfig, train

WORLD_SIZE = 2
PER_RANK_BATCH = 4
STEPS = 3


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PER_RANK_BATCH * WORLD_SIZE * STEPS, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.1
    return TensorDataset(x, y)


def collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(6, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 2, dtype=torch.float64)
        self.aux_head = nn.Linear(8, 2, dtype=torch.float64)  # never used: needs find_unused

    def loss(self, batch):
        pred = self.head(torch.tanh(self.backbone(batch["x"])))
        return {"loss_l2": (pred - batch["y"]).square().mean()}


def config() -> TrainConfig:
    return TrainConfig(
        max_iters=STEPS,
        lr=0.1,
        warmup_iters=2,
        milestones=(),
        max_norm=5.0,
        lr_mult={"backbone": 0.5},
        log_every=1,
        progress=False,
        find_unused_parameters=True,
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    info = dist_utils.init_distributed(backend="gloo")
    assert info.world_size == WORLD_SIZE and info.rank == rank
    try:
        model = Regressor()
        loader = DataLoader(dataset(), batch_size=PER_RANK_BATCH, collate_fn=collate)
        work_dir = os.path.join(out_dir, "work")
        hist = train(model, loader, config(), device="cpu", work_dir=work_dir)
        # Same global batch again, as 2 micro-batches of 2 per rank (DDP no_sync path).
        accum_model = Regressor()
        small = DataLoader(dataset(), batch_size=PER_RANK_BATCH // 2, collate_fn=collate)
        train(accum_model, small, dataclasses.replace(config(), accum_steps=2), device="cpu")
        torch.save(
            {
                "params": model.state_dict(),
                "accum_params": accum_model.state_dict(),
                "losses": [r["loss"] for r in hist.train],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist_utils.cleanup()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, free_port):
    # fork: the children inherit the imported torch/labkit instead of importing them again
    # (seconds on a busy CI machine); nothing has touched CUDA in this process.
    mp.start_processes(
        _worker, args=(free_port, str(tmp_path)), nprocs=WORLD_SIZE, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    assert ranks[0]["losses"] == ranks[1]["losses"]  # logged losses are all-reduced

    single = Regressor()
    full_batch = DataLoader(dataset(), batch_size=PER_RANK_BATCH * WORLD_SIZE, collate_fn=collate)
    hist = train(single, full_batch, config(), device="cpu")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-12, msg=key)
    # Logged losses are float32 summaries, hence the looser tolerance.
    assert ranks[0]["losses"] == pytest.approx([r["loss"] for r in hist.train], rel=1e-6)
    assert not torch.equal(single.head.weight, Regressor().head.weight)  # it did train
    for key, value in single.state_dict().items():
        torch.testing.assert_close(
            ranks[0]["accum_params"][key], value, rtol=0, atol=1e-12, msg=key
        )
    # Only rank 0 wrote the log and checkpoints.
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "epoch_1.pth",
        "latest.pth",
        "log.jsonl",
    ]
