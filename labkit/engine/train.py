"""The one training loop every labkit detector uses: dense heads, Deformable-DETR and Co-DETR.

A detector only needs ``loss(batch) -> dict[str, Tensor]``; the loop sums the entries whose
key contains ``"loss"`` (mmdetection's rule) and steps the optimizer. Read :func:`train` top
to bottom: schedule, accumulation, AMP, clipping, logging, evaluation, checkpoints, resume.

    history = train(model, loader, epochs=12, lr=0.01, work_dir="work_dirs/retinanet")
    history = train(model, loader, TrainConfig(optimizer="adamw", lr=2e-4, max_norm=0.1,
                    lr_mult={"backbone": 0.1, "sampling_offsets": 0.1}), resume=True, ...)

Under ``torchrun`` (see :mod:`labkit.engine.distributed`) the same call trains with DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

import labkit
from labkit import to_device
from labkit.engine import distributed as dist_utils
from labkit.engine.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from labkit.engine.logging import JsonlLogger


def _require(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Every knob of :func:`train`, with mmdetection's defaults (RetinaNet 1x schedule).

    Schedule: ``epochs`` (or ``max_iters`` optimizer steps, which then wins). The learning
    rate of a parameter group at optimizer step ``i`` (0-based) is
    ``lr * lr_mult * warmup(i) * gamma ** (milestones passed)``, where ``warmup(i)`` rises
    linearly from ``warmup_ratio`` at step 0 to 1 at step ``warmup_iters - 1`` (mmengine's
    ``LinearLR(start_factor=warmup_ratio, end=warmup_iters)``) and a milestone ``m`` is
    passed from epoch ``m`` on (``by_epoch``) or from step ``m`` on.

    Optimizer: ``"sgd"`` (``momentum``) or ``"adamw"`` (``betas``), ``weight_decay`` on all
    parameters; ``lr_mult`` maps a parameter-name substring to a multiplier, the longest
    matching key wins (mmdetection's ``paramwise_cfg.custom_keys``), e.g.
    ``{"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}`` for DETRs.

    Step: ``accum_steps`` micro-batches per optimizer step (losses divided so the gradient
    is their mean), gradient clipping to ``max_norm`` (L2 over all parameters; None = off),
    ``amp`` autocast on CUDA in ``amp_dtype`` ("bfloat16"; "float16" adds a GradScaler).

    Bookkeeping: a JSON-lines record every ``log_every`` steps, COCO evaluation every
    ``eval_every`` epochs (and after the last), a checkpoint every ``checkpoint_every``
    epochs (and at the end), a tqdm bar when ``progress``. ``sampler_seed`` seeds the
    DistributedSampler; ``find_unused_parameters`` goes to DDP.
    """

    epochs: int = 12
    max_iters: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_mult: dict[str, float] = field(default_factory=dict)
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = (8, 11)
    by_epoch: bool = True
    gamma: float = 0.1
    max_norm: float | None = None
    accum_steps: int = 1
    amp: bool = False
    amp_dtype: str = "bfloat16"
    log_every: int = 50
    eval_every: int = 1
    checkpoint_every: int = 1
    progress: bool = True
    sampler_seed: int = 0
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "accum_steps", "log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, "a positive int", value)
        mi = self.max_iters
        _require(mi is None or (_is_int(mi) and mi >= 1), "max_iters", "None or a positive int", mi)
        _require(
            self.optimizer in ("sgd", "adamw"), "optimizer", "'sgd' or 'adamw'", self.optimizer
        )
        _require(_positive(self.lr), "lr", "a positive finite float", self.lr)
        _require(_in_range(self.momentum, 0.0, 1.0), "momentum", "a float in [0, 1)", self.momentum)
        _require(
            _in_range(self.weight_decay, 0.0, math.inf),
            "weight_decay",
            "a float >= 0",
            self.weight_decay,
        )
        betas_ok = len(tuple(self.betas)) == 2 and all(_in_range(b, 0.0, 1.0) for b in self.betas)
        _require(betas_ok, "betas", "two floats in [0, 1)", self.betas)
        self.betas = tuple(float(b) for b in self.betas)
        _require(
            isinstance(self.lr_mult, dict),
            "lr_mult",
            "a dict name-substring -> float",
            self.lr_mult,
        )
        for key, mult in self.lr_mult.items():
            _require(isinstance(key, str) and key != "", "lr_mult", "non-empty string keys", key)
            _require(_in_range(mult, 0.0, math.inf), f"lr_mult[{key!r}]", "a float >= 0", mult)
        wi = self.warmup_iters
        _require(_is_int(wi) and wi >= 0, "warmup_iters", "an int >= 0", wi)
        wr = self.warmup_ratio
        _require(_positive(wr) and wr <= 1.0, "warmup_ratio", "a float in (0, 1]", wr)
        self.milestones = tuple(self.milestones)
        ms = self.milestones
        ms_ok = all(_is_int(m) and m >= 1 for m in ms) and list(ms) == sorted(ms)
        _require(ms_ok, "milestones", "increasing positive ints", ms)
        _require(_positive(self.gamma), "gamma", "a positive float", self.gamma)
        mn = self.max_norm
        _require(mn is None or _positive(mn), "max_norm", "None or a positive float", mn)
        _require(
            self.amp_dtype in ("bfloat16", "float16"),
            "amp_dtype",
            "'bfloat16' or 'float16'",
            self.amp_dtype,
        )
        _require(_is_int(self.sampler_seed), "sampler_seed", "an int", self.sampler_seed)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _in_range(value: Any, low: float, high: float) -> bool:
    """low <= value < high for a real number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high


@dataclass
class History:
    """What a run produced: ``train`` has one dict per optimizer step (``iter`` 1-based,
    ``epoch`` 1-based, ``lr``, every logged loss, ``grad_norm`` when clipping), ``val`` one
    dict of COCO metrics per evaluation (plus ``epoch`` and ``iter``)."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)

    def series(self, key: str = "loss", split: str = "train") -> tuple[list[int], list[float]]:
        """``(iters, values)`` of one logged quantity, ready for ``plt.plot``."""
        records = [r for r in getattr(self, split) if key in r]
        return [r["iter"] for r in records], [r[key] for r in records]


