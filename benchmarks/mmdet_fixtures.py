"""Write the mmdetection conformance fixtures of ``labkit.convert.from_mmdet`` (not run in CI).

For each case, build mmdetection 3.3.0's own model from its shipped config (num_classes 3,
no pretrained init), fill it with ``labkit.convert.seeded_state_dict`` weights (from key
names, shapes and a seed), run eval-mode inference on a seeded 1x3x96x128 input and save,
in ``tests/fixtures/mmdet/<case>.pt`` (read with ``torch.load(weights_only=True)``):
key names and shapes (never the weights), the seeds, the input shape, the raw head outputs
per level, the final detections of mmdetection's own post-processing (its ``test_cfg`` is
stored too), the config and the mmdet / mmengine / mmcv / torch versions.
``tests/test_convert_mmdet.py`` rebuilds the weights, converts them and compares.
(``co_deformable_detr.pt`` comes from ``benchmarks/codetr_fixtures.py``: Co-DETR runs on its
own mmdetection 2.x and mmcv 1.x, in another throwaway environment.)

Deformable-DETR cases (``deformable_detr``, ``deformable_detr_refine``,
``deformable_detr_refine_twostage``: the three shipped configs) use 20 queries and keep 30
detections; they store each decoder layer's class logits and boxes (``all_cls_scores``,
``all_bbox_preds``), for two-stage also the encoder proposals (``enc_outputs_class``,
``enc_outputs_coord``, read from ``pre_decoder`` with the detector's own ``training`` flag
set, which only decides whether mmdetection returns them), and ``tied``: the keys of one
shared parameter (the prediction branches without box refinement), so the test rebuilds the
weights the model really held. The two-stage case pads its 80x112 image to 96x128, so the
padding masks, valid ratios and masked proposals are exercised too.

RepPoints cases store the head's training-mode outputs (class logits, init and refined points
per level; the head's ``training`` flag is set for that call only, it changes nothing but what
``forward`` returns) and its eval-mode pseudo boxes (``pseudo_bboxes``). ``reppoints`` is the
shipped ``reppoints-moment_r50_fpn_1x_coco`` (no GroupNorm); ``reppoints_gn_neck_head`` the
shipped ``reppoints-moment_r50_fpn-gn_head-gn_1x_coco`` unchanged (the zoo's "gn-neck+head":
GroupNorm after every FPN conv and in the head towers); ``reppoints_minmax_gn_head`` is the
shipped ``reppoints-minmax_r50_fpn-gn_head-gn_1x_coco`` with its FPN's GroupNorm removed, so
the GroupNorm towers under a plain FPN and another transform are exercised. The
``reppoints`` fixture also lists, under ``refused``, how the key names and shapes of a
shipped config labkit refuses differ from its own (grid points, with a GroupNorm FPN).

Run it in a throwaway environment, never in labkit's own (``.venv`` is reused for torch):

    /work/main/.venv/bin/python -m venv --system-site-packages /tmp/mmdet-venv
    /tmp/mmdet-venv/bin/pip install mmengine==0.10.7 mmdet==3.3.0 "mmcv-lite==2.1.0"
    echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/mmdet-venv/lib/python3.11/site-packages/zz_labkit_venv.pth
    OMP_NUM_THREADS=1 /tmp/mmdet-venv/bin/python -m benchmarks.mmdet_fixtures [CASE ...]

(the ``.pth`` line puts labkit's torch/torchvision after the throwaway venv's own packages).

Stubs. ``mmcv-lite`` is mmcv without its compiled extension ``mmcv._ext``; every
``mmcv.ops`` module asserts at import time that the functions it needs exist there. This
script registers a stand-in ``mmcv._ext`` module before importing mmdet, so all of mmcv's and
mmdet's Python code is the real one, and only these compiled kernels are replaced:

- ``mmcv._ext.nms(boxes, scores, iou_threshold, offset)``: ``torchvision.ops.nms`` (offset 0
  only; indices sorted by decreasing score, as mmcv's kernel); mmcv's own ``nms`` /
  ``batched_nms`` wrappers (class offsets, ``split_thr``) run unchanged on top of it;
- ``mmcv._ext.roi_align_forward(...)``: ``torchvision.ops.roi_align`` written into mmcv's
  output buffer (``pool_mode`` avg only, ``aligned`` and ``sampling_ratio`` passed through;
  mmcv's and torchvision's kernels are the same detectron2 algorithm);
- ``mmcv._ext.deform_conv_forward(...)`` (under ``mmcv.ops.DeformConv2d``, RepPoints):
  ``torchvision.ops.deform_conv2d`` (no bias, no mask) written into mmcv's output buffer;
  stride, padding and dilation passed through, the group counts checked against the shapes
  (torchvision infers them). The offset layouts agree: both kernels read kernel point
  ``(i, j)``'s ``dy`` from offset channel ``2 (i * k_w + j)`` and its ``dx`` from the next
  (mmcv: ``data_offset_h_ptr`` / ``_w_ptr`` in ``ops/csrc/pytorch/cpu/deform_conv.cpp``), and
  sample bilinearly with zeros outside the map the same way. Before any case runs, the stub
  is checked against a line-by-line Python transcription of mmcv's CPU kernel
  (``mmcv_deform_conv_reference``) on random offsets that reach outside the map. mmcv's
  ``DeformConv2d.forward`` (zero-padding maps smaller than the kernel, then cropping) runs
  unchanged on top;
- every other ``mmcv._ext`` name: a placeholder that raises ``NotImplementedError`` if called;
  the script fails if any placeholder ran (none of these models' inference calls one).

mmcv's ``MultiScaleDeformableAttention`` needs no stub: it calls the compiled
``ms_deform_attn_forward`` only for CUDA tensors and otherwise runs mmcv's own pure-PyTorch
``multi_scale_deformable_attn_pytorch`` (``grid_sample``), which is what runs here.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import types
from pathlib import Path

import torch
import torchvision

from labkit.convert import seeded_state_dict

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "mmdet"
SEED = 0
INPUT_SEED = 1
INPUT_SHAPE = (1, 3, 96, 128)
NUM_CLASSES = 3

# recipe -> (mmdetection config under mmdet/.mim/configs, labkit from_mmdet kwargs)
CASES = {
    "retinanet": ("retinanet/retinanet_r50_fpn_1x_coco.py", {}),
    "atss": ("atss/atss_r50_fpn_1x_coco.py", {}),
    # the pytorch-style ResNet FCOS; the 1x "tricks" config has a caffe-style ResNet
    "fcos": (
        "fcos/fcos_r50_fpn_gn-head-center-normbbox-centeronreg-giou_8xb8-amp-lsj-200e_coco.py",
        {"norm_on_bbox": True, "centerness_on_reg": True, "center_sampling": True},
    ),
    "paa": ("paa/paa_r50_fpn_1x_coco.py", {}),
    "foveabox": ("foveabox/fovea_r50_fpn_4xb4-1x_coco.py", {}),
    "fsaf": ("fsaf/fsaf_r50_fpn_1x_coco.py", {}),
    "reppoints": ("reppoints/reppoints-moment_r50_fpn_1x_coco.py", {}),
    "faster_rcnn": ("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", {}),
}
# case -> (recipe, shipped config, from_mmdet kwargs, changes to it under cfg.model): a shipped
# config changed only where labkit has no counterpart
VARIANT_CASES = {
    "reppoints_gn_neck_head": (
        "reppoints",
        "reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py",
        {},  # fpn_norm and norm come from the keys
        {},  # the shipped config as it is
    ),
    "reppoints_minmax_gn_head": (
        "reppoints",
        "reppoints/reppoints-minmax_r50_fpn-gn_head-gn_1x_coco.py",
        {"transform": "minmax"},  # no key tells minmax from partial_minmax
        {"neck.norm_cfg": None},  # GroupNorm towers under a plain FPN
    ),
}
# case -> shipped configs labkit refuses, whose key differences the case's fixture lists
REFUSED = {
    "reppoints": ("reppoints/reppoints-bbox_r50_fpn-gn_head-gn-grid_1x_coco.py",),  # grid points
}
# case -> (config, labkit from_mmdet kwargs, img_shape inside INPUT_SHAPE); recipe deformable_detr
DETR_QUERIES = 20
DETR_MAX_PER_IMG = 30  # topk over queries x classes must not ask for more than 60
_DETR_KWARGS = {"num_queries": DETR_QUERIES, "max_per_img": DETR_MAX_PER_IMG}
DETR_CASES = {
    "deformable_detr": ("deformable-detr_r50_16xb2-50e_coco.py", _DETR_KWARGS, (96, 128)),
    "deformable_detr_refine": (
        "deformable-detr-refine_r50_16xb2-50e_coco.py",
        _DETR_KWARGS,
        (96, 128),
    ),
    "deformable_detr_refine_twostage": (
        "deformable-detr-refine-twostage_r50_16xb2-50e_coco.py",
        _DETR_KWARGS,
        (80, 112),
    ),
}

PLACEHOLDER_CALLS: list[str] = []


def _ext_nms(boxes, scores, iou_threshold, offset=0):
    if offset != 0:
        raise NotImplementedError("stub mmcv._ext.nms: offset=1 (legacy boxes) not supported")
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _ext_roi_align_forward(
    input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
    spatial_scale, sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    if pool_mode != 1:
        raise NotImplementedError("stub mmcv._ext.roi_align_forward: only pool_mode='avg'")
    output.copy_(
        torchvision.ops.roi_align(
            input,
            rois,
            (aligned_height, aligned_width),
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
    )


def _ext_deform_conv_forward(
    input, weight, offset, output, columns, ones, *, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, im2col_step,
):  # fmt: skip
    # torchvision infers both group counts from the shapes: they must be the ones asked for
    if (
        input.shape[1] != weight.shape[1] * group
        or offset.shape[1] != 2 * deformable_group * kH * kW
    ):
        raise NotImplementedError("stub mmcv._ext.deform_conv_forward: groups do not fit shapes")
    output.copy_(
        torchvision.ops.deform_conv2d(
            input,
            offset,
            weight,
            stride=(dH, dW),
            padding=(padH, padW),
            dilation=(dilationH, dilationW),
        )
    )


def mmcv_deform_conv_reference(x, offset, weight, padding: int) -> torch.Tensor:
    """mmcv's CPU deformable convolution transcribed loop by loop (``deformable_im2col_cpu_kernel``
    and ``deformable_im2col_bilinear_cpu`` of ``mmcv/ops/csrc/pytorch/cpu/deform_conv.cpp``, then
    the GEMM), stride 1, dilation 1, one group, in float64. x: [B, C, H, W]; offset:
    [B, 2 * kh * kw, H_out, W_out]; weight: [C_out, C, kh, kw] -> [B, C_out, H_out, W_out]."""
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    h_out, w_out = offset.shape[-2:]

    def bilinear(img, y, xx):
        if y <= -1 or h <= y or xx <= -1 or w <= xx:
            return 0.0
        y0, x0 = math.floor(y), math.floor(xx)
        ly, lx = y - y0, xx - x0
        corners = (
            (y0, x0, (1 - ly) * (1 - lx)),
            (y0, x0 + 1, (1 - ly) * lx),
            (y0 + 1, x0, ly * (1 - lx)),
            (y0 + 1, x0 + 1, ly * lx),
        )
        return sum(wt * img[yy, xc] for yy, xc, wt in corners if 0 <= yy < h and 0 <= xc < w)

    columns = torch.zeros(b, c, kh, kw, h_out, w_out, dtype=torch.float64)
    for n, ch, i, j, r, q in itertools.product(
        range(b), range(c), range(kh), range(kw), range(h_out), range(w_out)
    ):
        offset_h = float(offset[n, 2 * (i * kw + j), r, q])  # data_offset_h_ptr
        offset_w = float(offset[n, 2 * (i * kw + j) + 1, r, q])  # data_offset_w_ptr
        h_im, w_im = r - padding + i + offset_h, q - padding + j + offset_w
        if h_im > -1 and w_im > -1 and h_im < h and w_im < w:
            columns[n, ch, i, j, r, q] = bilinear(x[n, ch].double(), h_im, w_im)
    return torch.einsum("ocij,ncijrq->norq", weight.double(), columns)


def check_deform_conv_stub() -> float:
    """Max abs difference of the ``deform_conv_forward`` stub from mmcv's transcribed kernel on
    random inputs whose offsets (up to +-3 pixels) reach outside the 4x5 map; raises above 1e-9."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    offset = 3 * torch.randn(2, 18, 4, 5, generator=g, dtype=torch.float64)
    out = x.new_empty(2, 4, 4, 5)
    _ext_deform_conv_forward(
        x, weight, offset, out, None, None, kW=3, kH=3, dW=1, dH=1, padW=1, padH=1,
        dilationW=1, dilationH=1, group=1, deformable_group=1, im2col_step=2,
    )  # fmt: skip
    diff = float((out - mmcv_deform_conv_reference(x, offset, weight, 1)).abs().max())
    if not diff <= 1e-9:
        raise SystemExit(f"deform_conv_forward stub differs from mmcv's kernel by {diff:.3g}")
    return diff


