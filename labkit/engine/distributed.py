"""Multi-process training with torch.distributed (DDP), launched by torchrun.

One process per GPU (or per CPU worker with the gloo backend). ``torchrun`` sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the train loop calls
:func:`init_distributed`, which joins the process group when ``WORLD_SIZE > 1``::

    torchrun --nproc_per_node=8 --no-python labkit train --model co_deformable_detr --data shapes
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 --no-python labkit train ...

Each rank reads its own shard of every epoch (``DistributedSampler``), DDP averages the
gradients, and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and saves (rank 0)."""
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables, once.

    ``backend=None`` picks ``nccl`` when CUDA is available and ``gloo`` otherwise. Without
    ``WORLD_SIZE > 1`` in the environment nothing happens and a single-process ``DistInfo``
    comes back. On CUDA each process is bound to ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size)


def get_info() -> DistInfo:
    """The current ``DistInfo`` (single process when no group was initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_info().enabled:
        dist.barrier()


def shard_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A copy of ``loader`` whose sampler gives each rank its own 1/world_size of the data.

    Shuffling is kept if the original loader shuffled; the ``DistributedSampler`` then draws
    the order from ``seed`` and the epoch (``set_epoch``), identically on every rank. The
    batch size stays per rank, so the global batch is ``batch_size * world_size``.
    """
    info = get_info()
    if not info.enabled or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError(
            "loader: a custom batch_sampler cannot be sharded; pass batch_size instead"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )


def wrap_ddp(
    module: nn.Module, device: torch.device, find_unused_parameters: bool = False
) -> nn.parallel.DistributedDataParallel:
    """Wrap ``module`` in DDP on ``device``.

    ``find_unused_parameters=True`` is needed when some parameters get no gradient in an
    iteration (Co-DETR's auxiliary heads on an image without positives, a frozen branch);
    it costs an extra graph traversal per step, so it is off by default.
    """
    device_ids = (
        [device.index if device.index is not None else 0] if device.type == "cuda" else None
    )
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
