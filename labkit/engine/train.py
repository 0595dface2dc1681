"""The one training loop every labkit detector uses: dense heads, Deformable-DETR and Co-DETR.

A detector only needs ``loss(batch) -> dict[str, Tensor]``; the loop sums the entries whose
key contains ``"loss"`` (mmdetection's rule) and steps the optimizer. Read :func:`train` (at the
end) top to bottom: set up, resume, then per epoch train, evaluate, checkpoint. The helpers
above it are defined in the order they run: one optimizer step is :func:`_forward_backward`
(accumulation, AMP) and :func:`_optimizer_step` (NaN check, clipping); RNG capture and
restore for an exact resume live in :mod:`labkit.engine.rng`.

    history = train(model, loader, epochs=12, lr=0.01, work_dir="work_dirs/retinanet")
    history = train(model, loader, TrainConfig(optimizer="adamw", lr=2e-4, max_norm=0.1,
                    lr_mult={"backbone": 0.1, "sampling_offsets": 0.1}), resume=True, ...)

Under ``torchrun`` (see :mod:`labkit.engine.distributed`) the same call trains with DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

import labkit
from labkit import to_device
from labkit.engine import distributed as dist_utils
from labkit.engine.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from labkit.engine.logging import JsonlLogger
from labkit.engine.rng import capture_rng, restore_rng
from labkit.nn.distributed import reduce_mean


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
    passed from epoch ``m`` on (``by_epoch``) or from step ``m`` on. ``lr_schedule="cosine"``
    replaces the steps by ``0.5 * (1 + cos(pi * i / total_steps))`` (milestones unused).

    Optimizer: ``"sgd"`` (``momentum``) or ``"adamw"`` (``betas``), ``weight_decay`` on all
    parameters; ``lr_mult`` maps a parameter-name substring to a multiplier, the longest
    matching key wins (mmdetection's ``paramwise_cfg.custom_keys``), e.g.
    ``{"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}`` for DETRs.

    Step: ``accum_steps`` micro-batches per optimizer step (losses divided so the gradient
    is their mean), gradient clipping to ``max_norm`` (L2 over all parameters; None = off),
    ``amp`` autocast in ``amp_dtype``: "bfloat16" on CUDA or a CPU (oneDNN's bf16
    convolutions, about 1.75x faster per step on a CPU with AVX512-BF16), "float16" on CUDA only
    (with a GradScaler). Dense heads compute their targets and losses in float32 either way.

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
    lr_schedule: str = "step"
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
        _require(
            self.lr_schedule in ("step", "cosine"),
            "lr_schedule",
            "'step' or 'cosine'",
            self.lr_schedule,
        )
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
    """Multiplier of the base lr at optimizer step ``iteration`` (0-based): warm-up x steps
    (``lr_schedule="step"``) or warm-up x half a cosine over the run (``"cosine"``)."""
    factor = 1.0
    if iteration < config.warmup_iters:
        span = config.warmup_iters - 1  # mmengine's LinearLR reaches 1.0 at step end - 1
        ratio = config.warmup_ratio
        factor = ratio + (1.0 - ratio) * iteration / span if span > 0 else ratio
    if config.lr_schedule == "cosine":  # half a cosine from 1 to 0 over the whole run
        total = config.max_iters or config.epochs * iters_per_epoch
        return factor * 0.5 * (1.0 + math.cos(math.pi * min(1.0, iteration / max(total, 1))))
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


@dataclass
class _Run:
    """One call of :func:`train`: what :func:`_setup` builds once, and the counters, history
    and log window that the steps advance and a checkpoint saves."""

    config: TrainConfig
    model: nn.Module
    loader: DataLoader  # the train loader, re-sharded under DDP
    device: torch.device
    info: dist_utils.DistInfo
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # every parameter the optimizer updates
    scaler: torch.amp.GradScaler  # a no-op unless AMP in float16
    use_amp: bool
    amp_dtype: torch.dtype
    loss_fn: Callable[[dict], dict]  # model.loss, or the DDP wrapper that calls it
    ddp: nn.parallel.DistributedDataParallel | None
    iters_per_epoch: int  # optimizer steps per epoch
    max_iters: int
    work_dir: Path | None
    writes: bool  # this process writes the log and checkpoints (rank 0 with a work_dir)
    logger: JsonlLogger
    recipe: dict | None
    val_loader: DataLoader | None
    val_dataset: Any
    history: History = field(default_factory=History)
    epoch: int = 0  # epochs done
    it: int = 0  # optimizer steps done
    it_in_epoch: int = 0  # optimizer steps done in the current epoch
    window: dict[str, list[float]] = field(default_factory=dict)  # values since the last log line
    bar: Any = None  # tqdm bar, opened by _start_log once the first step is known


def _setup(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    device: str | torch.device | None,
    work_dir: str | Path | None,
    recipe: dict | tuple | list | None,
    val_loader: DataLoader | None,
    val_dataset: Any,
) -> _Run:
    """Check the model, pick the device, shard the loader (DDP), build the optimizer, AMP
    scaler, DDP wrapper and JSON-lines logger: a :class:`_Run` at step 0."""
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
    iters_per_epoch = math.ceil(len(loader) / config.accum_steps)

    optimizer = build_optimizer(model, config)
    amp_dtype = getattr(torch, config.amp_dtype)
    # CPUs autocast to bfloat16 only (oneDNN's bf16 convolutions: about 1.75x faster per step
    # on a CPU with AVX512-BF16); float16 autocast is CUDA's.
    use_amp = config.amp and (
        device.type == "cuda" or (device.type == "cpu" and amp_dtype == torch.bfloat16)
    )
    if use_amp and device.type == "cpu" and not getattr(model, "supports_cpu_amp", False):
        raise ValueError(
            f"amp: bf16 autocast on a CPU is supported for the dense one-stage detectors "
            f"(RetinaNet, ATSS, PAA, FCOS, FoveaBox, FSAF), whose heads keep targets and losses "
            f"in float32; {type(model).__name__} does not declare supports_cpu_amp (train it "
            f"without --amp)"
        )
    if config.amp and not use_amp:
        # stacklevel=3: blame the caller of train(), not this helper.
        warnings.warn(
            f"amp=True with {config.amp_dtype} acts on CUDA"
            + (" (and bfloat16 on a CPU)" if amp_dtype != torch.bfloat16 else " and on a CPU")
            + f"; training in float32 on {device.type}",
            stacklevel=3,
        )
    # bf16 has float32's range, so only fp16 needs loss scaling against underflow.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # DDP: forward goes through a wrapper so gradients are averaged across ranks.
    ddp = None
    if info.enabled:
        ddp = dist_utils.wrap_ddp(_LossForward(model), device, config.find_unused_parameters)

    work_dir = Path(work_dir) if work_dir is not None else None
    writes = info.is_main and work_dir is not None
    recipe = recipe if recipe is not None else getattr(model, "recipe", None)
    if isinstance(recipe, (tuple, list)):  # the heads' recipes record (name, kwargs)
        recipe = {"name": recipe[0], "kwargs": dict(recipe[1])}
    return _Run(
        config=config,
        model=model,
        loader=loader,
        device=device,
        info=info,
        optimizer=optimizer,
        params=[p for group in optimizer.param_groups for p in group["params"]],
        scaler=scaler,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        loss_fn=model.loss if ddp is None else ddp,
        ddp=ddp,
        iters_per_epoch=iters_per_epoch,
        max_iters=config.max_iters or config.epochs * iters_per_epoch,
        work_dir=work_dir,
        writes=writes,
        logger=JsonlLogger(work_dir / "log.jsonl" if writes else None),
        recipe=recipe,
        val_loader=val_loader,
        val_dataset=val_dataset,
    )


# What _resume reads from a checkpoint (_checkpoint_state writes them all).
_RESUME_KEYS = "model optimizer epoch iter iter_in_epoch history rng epoch_rng".split()


def _resume(run: _Run, path: Path) -> tuple[dict, dict]:
    """Load model, optimizer, grad scaler, counters and history from the checkpoint at
    ``path`` into ``run``. Returns its two RNG states: ``(epoch_rng, rng)``, taken at the
    start of the saved epoch and at the save."""
    ckpt = load_checkpoint(path)
    missing = [key for key in _RESUME_KEYS if key not in ckpt]
    if missing:
        raise ValueError(
            f"resume: {str(path)!r} is not a training checkpoint saved by train(): it has no "
            f"{', '.join(repr(k) for k in missing)} entr{'ies' if len(missing) > 1 else 'y'} "
            f"(keys: {sorted(ckpt)}); to start "
            "from its weights, load them with labkit.engine.checkpoint.load_checkpoint(path, "
            "model) and train without resume"
        )
    load_model_state(run.model, ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.it, run.it_in_epoch = ckpt["epoch"], ckpt["iter"], ckpt["iter_in_epoch"]
    run.history = History(**ckpt["history"])
    # The killed run may have logged steps past the checkpoint: they are redone now.
    run.logger.truncate(run.it)
    return ckpt["epoch_rng"], ckpt["rng"]


def _start_log(run: _Run, resumed_from: Path | None) -> None:
    """Write the ``"start"`` log record and open the progress bar at the current step."""
    from tqdm.auto import tqdm

    run.logger.log(
        {
            "mode": "start",
            "config": dataclasses.asdict(run.config),
            "iters_per_epoch": run.iters_per_epoch,
            "max_iters": run.max_iters,
            "world_size": run.info.world_size,
            "device": str(run.device),
            "resumed_from": None if resumed_from is None else str(resumed_from),
            "iter": run.it,
        }
    )
    show = run.config.progress and run.info.is_main
    run.bar = tqdm(total=run.max_iters, initial=run.it, desc="train", disable=not show)


def _enter_epoch(run: _Run, saved_rng: tuple[dict, dict] | None) -> tuple[Iterator, dict]:
    """Start epoch ``run.epoch``, or continue it after a resume (``saved_rng`` from
    :func:`_resume`): fix the sampler order, then the RNG streams, then iterate.

    Returns the batch iterator, past the batches a resumed epoch had already consumed, and
    the RNG state at the start of the epoch (a mid-epoch checkpoint stores it so that a
    resume can replay the epoch's shuffle).
    """
    loader = run.loader
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(run.epoch)
    if saved_rng is not None and run.it_in_epoch > 0:
        # Mid-epoch resume: replay the epoch's shuffle, skip what was consumed,
        # then continue from the exact RNG state of the save.
        epoch_rng = saved_rng[0]
        restore_rng(epoch_rng, loader)
        data_iter = iter(loader)
        for _ in range(run.it_in_epoch * run.config.accum_steps):
            next(data_iter)
        restore_rng(saved_rng[1], loader)
    else:
        if saved_rng is not None:
            restore_rng(saved_rng[1], loader)
        epoch_rng = capture_rng(loader)
        data_iter = iter(loader)
    run.model.train()
    return data_iter, epoch_rng


def _train_one_epoch(run: _Run, data_iter: Iterator) -> None:
    """Optimizer steps until the epoch's batches run out or ``max_iters`` is reached; each
    step's record goes to ``run.history.train`` and the log window."""
    accum = run.config.accum_steps
    while run.it_in_epoch < run.iters_per_epoch and run.it < run.max_iters:
        t0 = time.perf_counter()
        lr = run.config.lr * lr_factor(run.it, run.config, run.iters_per_epoch)
        _set_lr(run.optimizer, lr)
        # The epoch's last step is short when accum_steps does not divide len(loader).
        n_micro = min(accum, len(run.loader) - run.it_in_epoch * accum)
        step_vars, data_time = _forward_backward(run, data_iter, n_micro)
        values = _optimizer_step(run, step_vars)
        run.it += 1
        run.it_in_epoch += 1
        record = {"iter": run.it, "epoch": run.epoch + 1, "lr": lr, **values}
        run.history.train.append(record)
        _log_step(run, record, {"time": time.perf_counter() - t0, "data_time": data_time})


def _forward_backward(
    run: _Run, data_iter: Iterator, n_micro: int
) -> tuple[dict[str, Tensor], float]:
    """Forward and backward ``n_micro`` micro-batches from ``data_iter`` into ``.grad``.

    Each total loss is divided by ``n_micro`` so the accumulated gradient is the mean over
    the micro-batches (one big batch's gradient when they are equal-sized). Returns the
    micro-batch mean of every logged value (0-dim float32 tensors, this rank only) and the
    seconds spent waiting for data.
    """
    step_vars: dict[str, Tensor] = {}
    data_time = 0.0
    for micro in range(n_micro):
        t_data = time.perf_counter()
        batch = to_device(next(data_iter), run.device)
        data_time += time.perf_counter() - t_data
        # Only the last micro-batch all-reduces gradients under DDP.
        sync = run.ddp is None or micro == n_micro - 1
        with contextlib.nullcontext() if sync else run.ddp.no_sync():
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
                total, log_vars = parse_losses(run.loss_fn(batch))
            if not total.requires_grad:
                # A batch with nothing to learn (e.g. no boxes and a head that
                # returns constants): still touch every parameter so DDP's
                # gradient buckets fill on every rank.
                total = total + sum(p.reshape(-1)[0] * 0.0 for p in run.params)
            run.scaler.scale(total / n_micro).backward()
        for key, value in log_vars.items():
            value = value.detach().float() / n_micro
            step_vars[key] = step_vars.get(key, 0.0) + value
    return step_vars, data_time


def _optimizer_step(run: _Run, step_vars: dict[str, Tensor]) -> dict[str, float]:
    """Average the step's logged values over ranks, stop on NaN/inf, clip, step, zero grads.

    Returns the averaged values as floats, plus ``grad_norm`` (the L2 norm before clipping)
    when ``max_norm`` is set. Raises ``FloatingPointError`` naming the non-finite loss before
    any parameter changes.
    """
    # One all-reduce of all logged values: rank 0 logs the global batch, and
    # every rank sees the same NaN and stops together.
    keys = list(step_vars)
    values = reduce_mean(torch.stack([step_vars[k] for k in keys]))
    record = dict(zip(keys, values.tolist(), strict=True))
    bad = [k for k in keys if not math.isfinite(record[k])]
    if bad:
        raise FloatingPointError(
            f"{', '.join(k for k in bad if k != 'loss') or 'loss'} became "
            f"{record[bad[0]]} at iteration {run.it + 1} (epoch {run.epoch + 1}); the "
            "parameters were not updated. Try a lower lr, warm-up, or max_norm."
        )
    if run.config.max_norm is not None:
        run.scaler.unscale_(run.optimizer)
        grads = [p for p in run.params if p.grad is not None]
        norm = nn.utils.clip_grad_norm_(grads, run.config.max_norm)
        record["grad_norm"] = float(norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return record


def _log_step(run: _Run, record: dict[str, float], timing: dict[str, float]) -> None:
    """Add one step's values and timings to the log window and the progress bar; every
    ``log_every`` steps (and at the last) log the window's means as a ``"train"`` line and
    start a new window."""
    for key, value in {**record, **timing}.items():
        if key not in ("iter", "epoch", "lr"):
            run.window.setdefault(key, []).append(value)
    lr = record["lr"]
    run.bar.update(1)
    running = sum(run.window["loss"]) / len(run.window["loss"])  # mean since the last log line
    run.bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
    if run.it % run.config.log_every == 0 or run.it == run.max_iters:
        line = {"mode": "train", "iter": run.it, "epoch": run.epoch + 1, "lr": lr}
        line.update({k: sum(v) / len(v) for k, v in run.window.items()})
        if run.device.type == "cuda":
            line["memory"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        run.logger.log(line)
        run.window = {}


def _validate(run: _Run) -> None:
    """COCO-evaluate on rank 0 when a val loader and dataset were given: the metrics go to
    ``run.history.val``, the log and the progress bar. Every rank waits for it."""
    if run.val_loader is None or run.val_dataset is None:
        return
    if run.info.is_main:
        from labkit.engine import evaluate as evaluate_module

        run.model.eval()
        metrics = evaluate_module.evaluate(
            run.model, run.val_loader, run.val_dataset, run.device, progress=run.config.progress
        )
        # 1-based epoch the evaluated weights belong to (the one just finished, or the
        # unfinished one when max_iters stopped inside it).
        metrics = {"epoch": run.epoch + (run.it_in_epoch > 0), "iter": run.it, **metrics}
        run.history.val.append(metrics)
        run.logger.log({"mode": "val", **metrics})
        summary = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "AP75") if k in metrics)
        run.bar.write(f"iter {run.it} (epoch {run.epoch}): {summary}")
    dist_utils.barrier()


def _checkpoint_state(run: _Run, epoch_rng: dict, rng: dict) -> dict:
    """What a checkpoint holds: weights, optimizer and grad-scaler state, counters, history
    and the RNG at the start of the current epoch and now (for an exact resume), plus the
    recipe and config (for ``labkit eval``)."""
    return {
        "labkit_version": labkit.__version__,
        "recipe": run.recipe,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "config": dataclasses.asdict(run.config),
        "epoch": run.epoch,
        "iter": run.it,
        "iter_in_epoch": run.it_in_epoch,
        "rng": rng,
        "epoch_rng": epoch_rng,
        "history": dataclasses.asdict(run.history),
    }


def _save(run: _Run, name: str, epoch_rng: dict, rng: dict) -> None:
    """Write ``work_dir/name`` and make ``latest.pth`` a copy of it."""
    path = save_checkpoint(run.work_dir / name, _checkpoint_state(run, epoch_rng, rng))
    if name != "latest.pth":
        copy_checkpoint(path, run.work_dir / "latest.pth")


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
            so the continued run is bit-identical to an uninterrupted one on CPU; a corrupt
            checkpoint is refused, and ``log.jsonl`` loses the lines a killed run wrote past
            the checkpoint's step (they are redone). Under DDP
            the data order, model and optimizer resume exactly; every rank gets rank 0's RNG
            streams (dropout, augmentation) back, and CUDA kernels are not bitwise
            deterministic anyway.
        recipe: ``{"name": ..., "kwargs": {...}}`` (or a ``(name, kwargs)`` pair) stored in
            checkpoints so ``labkit eval`` can rebuild the model; default ``model.recipe``.

    Returns:
        A :class:`History`. Raises ``FloatingPointError`` naming the loss that became NaN/inf.
    """
    config = _make_config(config, overrides)
    run = _setup(model, train_loader, config, device, work_dir, recipe, val_loader, val_dataset)
    ckpt_path = _resume_path(resume, run.work_dir)
    saved_rng = _resume(run, ckpt_path) if ckpt_path is not None else None
    if ckpt_path is None and resume is True:
        run.logger.truncate(0)  # no checkpoint yet: a killed run's logged steps are redone
    _start_log(run, ckpt_path)
    saved_at = run.it if ckpt_path is not None else -1  # step of the newest checkpoint
    epoch_rng = None
    try:
        while run.it < run.max_iters:
            data_iter, epoch_rng = _enter_epoch(run, saved_rng)
            saved_rng = None
            _train_one_epoch(run, data_iter)
            if run.it_in_epoch < run.iters_per_epoch:
                break  # stopped by max_iters inside the epoch
            # End of epoch: evaluate, then checkpoint (so the saved RNG follows eval).
            run.epoch, run.it_in_epoch = run.epoch + 1, 0
            last = run.it >= run.max_iters
            if run.epoch % config.eval_every == 0 or last:
                _validate(run)
            if run.writes and (run.epoch % config.checkpoint_every == 0 or last):
                # The next epoch starts from this state, so it is also its epoch_rng.
                epoch_start, now = capture_rng(run.loader), capture_rng(run.loader)
                _save(run, f"epoch_{run.epoch}.pth", epoch_start, now)
                saved_at = run.it
            dist_utils.barrier()
        if run.it_in_epoch > 0 and saved_at != run.it:
            # Stopped by max_iters inside an epoch: save first (a continued run needs the RNG
            # state from before evaluation), then evaluate once.
            if run.writes:
                _save(run, "latest.pth", epoch_rng, capture_rng(run.loader))
            _validate(run)
    finally:
        run.bar.close()
        run.logger.close()
    return run.history
