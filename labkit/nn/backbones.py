"""Backbones returning multi-level feature maps: torchvision ResNets (random or ImageNet weights)
and a tiny CPU net."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

# depth -> (torchvision builder, channels of C2..C5)
_RESNETS = {
    18: (torchvision.models.resnet18, (64, 128, 256, 512)),
    34: (torchvision.models.resnet34, (64, 128, 256, 512)),
    50: (torchvision.models.resnet50, (256, 512, 1024, 2048)),
    101: (torchvision.models.resnet101, (256, 512, 1024, 2048)),
}
_STAGE_STRIDES = (4, 8, 16, 32)


def _check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    out_indices = tuple(int(i) for i in out_indices)
    if not out_indices or list(out_indices) != sorted(set(out_indices)):
        raise ValueError(f"out_indices: expected increasing stage indices, got {out_indices}")
    if out_indices[0] < 0 or out_indices[-1] > 3:
        raise ValueError(f"out_indices: stage indices lie in 0..3 (C2..C5), got {out_indices}")
    return out_indices


def _check_frozen_stages(frozen_stages: int) -> int:
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
        raise ValueError(
            f"frozen_stages: expected an int in -1..4 (-1 none, 0 stem, k stem + stages 1..k), "
            f"got {frozen_stages!r}"
        )
    return frozen_stages


class _StagedBackbone(nn.Module):
    """Shared freezing / norm_eval logic for backbones made of a stem and four stages.

    Subclasses define ``self.stem`` modules (``_stem_modules``) and ``self.layer1..4``.
    ``frozen_stages`` follows mmdetection: 0 freezes the stem, k >= 1 the stem and stages
    1..k (parameters get ``requires_grad=False`` and the modules stay in eval mode).
    ``norm_eval`` keeps every BatchNorm in eval mode (running statistics frozen) while
    training, which is what small per-GPU batches need when starting from pretrained stats.
    """

    out_indices: tuple[int, ...]
    frozen_stages: int
    norm_eval: bool

    def _stem_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen += self._stem_modules()
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> _StagedBackbone:
        """Switch train/eval mode while keeping frozen stages and (if norm_eval) BN in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x: Tensor[B, 3, H, W]`` -> one ``Tensor[B, C_i, H / s_i, W / s_i]`` per out index."""
        x = self._stem(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _imagenet_state_dict(depth: int, weights: str | os.PathLike) -> dict:
    """ImageNet weights of torchvision's ResNet-``depth``: a weights name of torchvision
    (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"DEFAULT"``; downloaded once into torch's cache)
    or a local file holding a torchvision ResNet state dict (or ``{"state_dict": ...}``)."""
    if os.path.isfile(weights):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"weights: {os.fspath(weights)!r} holds no state dict")
        return state
    if not isinstance(weights, str) or os.sep in weights or weights.endswith((".pth", ".pt")):
        raise FileNotFoundError(f"weights: no file at {os.fspath(weights)!r}")
    enum = torchvision.models.get_model_weights(f"resnet{depth}")
    names = [w.name for w in enum]
    if weights != "DEFAULT" and weights not in names:
        raise ValueError(
            f"weights: ResNet-{depth} has torchvision weights {names} (or 'DEFAULT'), got {weights!r}"
        )
    chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    try:
        return chosen.get_state_dict(progress=False)
    except Exception as err:  # no network, a proxy, a full disk: say what to do instead
        raise RuntimeError(
            f"weights: could not download torchvision's {chosen} ({type(err).__name__}: {err}). "
            f"Without internet access, download {chosen.url} elsewhere and pass its path: "
            f"weights='resnet{depth}.pth'"
        ) from err


class ResNet(_StagedBackbone):
    """torchvision ResNet-18/34/50/101 as a feature extractor, randomly initialised or with
    torchvision's ImageNet weights.

    Args:
        depth: 18, 34, 50 or 101.
        out_indices: stages to return, mmdetection's numbering: 0..3 = C2..C5
            (strides 4, 8, 16, 32). RetinaNet uses ``(1, 2, 3)`` = C3..C5.
        frozen_stages: -1 trains everything, 0 freezes the stem, k freezes stem + stages 1..k.
        norm_eval: keep BatchNorm layers in eval mode during training. Right for pretrained
            weights; when training from scratch pass ``False`` (BN with its initial running
            stats would then be a plain affine layer).
        zero_init_residual: start each residual block's last BN at gamma = 0 (mmdetection's
            default), so every block begins as the identity.
        norm_requires_grad: ``False`` also freezes every BN's weight and bias (mmdetection's
            ``norm_cfg=dict(type="BN", requires_grad=False)``, used by DETR-style configs).
        weights: ``None`` (random), a torchvision weights name (``"IMAGENET1K_V1"``,
            ``"IMAGENET1K_V2"``, ``"DEFAULT"``) or a local torchvision ResNet state-dict file;
            the classifier (``fc.*``) is dropped. A clear error says what to do offline.

    Attributes:
        out_channels: channels of each returned map; strides: their strides.
    """

    def __init__(
        self,
        depth: int = 50,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        zero_init_residual: bool = True,
        norm_requires_grad: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"depth: expected one of {tuple(_RESNETS)}, got {depth!r}")
        builder, channels = _RESNETS[depth]
        self.depth = depth
        self.out_indices = _check_out_indices(out_indices)
        self.frozen_stages = _check_frozen_stages(frozen_stages)
        self.norm_eval = bool(norm_eval)
        net = builder(weights=None, zero_init_residual=zero_init_residual)
        # Keep torchvision's attribute names so its state dicts load into this module.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        if weights is not None:
            state = {
                k: v
                for k, v in _imagenet_state_dict(depth, weights).items()
                if not k.startswith("fc.")
            }
            own = self.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            shape = [k for k in own if k in state and state[k].shape != own[k].shape]
            if missing or unexpected or shape:
                raise ValueError(
                    f"weights: not a ResNet-{depth} state dict (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}, other shapes {shape[:3]})"
                )
            self.load_state_dict(state)
        self.out_channels = [channels[i] for i in self.out_indices]
        self.strides = [_STAGE_STRIDES[i] for i in self.out_indices]
        if not norm_requires_grad:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
        self._freeze_stages()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _conv_norm_relu(c_in: int, c_out: int, stride: int, norm: str) -> nn.Sequential:
    norm_layer = nn.BatchNorm2d(c_out) if norm == "bn" else nn.GroupNorm(min(8, c_out), c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        norm_layer,
        nn.ReLU(inplace=True),
    )


class TinyBackbone(_StagedBackbone):
    """A small plain conv net with ResNet's interface, fast enough to train on a laptop CPU.

    Stem: two stride-2 3x3 conv-norm-ReLU (stride 4). Stage 1 keeps stride 4; stages 2-4 each
    halve the resolution, so stages are at strides 4, 8, 16, 32 like C2..C5.

    Args:
        channels: channels of the four stages.
        out_indices, frozen_stages, norm_eval: as in :class:`ResNet`.
        norm: ``"gn"`` (GroupNorm, independent of the batch size: the default, since CPU
            batches are tiny) or ``"bn"``.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 256),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels: expected four positive ints, got {channels}")
        if norm not in ("gn", "bn"):
            raise ValueError(f"norm: expected 'gn' or 'bn', got {norm!r}")
        self.out_indices = _check_out_indices(out_indices)
        self.frozen_stages = _check_frozen_stages(frozen_stages)
        self.norm_eval = bool(norm_eval)
        stem_channels = max(channels[0] // 2, 8)
        self.stem = nn.Sequential(
            _conv_norm_relu(3, stem_channels, 2, norm),
            _conv_norm_relu(stem_channels, channels[0], 2, norm),
        )
        self.layer1 = _conv_norm_relu(channels[0], channels[0], 1, norm)
        for i in range(1, 4):
            stage = nn.Sequential(
                _conv_norm_relu(channels[i - 1], channels[i], 2, norm),
                _conv_norm_relu(channels[i], channels[i], 1, norm),
            )
            setattr(self, f"layer{i + 1}", stage)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.out_channels = [channels[i] for i in self.out_indices]
        self.strides = [_STAGE_STRIDES[i] for i in self.out_indices]
        self._freeze_stages()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.stem]

    def _stem(self, x: Tensor) -> Tensor:
        return self.stem(x)


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")