def install_mmcv_ext_stub() -> None:
    """Register the stand-in ``mmcv._ext`` (see the module docstring) before mmdet is imported."""
    ext = types.ModuleType("mmcv._ext")
    ext.nms = _ext_nms
    ext.roi_align_forward = _ext_roi_align_forward
    ext.deform_conv_forward = _ext_deform_conv_forward

    def placeholder(name: str):
        def call(*args, **kwargs):
            PLACEHOLDER_CALLS.append(name)
            raise NotImplementedError(f"mmcv._ext.{name} is a placeholder in this script")

        return call

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(name)

    ext.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = ext


def build_mmdet(config: str, changes: dict | None = None):
    """mmdetection's model for ``config`` with 3 classes and no pretrained init, eval mode;
    ``changes``: ``{dotted key under cfg.model: value}``."""
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / config))
    cfg.model.backbone.init_cfg = None
    if changes:
        cfg.merge_from_dict({f"model.{k}": v for k, v in changes.items()})
    if cfg.model.type == "DeformableDETR":
        cfg.model.num_queries = DETR_QUERIES
        cfg.model.test_cfg.max_per_img = DETR_MAX_PER_IMG
    if "roi_head" in cfg.model:
        cfg.model.roi_head.bbox_head.num_classes = NUM_CLASSES
    else:
        cfg.model.bbox_head.num_classes = NUM_CLASSES
    return MODELS.build(cfg.model).eval(), cfg