# ----------------------------------------------------------------------------- optimizer


def build_param_groups(model: nn.Module, lr_mult: dict[str, float]) -> list[dict]:
    """Trainable parameters split into groups by ``lr_mult`` name substrings.

    Keys are tried longest first (ties alphabetically) and the first key contained in a
    parameter's name decides its group, as mmdetection's ``custom_keys``. Returns
    ``[{"params", "param_names", "lr_mult", "name"}, ...]``, the unmatched ``"default"``
    group (multiplier 1) first; empty groups are dropped.
    """
    keys = sorted(sorted(lr_mult), key=len, reverse=True)
    members: dict[str | None, list[tuple[str, nn.Parameter]]] = {None: [], **{k: [] for k in keys}}
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[next((k for k in keys if k in name), None)].append((name, param))
    groups = []
    for key, named in members.items():
        if named:
            groups.append(
                {
                    "params": [p for _, p in named],
                    "param_names": [n for n, _ in named],
                    "lr_mult": 1.0 if key is None else float(lr_mult[key]),
                    "name": "default" if key is None else key,
                }
            )
    if not groups:
        raise ValueError("model: has no trainable parameters (everything is frozen)")
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`build_param_groups`, each group at ``lr * lr_mult``."""
    groups = build_param_groups(model, config.lr_mult)
    for group in groups:
        group["lr"] = config.lr * group["lr_mult"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def lr_factor(iteration: int, config: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step ``iteration`` (0-based): warm-up x steps."""
    factor = 1.0
    if iteration < config.warmup_iters:
        span = config.warmup_iters - 1  # mmengine's LinearLR reaches 1.0 at step end - 1
        ratio = config.warmup_ratio
        factor = ratio + (1.0 - ratio) * iteration / span if span > 0 else ratio
    scale = iters_per_epoch if config.by_epoch else 1
    passed = sum(iteration >= m * scale for m in config.milestones)
    return factor * config.gamma**passed


def _set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)


# ----------------------------------------------------------------------------- losses


def parse_losses(losses: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum a detector's loss dict: ``(total, {key: scalar})``.

    Tensors are averaged to scalars, lists of tensors (one per level or decoder layer) are
    summed; every key containing ``"loss"`` enters the total, other keys (accuracies,
    counts) are only logged. The returned dict also holds ``"loss"`` = total.
    """
    if not isinstance(losses, dict) or not losses:
        raise TypeError(f"model.loss(batch): expected a non-empty dict of tensors, got {losses!r}")
    log_vars: dict[str, Tensor] = {}
    for key, value in losses.items():
        if isinstance(value, Tensor):
            log_vars[key] = value.mean()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) for v in value):
            log_vars[key] = sum((v.mean() for v in value), torch.zeros(()))
        else:
            raise TypeError(
                f"model.loss(batch)[{key!r}]: expected a tensor or a list of tensors, "
                f"got {type(value).__name__}"
            )
    loss_keys = [k for k in log_vars if "loss" in k]
    if not loss_keys:
        raise ValueError(f"model.loss(batch): no key contains 'loss' (keys: {list(log_vars)})")
    total = sum(log_vars[k] for k in loss_keys)
    return total, {**log_vars, "loss": total}


class _LossForward(nn.Module):
    """Routes DDP's ``forward`` to ``model.loss``: DDP only syncs gradients through forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return self.model.loss(batch)


# ----------------------------------------------------------------------------- RNG state


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None
        ),
    ]
    unique: list[torch.Generator] = []
    for gen in candidates:
        if gen is not None and all(gen is not g for g in unique):
            unique.append(gen)
    return unique