def build_backbone(
    name: str,
    out_indices: Sequence[int] = (1, 2, 3),
    frozen_stages: int = -1,
    norm_eval: bool | None = None,
    **kwargs,
) -> ResNet | TinyBackbone:
    """Build a backbone by name: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.

    ``norm_eval=None`` keeps each class's default (True for ResNet as in mmdetection, False
    for the tiny net). Extra keyword arguments go to the constructor.
    """
    if name not in BACKBONES:
        raise ValueError(f"name: unknown backbone {name!r}; expected one of {BACKBONES}")
    if norm_eval is not None:
        kwargs["norm_eval"] = norm_eval
    if name == "tiny":
        return TinyBackbone(out_indices=out_indices, frozen_stages=frozen_stages, **kwargs)
    depth = int(name.removeprefix("resnet"))
    return ResNet(depth, out_indices=out_indices, frozen_stages=frozen_stages, **kwargs)


def detector_backbone_kwargs(name: str, weights: str | os.PathLike | None = None) -> dict:
    """The :func:`build_backbone` options every labkit recipe uses for backbone ``name``.

    Trained from scratch, ResNets train their BatchNorm statistics (``norm_eval=False``); with
    ImageNet ``weights`` they keep them frozen (``norm_eval=True``), as mmdetection does. The
    tiny net has no pretrained weights.
    """
    if name == "tiny":
        if weights is not None:
            raise ValueError("backbone_weights: the tiny backbone has no pretrained weights")
        return {}
    return {"norm_eval": weights is not None, "weights": weights}