def _floats(tensors) -> list[torch.Tensor]:
    return [t.detach().float().clone() for t in tensors]


def _instances(inst) -> dict:
    return {
        "boxes": inst.bboxes.float().clone(),
        "scores": inst.scores.float().clone(),
        "labels": inst.labels.clone(),
    }


def _tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: source_key}`` for keys sharing one parameter; ``load_state_dict`` copies each key
    in order, so the group's last key is the value the model keeps."""
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        if value.numel():
            groups.setdefault(value.data_ptr(), []).append(key)
    return {k: keys[-1] for keys in groups.values() for k in keys[:-1]}


def _detr_outputs(model, feats, sample) -> dict:
    """Per-decoder-layer outputs and (two-stage) the encoder proposals of mmdetection's DETR."""
    enc_inputs, dec_inputs = model.pre_transformer(feats, [sample])
    enc_outputs = model.forward_encoder(**enc_inputs)
    model.training = True  # only makes pre_decoder return the proposals; modules stay in eval
    try:
        pre_dec, proposals = model.pre_decoder(**enc_outputs)
    finally:
        model.training = False
    dec_outputs = model.forward_decoder(**pre_dec, **dec_inputs)
    cls_scores, bbox_preds = model.bbox_head(**dec_outputs)
    outputs = {
        "all_cls_scores": cls_scores.float().clone(),
        "all_bbox_preds": bbox_preds.float().clone(),
    }
    if model.as_two_stage:
        outputs["enc_outputs_class"] = proposals["enc_outputs_class"].float().clone()
        outputs["enc_outputs_coord"] = proposals["enc_outputs_coord"].float().clone()
    return outputs