def _transform_generators(obj: Any, depth: int = 0) -> list[np.random.Generator]:
    """numpy Generators owned by the dataset's transforms (e.g. ``RandomFlip.rng``).

    Looks through ``.dataset``/``.datasets`` (Subset, ConcatDataset), ``.transforms``
    (Compose) and ``.rng``, a few levels deep. With ``num_workers=0`` these streams live in
    the main process and must be saved for an exact resume; in workers they are reseeded
    from the loader's generator, which is saved anyway.
    """
    if isinstance(obj, np.random.Generator):
        return [obj]
    if obj is None or depth > 4:
        return []
    found: list[np.random.Generator] = []
    for attr in ("dataset", "datasets", "transforms", "rng"):
        child = getattr(obj, attr, None)
        for item in child if isinstance(child, (list, tuple)) else [child]:
            found += _transform_generators(item, depth + 1)
    return found


def capture_rng(loader: DataLoader | None = None) -> dict:
    """Every random state a training step can touch: python, numpy, torch (CPU, CUDA), the
    loader's generators (shuffle order, worker seeds) and numpy Generators inside the
    dataset's transforms. Stored with plain types/tensors so ``torch.load(weights_only=True)``
    reads it back."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "loader": [g.get_state() for g in _loader_generators(loader)] if loader is not None else [],
        "transforms": [g.bit_generator.state for g in _transform_generators(loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, loader: DataLoader | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        for gen, gen_state in zip(_loader_generators(loader), state["loader"], strict=True):
            gen.set_state(gen_state)
        # strict=False: a resumed run may use a dataset whose transforms changed.
        transform_states = state.get("transforms", [])
        for gen, gen_state in zip(_transform_generators(loader), transform_states, strict=False):
            gen.bit_generator.state = gen_state


# ----------------------------------------------------------------------------- the loop


def _make_config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"train(): unknown TrainConfig field(s) {unknown}; valid: {sorted(names)}")
    if config is None:
        return TrainConfig(**overrides)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides)


def _resume_path(resume: bool | str | Path | None, work_dir: Path | None) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        if work_dir is None:
            raise ValueError("resume: resume=True looks for work_dir/latest.pth; pass work_dir")
        latest = work_dir / "latest.pth"
        return latest if latest.is_file() else None  # nothing saved yet: start fresh
    return Path(resume)


def train(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig | None = None,
    *,
    val_loader: DataLoader | None = None,
    val_dataset: Any = None,
    work_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    resume: bool | str | Path | None = None,
    recipe: dict | None = None,
    **overrides: Any,
) -> History:
    """Train ``model`` (anything with ``loss(batch) -> dict``) on ``train_loader``.

    Args:
        model: a labkit detector; moved to ``device``.
        train_loader: yields collated batches (``labkit.data.collate``); its length is one
            epoch. Under torchrun it is re-sharded with a DistributedSampler.
        config: a :class:`TrainConfig`; keyword ``overrides`` (``epochs=2, lr=0.02``)
            replace its fields, so ``train(model, loader, epochs=2)`` works without one.
        val_loader, val_dataset: when both are given, COCO metrics
            (``labkit.engine.evaluate.evaluate``) are computed every ``eval_every`` epochs.
        work_dir: folder for ``log.jsonl``, ``epoch_N.pth`` and ``latest.pth`` (None: keep
            nothing on disk).
        device: ``None``/``"auto"`` picks with ``labkit.device()``; under DDP on CUDA each
            process uses ``cuda:LOCAL_RANK``.
        resume: a checkpoint path, or ``True`` for ``work_dir/latest.pth`` when it exists.
            Model, optimizer, grad scaler, counters, history and every RNG state are restored,
            so the continued run is bit-identical to an uninterrupted one on CPU. Under DDP
            the data order, model and optimizer resume exactly; every rank gets rank 0's RNG
            streams (dropout, augmentation) back, and CUDA kernels are not bitwise
            deterministic anyway.
        recipe: ``{"name": ..., "kwargs": {...}}`` (or a ``(name, kwargs)`` pair) stored in
            checkpoints so ``labkit eval`` can rebuild the model; default ``model.recipe``.

    Returns:
        A :class:`History`. Raises ``FloatingPointError`` naming the loss that became NaN/inf.
    """
    config = _make_config(config, overrides)
    if not callable(getattr(model, "loss", None)):
        raise TypeError(
            f"model: expected a detector with a loss(batch) method, got {type(model).__name__}"
        )
    info = dist_utils.init_distributed()
    if info.enabled and torch.cuda.is_available() and device in (None, "auto", "cuda"):
        device = torch.device("cuda", info.local_rank)  # one GPU per process
    device = labkit.device(device)
    model.to(device)
    loader = dist_utils.shard_loader(train_loader, config.sampler_seed)
    if len(loader) == 0:
        raise ValueError("train_loader: is empty (no batches)")
    accum = config.accum_steps
    iters_per_epoch = math.ceil(len(loader) / accum)
    max_iters = config.max_iters or config.epochs * iters_per_epoch

    optimizer = build_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        warnings.warn("amp=True only acts on CUDA; training in float32 on CPU", stacklevel=2)
    amp_dtype = getattr(torch, config.amp_dtype)
    # bf16 has float32's range, so only fp16 needs loss scaling against underflow.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # DDP: forward goes through a wrapper so gradients are averaged across ranks.
    ddp = None
    loss_fn = model.loss
    if info.enabled:
        ddp = dist_utils.wrap_ddp(_LossForward(model), device, config.find_unused_parameters)
        loss_fn = ddp

    work_dir = Path(work_dir) if work_dir is not None else None
    writes = info.is_main and work_dir is not None
    logger = JsonlLogger(work_dir / "log.jsonl" if writes else None)
    history = History()
    epoch, it, it_in_epoch = 0, 0, 0  # epochs done, optimizer steps done, steps in this epoch
    saved_rng = None
    ckpt_path = _resume_path(resume, work_dir)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, model, optimizer, scaler)
        epoch, it, it_in_epoch = ckpt["epoch"], ckpt["iter"], ckpt["iter_in_epoch"]
        history = History(**ckpt["history"])
        saved_rng = (ckpt["epoch_rng"], ckpt["rng"])
    recipe = recipe if recipe is not None else getattr(model, "recipe", None)
    if isinstance(recipe, (tuple, list)):  # the heads' recipes record (name, kwargs)
        recipe = {"name": recipe[0], "kwargs": dict(recipe[1])}
    logger.log(
        {
            "mode": "start",
            "config": dataclasses.asdict(config),
            "iters_per_epoch": iters_per_epoch,
            "max_iters": max_iters,
            "world_size": info.world_size,
            "device": str(device),
            "resumed_from": None if ckpt_path is None else str(ckpt_path),
            "iter": it,
        }
    )

    def checkpoint(name: str, epoch_rng: dict, rng: dict) -> None:
        state = {
            "labkit_version": labkit.__version__,
            "recipe": recipe,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "config": dataclasses.asdict(config),
            "epoch": epoch,
            "iter": it,
            "iter_in_epoch": it_in_epoch,
            "rng": rng,
            "epoch_rng": epoch_rng,
            "history": dataclasses.asdict(history),
        }
        path = save_checkpoint(work_dir / name, state)
        if name != "latest.pth":
            copy_checkpoint(path, work_dir / "latest.pth")

    def validate() -> None:
        if val_loader is None or val_dataset is None:
            return
        if info.is_main:
            from labkit.engine import evaluate as evaluate_module

            model.eval()
            metrics = evaluate_module.evaluate(
                model, val_loader, val_dataset, device, progress=config.progress
            )
            # 1-based epoch the evaluated weights belong to (the one just finished, or the
            # unfinished one when max_iters stopped inside it).
            metrics = {"epoch": epoch + (it_in_epoch > 0), "iter": it, **metrics}
            history.val.append(metrics)
            logger.log({"mode": "val", **metrics})
            summary = "  ".join(
                f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "AP75") if k in metrics
            )
            bar.write(f"iter {it} (epoch {epoch}): {summary}")
        dist_utils.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(
        total=max_iters, initial=it, desc="train", disable=not (config.progress and info.is_main)
    )
    window: dict[str, list[float]] = {}
    saved_at = it if ckpt_path is not None else -1
    epoch_rng = None
    try:
        while it < max_iters:
            # ---- start (or resume) an epoch: fix the sampler order, then the RNG streams
            if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                loader.sampler.set_epoch(epoch)
            if saved_rng is not None and it_in_epoch > 0:
                # Mid-epoch resume: replay the epoch's shuffle, skip what was consumed,
                # then continue from the exact RNG state of the save.
                epoch_rng = saved_rng[0]
                restore_rng(epoch_rng, loader)
                data_iter = iter(loader)
                for _ in range(it_in_epoch * accum):
                    next(data_iter)
                restore_rng(saved_rng[1], loader)
            else:
                if saved_rng is not None:
                    restore_rng(saved_rng[1], loader)
                epoch_rng = capture_rng(loader)
                data_iter = iter(loader)
            saved_rng = None
            model.train()

            while it_in_epoch < iters_per_epoch and it < max_iters:
                # ---- one optimizer step over n_micro micro-batches
                t0 = time.perf_counter()
                lr = config.lr * lr_factor(it, config, iters_per_epoch)
                _set_lr(optimizer, lr)
                n_micro = min(accum, len(loader) - it_in_epoch * accum)
                step_vars: dict[str, Tensor] = {}
                data_time = 0.0
                for micro in range(n_micro):
                    t_data = time.perf_counter()
                    batch = to_device(next(data_iter), device)
                    data_time += time.perf_counter() - t_data
                    # Only the last micro-batch all-reduces gradients under DDP.
                    sync = ddp is None or micro == n_micro - 1
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                            total, log_vars = parse_losses(loss_fn(batch))
                        if not total.requires_grad:
                            # A batch with nothing to learn (e.g. no boxes and a head that
                            # returns constants): still touch every parameter so DDP's
                            # gradient buckets fill on every rank.
                            total = total + sum(p.reshape(-1)[0] * 0.0 for p in params)
                        scaler.scale(total / n_micro).backward()
                    for key, value in log_vars.items():
                        value = value.detach().float() / n_micro
                        step_vars[key] = step_vars.get(key, 0.0) + value
                # One all-reduce of all logged values: rank 0 logs the global batch, and
                # every rank sees the same NaN and stops together.
                keys = list(step_vars)
                values = dist_utils.reduce_mean(torch.stack([step_vars[k] for k in keys]))
                record = dict(zip(keys, values.tolist(), strict=True))
                bad = [k for k in keys if not math.isfinite(record[k])]
                if bad:
                    raise FloatingPointError(
                        f"{', '.join(k for k in bad if k != 'loss') or 'loss'} became "
                        f"{record[bad[0]]} at iteration {it + 1} (epoch {epoch + 1}); the "
                        "parameters were not updated. Try a lower lr, warm-up, or max_norm."
                    )
                if config.max_norm is not None:
                    scaler.unscale_(optimizer)
                    grads = [p for p in params if p.grad is not None]
                    norm = nn.utils.clip_grad_norm_(grads, config.max_norm)
                    record["grad_norm"] = float(norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                it += 1
                it_in_epoch += 1

                # ---- bookkeeping
                record = {"iter": it, "epoch": epoch + 1, "lr": lr, **record}
                history.train.append(record)
                timing = {"time": time.perf_counter() - t0, "data_time": data_time}
                for key, value in {**record, **timing}.items():
                    if key not in ("iter", "epoch", "lr"):
                        window.setdefault(key, []).append(value)
                bar.update(1)
                running = sum(window["loss"]) / len(window["loss"])  # mean since the last log line
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
                if it % config.log_every == 0 or it == max_iters:
                    line = {"mode": "train", "iter": it, "epoch": epoch + 1, "lr": lr}
                    line.update({k: sum(v) / len(v) for k, v in window.items()})
                    if device.type == "cuda":
                        line["memory"] = torch.cuda.max_memory_allocated(device) / 2**20
                    logger.log(line)
                    window = {}

            if it_in_epoch < iters_per_epoch:
                break  # stopped by max_iters inside the epoch
            # ---- end of epoch: evaluate, then checkpoint (so the saved RNG follows eval)
            epoch, it_in_epoch = epoch + 1, 0
            last = it >= max_iters
            if epoch % config.eval_every == 0 or last:
                validate()
            if writes and (epoch % config.checkpoint_every == 0 or last):
                checkpoint(f"epoch_{epoch}.pth", capture_rng(loader), capture_rng(loader))
                saved_at = it
            dist_utils.barrier()
        if it_in_epoch > 0 and saved_at != it:
            # Stopped by max_iters inside an epoch: save first (a continued run needs the RNG
            # state from before evaluation), then evaluate once.
            if writes:
                checkpoint("latest.pth", epoch_rng, capture_rng(loader))
            validate()
    finally:
        bar.close()
        logger.close()
    return history