def _reppoints_outputs(model, feats) -> tuple[dict, list[torch.Tensor]]:
    """RepPoints' per-level (class logits, init points, refined points), which its forward
    returns only in training mode, and the eval-mode pseudo boxes of the refined points."""
    head = model.bbox_head
    head.training = True  # only what forward returns; the GroupNorm and convs are unchanged
    try:
        cls_scores, pts_init, pts_refine = head(feats)
    finally:
        head.training = False
    _, pseudo_bboxes = head(feats)
    outputs = {
        "cls_scores": _floats(cls_scores),
        "pts_preds_init": _floats(pts_init),
        "pts_preds_refine": _floats(pts_refine),
    }
    return outputs, _floats(pseudo_bboxes)


def _key_differences(shapes: dict, config: str) -> dict:
    """How the state dict of shipped ``config`` differs from ``shapes`` (``{key: shape}``):
    ``removed`` keys, and ``shapes`` of the keys it adds or reshapes."""
    other = {k: tuple(v.shape) for k, v in build_mmdet(config)[0].state_dict().items()}
    return {
        "removed": [k for k in shapes if k not in other],
        "shapes": {k: list(s) for k, s in other.items() if shapes.get(k) != s},
    }


def run_case(case: str) -> dict:
    """Build, fill, run mmdetection's model of ``case``; the fixture dict."""
    import mmcv
    import mmdet
    import mmengine
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import bbox2roi

    h, w = INPUT_SHAPE[-2:]
    changes = None
    if case in CASES:
        recipe, (config, kwargs), (img_h, img_w) = case, CASES[case], (h, w)
    elif case in VARIANT_CASES:
        recipe, config, kwargs, changes = VARIANT_CASES[case]
        img_h, img_w = h, w
    else:
        recipe = "deformable_detr"
        config, kwargs, (img_h, img_w) = DETR_CASES[case]
        config = f"deformable_detr/{config}"
    model, cfg = build_mmdet(config, changes)
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    tied = _tied_keys(own)
    model.load_state_dict(seeded_state_dict(shapes, SEED), strict=True)
    expected = seeded_state_dict(shapes, SEED, tied)
    held = [k for k, v in model.state_dict().items() if not torch.equal(v, expected[k])]
    if held:
        raise SystemExit(f"{case}: tied keys do not describe the loaded model: {held[:5]}")

    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))
    img_meta = {
        "img_shape": (img_h, img_w),
        "ori_shape": (img_h, img_w),
        "pad_shape": (h, w),
        "batch_input_shape": (h, w),
        "scale_factor": (1.0, 1.0),
    }
    sample = DetDataSample(metainfo=img_meta)
    fixture = {
        "recipe": recipe,
        "from_mmdet_kwargs": kwargs,
        "mmdet_config": config,
        "config_changes": changes or {},
        "model_cfg": cfg.model.pretty_text if hasattr(cfg.model, "pretty_text") else str(cfg.model),
        "versions": {
            "mmdet": str(mmdet.__version__),
            "mmengine": str(mmengine.__version__),
            "mmcv": str(mmcv.__version__),
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
        },
        "stubs": [
            "mmcv._ext.nms -> torchvision.ops.nms",
            "mmcv._ext.roi_align_forward -> torchvision.ops.roi_align",
            "mmcv._ext.deform_conv_forward -> torchvision.ops.deform_conv2d",
            "other mmcv._ext names: raising placeholders",
        ],
        "seed": SEED,
        "keys": list(shapes),
        "shapes": [list(s) for s in shapes.values()],
        "tied": tied,
        "input_seed": INPUT_SEED,
        "input_shape": list(INPUT_SHAPE),
        "img_meta": {k: list(v) for k, v in img_meta.items()},
        "test_cfg": cfg.model.test_cfg.to_dict(),
    }
    if case in REFUSED:
        fixture["refused"] = {c: _key_differences(shapes, c) for c in REFUSED[case]}
    with torch.no_grad():
        feats = model.extract_feat(x)
        if recipe == "deformable_detr":
            fixture["outputs"] = _detr_outputs(model, feats, sample)
        elif recipe == "faster_rcnn":
            rpn_cls, rpn_reg = model.rpn_head(feats)
            proposals = model.rpn_head.predict_by_feat(
                rpn_cls, rpn_reg, batch_img_metas=[img_meta], cfg=model.test_cfg.rpn, rescale=False
            )[0]
            rois = bbox2roi([proposals.bboxes])
            roi = model.roi_head._bbox_forward(feats, rois)
            fixture["outputs"] = {
                "rpn_cls_scores": _floats(rpn_cls),
                "rpn_bbox_preds": _floats(rpn_reg),
            }
            fixture["proposals"] = {
                "boxes": proposals.bboxes.float().clone(),
                "scores": proposals.scores.float().clone(),
            }
            fixture["roi_outputs"] = {
                "cls_score": roi["cls_score"].float().clone(),
                "bbox_pred": roi["bbox_pred"].float().clone(),
            }
        elif recipe == "reppoints":
            fixture["outputs"], fixture["pseudo_bboxes"] = _reppoints_outputs(model, feats)
        else:
            outs = model.bbox_head(feats)
            names = ["cls_scores", "bbox_preds", "centernesses"][: len(outs)]
            fixture["outputs"] = {n: _floats(o) for n, o in zip(names, outs, strict=True)}
        result = model.predict(x, [sample], rescale=True)[0]
    fixture["detections"] = _instances(result.pred_instances)
    return fixture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cases = [*CASES, *VARIANT_CASES, *DETR_CASES]
    parser.add_argument("cases", nargs="*", help=f"some of {cases} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(cases)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {cases}")
    install_mmcv_ext_stub()
    print(f"deform_conv_forward stub vs mmcv's kernel: max abs diff {check_deform_conv_stub():.2g}")
    OUT.mkdir(parents=True, exist_ok=True)
    for case in args.cases or cases:
        fixture = run_case(case)
        if PLACEHOLDER_CALLS:
            raise SystemExit(f"{case}: stubbed mmcv ops were called: {PLACEHOLDER_CALLS}")
        path = OUT / f"{case}.pt"
        torch.save(fixture, path)
        det = fixture["detections"]
        print(
            f"{case}: {len(fixture['keys'])} keys, {det['boxes'].shape[0]} detections, "
            f"score range {det['scores'].min():.3f}-{det['scores'].max():.3f}, "
            f"{path.stat().st_size / 1024:.0f} KB -> {path.relative_to(ROOT)}"
        )


if __name__ == "__main__":
    main()
