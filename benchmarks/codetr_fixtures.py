"""Write the Co-DETR conformance fixture of ``labkit.convert.from_mmdet`` (not run in CI).

Co-DETR is not part of mmdetection's package: Sense-X/Co-DETR ships its own copy of
mmdetection 2.25.3 (``mmdet/``, changed in places) plus ``projects/`` (``CoDETR``,
``CoDeformDETRHead``, ``CoDeformableDetrTransformer``, ``CoATSSHead``, ``CoStandardRoIHead``)
and runs on mmcv 1.x. This script builds Co-DETR's own model from its shipped
``projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py`` with that code, fills
it with ``labkit.convert.seeded_state_dict`` weights (from key names, shapes and a seed), runs
eval-mode inference on a seeded 1x3x128x160 batch holding one 112x144 image (bottom-right
padding, so the padding masks, valid ratios and masked proposals are exercised) and saves
``tests/fixtures/mmdet/co_deformable_detr.pt`` (read with ``torch.load(weights_only=True)``):
key names and shapes (never the weights), the seeds, the input and image shapes, and

- the query head's outputs (``CoDeformDETRHead.forward``): class logits and boxes per decoder
  layer (``all_cls_scores [6, 1, Q, 3]``, ``all_bbox_preds [6, 1, Q, 4]``), the encoder
  proposals (``enc_outputs_class [1, sum(hw), 3]``, ``enc_outputs_coord``, sigmoid) and the
  extra stride-128 level it adds to the encoder memory for the auxiliary heads
  (``downsample``, ``[1, 256, 1, 2]``);
- ``detections``: the query head's own post-processing (``simple_test``, rescale; the script
  checks that ``CoDETR.simple_test`` -- the detector's test path, ``eval_module='detr'`` --
  gives the same boxes);
- the auxiliary heads' raw outputs on the encoder maps (strides 8-128), which only training
  uses: ATSS's per-level ``cls_scores``, ``bbox_preds``, ``centernesses``, the RPN's per-level
  ``rpn_cls_scores``, ``rpn_bbox_preds``, and the RoI head's ``cls_score`` / ``bbox_pred`` on
  the fixed ``ROIS`` (chosen to reach all four RoI levels of ``finest_scale=112``).

Changes to the shipped config, all sizes: 3 classes (every head), ``num_query=20`` (the query
embedding's rows; the two-stage top-k takes as many proposals as there are query embeddings,
nothing else depends on it) and the query head's ``test_cfg.max_per_img=30`` (top-k over
20 queries x 3 classes cannot take the shipped 100); no pretrained backbone.

Run it in a throwaway environment, never in labkit's own (``.venv`` is reused for torch),
with Co-DETR's source at commit ``CODETR_COMMIT`` unpacked in ``CODETR_SRC`` (its ``mmdet``,
``projects`` and ``mmcv_custom`` folders):

    /work/main/.venv/bin/python -m venv --system-site-packages /tmp/codetr-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/codetr-venv/lib/python3.11/site-packages/zz_labkit_venv.pth
    /tmp/codetr-venv/bin/pip install "wheel<0.45"
    MMCV_WITH_OPS=0 /tmp/codetr-venv/bin/pip install --no-build-isolation mmcv==1.7.0
    /tmp/codetr-venv/bin/pip install --no-build-isolation fairscale==0.4.13 timm fvcore \\
        einops terminaltables pycocotools six
    CODETR_SRC=/tmp/codetr-src OMP_NUM_THREADS=1 PYTHONPATH=$PWD \\
        /tmp/codetr-venv/bin/python -m benchmarks.codetr_fixtures

mmcv 1.7.0 is the newest Co-DETR's ``mmdet/__init__.py`` accepts; ``MMCV_WITH_OPS=0`` builds it
without its compiled extension (``--no-build-isolation`` so the build uses the venv's own
setuptools, which still has ``pkg_resources``). fairscale, timm, fvcore and einops are only
imported (Co-DETR's ViT / Swin backbones and its ``mmdet/models/utils/transformer.py`` import
them); none of their code runs here.

Stubs. As in ``benchmarks/mmdet_fixtures.py``, a stand-in ``mmcv._ext`` module is registered
before anything imports mmcv's ops (each ``mmcv.ops`` module asserts at import time that its
kernels exist there), so all of mmcv's, mmdetection's and Co-DETR's Python code is the real one:

- ``mmcv._ext.roi_align_forward`` -> ``torchvision.ops.roi_align`` (the RoI head's
  ``SingleRoIExtractor``; see ``mmdet_fixtures`` for the argument mapping);
- ``mmcv._ext.nms`` -> ``torchvision.ops.nms`` and ``deform_conv_forward`` ->
  ``torchvision.ops.deform_conv2d``: installed, never called (the query head keeps its top
  ``max_per_img`` without NMS; no deformable convolution in this model). The script counts
  the calls of these three stubs, fails unless only RoIAlign ran, and stores the counts
  (``stub_calls``);
- every other ``mmcv._ext`` name: a placeholder that raises ``NotImplementedError``; the script
  fails if any ran.

mmcv's ``MultiScaleDeformableAttention`` needs no stub: on CPU tensors it runs mmcv's own
pure-PyTorch ``multi_scale_deformable_attn_pytorch`` (``grid_sample``), as here; its compiled
``ms_deform_attn_forward`` is a placeholder and never called.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

from benchmarks.mmdet_fixtures import (
    PLACEHOLDER_CALLS,
    _floats,
    _tied_keys,
    install_mmcv_ext_stub,
)
from labkit.convert import seeded_state_dict

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "mmdet" / "co_deformable_detr.pt"
CODETR_COMMIT = "26653521e47157fdd819e764b4bb949057ea9f3b"
CONFIG = "projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py"
SEED = 0
INPUT_SEED = 1
INPUT_SHAPE = (1, 3, 128, 160)
IMG_SHAPE = (112, 144)  # the image inside the padded batch
NUM_CLASSES = 3
NUM_QUERIES = 20
MAX_PER_IMG = 30
# (x1, y1, x2, y2) in pixels; scales 34, 87, 125 -> RoI level 0, 250 -> 1, 514 -> 2, 1000 -> 3
ROIS = [
    [10.0, 12.0, 40.0, 50.0],
    [60.0, 20.0, 130.0, 100.0],
    [0.0, 0.0, 144.0, 112.0],
    [-50.0, -40.0, 200.0, 210.0],
    [-200.0, -150.0, 350.0, 330.0],
    [-400.0, -400.0, 600.0, 600.0],
]
FROM_MMDET_KWARGS = {"max_per_img": MAX_PER_IMG}  # the rest comes from the keys


def build_codetr(src: Path):
    """Co-DETR's ``CoDETR`` for the shipped config with the changes above, eval mode."""
    import projects  # noqa: F401  (registers CoDETR, CoDeformDETRHead, ... with mmdet 2.x)
    from mmcv import Config
    from mmdet.models import build_detector

    cfg = Config.fromfile(str(src / CONFIG))
    cfg.model.backbone.init_cfg = None
    cfg.model.query_head.num_query = NUM_QUERIES
    cfg.model.query_head.num_classes = NUM_CLASSES
    cfg.model.roi_head[0].bbox_head.num_classes = NUM_CLASSES
    cfg.model.bbox_head[0].num_classes = NUM_CLASSES
    cfg.model.test_cfg[0].max_per_img = MAX_PER_IMG
    return build_detector(cfg.model).eval(), cfg


def run(src: Path) -> dict:
    """Build, fill and run Co-DETR; the fixture dict."""
    import mmcv
    import mmdet
    from mmdet.core import bbox2result, bbox2roi

    model, cfg = build_codetr(src)
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    tied = _tied_keys(own)
    if tied:
        raise SystemExit(f"Co-DETR shares parameters across keys, not expected here: {tied}")
    model.load_state_dict(seeded_state_dict(shapes, SEED), strict=True)

    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))
    (h, w), (pad_h, pad_w) = IMG_SHAPE, INPUT_SHAPE[-2:]
    # mmdetection 2.x metas: (h, w, 3) shapes, a 4-entry scale factor
    img_metas = [
        {
            "img_shape": (h, w, 3),
            "ori_shape": (h, w, 3),
            "pad_shape": (pad_h, pad_w, 3),
            "batch_input_shape": (pad_h, pad_w),
            "scale_factor": np.ones(4, dtype=np.float32),
        }
    ]
    with torch.no_grad():
        feats = model.extract_feat(x)
        head = model.query_head
        all_cls, all_bbox, enc_cls, enc_coord, maps = head(feats, img_metas)
        ((det_bboxes, det_labels),) = head.simple_test(feats, img_metas, rescale=True)
        test_path = model.simple_test(x, copy.deepcopy(img_metas), rescale=True)[0]
        atss_cls, atss_reg, atss_ctr = model.bbox_head[0](maps)
        rpn_cls, rpn_reg = model.rpn_head(maps)
        roi = model.roi_head[0]._bbox_forward(maps, bbox2roi([torch.tensor(ROIS)]))
    expected = bbox2result(det_bboxes, det_labels, NUM_CLASSES)
    if not all(np.array_equal(a, b) for a, b in zip(expected, test_path, strict=True)):
        raise SystemExit("CoDETR.simple_test and query_head.simple_test disagree")
    return {
        "recipe": "co_deformable_detr",
        "from_mmdet_kwargs": FROM_MMDET_KWARGS,
        "mmdet_config": CONFIG,
        "config_changes": {
            "query_head.num_query": NUM_QUERIES,
            "num_classes (query_head, roi_head[0].bbox_head, bbox_head[0])": NUM_CLASSES,
            "test_cfg[0].max_per_img": MAX_PER_IMG,
            "backbone.init_cfg": None,
        },
        "model_cfg": (src / CONFIG).read_text(),  # the shipped file; changes above
        "versions": {
            "codetr": CODETR_COMMIT,
            "mmdet": str(mmdet.__version__),
            "mmcv": str(mmcv.__version__),
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "numpy": str(np.__version__),
        },
        "stubs": [
            "mmcv._ext.roi_align_forward -> torchvision.ops.roi_align",
            "mmcv._ext.nms -> torchvision.ops.nms (not called)",
            "mmcv._ext.deform_conv_forward -> torchvision.ops.deform_conv2d (not called)",
            "other mmcv._ext names: raising placeholders (none called)",
        ],
        "seed": SEED,
        "keys": list(shapes),
        "shapes": [list(s) for s in shapes.values()],
        "tied": tied,
        "input_seed": INPUT_SEED,
        "input_shape": list(INPUT_SHAPE),
        # labkit's form of the metas (the ones above, with 2-entry shapes)
        "img_meta": {
            "img_shape": [h, w],
            "ori_shape": [h, w],
            "pad_shape": [pad_h, pad_w],
            "batch_input_shape": [pad_h, pad_w],
            "scale_factor": [1.0, 1.0],
        },
        "test_cfg": dict(cfg.model.test_cfg[0]),
        "outputs": {
            "all_cls_scores": all_cls.float().clone(),
            "all_bbox_preds": all_bbox.float().clone(),
            "enc_outputs_class": enc_cls.float().clone(),
            "enc_outputs_coord": enc_coord.float().clone(),
        },
        "downsample": maps[-1].float().clone(),
        "detections": {
            "boxes": det_bboxes[:, :4].float().clone(),
            "scores": det_bboxes[:, 4].float().clone(),
            "labels": det_labels.clone(),
        },
        "aux_outputs": {
            "atss": {
                "cls_scores": _floats(atss_cls),
                "bbox_preds": _floats(atss_reg),
                "centernesses": _floats(atss_ctr),
            },
            "rpn": {"rpn_cls_scores": _floats(rpn_cls), "rpn_bbox_preds": _floats(rpn_reg)},
            "rois": torch.tensor(ROIS),
            "roi": {
                "cls_score": roi["cls_score"].float().clone(),
                "bbox_pred": roi["bbox_pred"].float().clone(),
            },
        },
    }


def count_stub_calls() -> dict[str, int]:
    """Wrap the three real stubs of the installed ``mmcv._ext`` so each call is counted;
    returns the live ``{name: calls}``."""
    ext = sys.modules["mmcv._ext"]
    calls = dict.fromkeys(("nms", "roi_align_forward", "deform_conv_forward"), 0)

    def counted(name: str, kernel):
        def call(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)

        return call

    for name in calls:
        setattr(ext, name, counted(name, getattr(ext, name)))
    return calls


def main() -> None:
    src = Path(os.environ.get("CODETR_SRC", "/tmp/codetr-src")).resolve()
    if not (src / CONFIG).is_file() or not (src / "mmdet" / "__init__.py").is_file():
        raise SystemExit(f"CODETR_SRC: no Co-DETR source (mmdet/, projects/) at {src}")
    sys.path.insert(0, str(src))  # Co-DETR's own mmdet 2.25.3 and projects/
    warnings.filterwarnings("ignore")
    install_mmcv_ext_stub()
    calls = count_stub_calls()
    from mmcv.utils import get_logger

    get_logger("mmcv").setLevel(logging.WARNING)  # init_weights' report on every parameter
    fixture = run(src)
    if PLACEHOLDER_CALLS:
        raise SystemExit(f"stubbed mmcv ops were called: {PLACEHOLDER_CALLS}")
    if calls["nms"] or calls["deform_conv_forward"] or not calls["roi_align_forward"]:
        raise SystemExit(f"expected RoIAlign alone of the stubbed kernels to run, got {calls}")
    fixture["stub_calls"] = dict(calls)
    torch.save(fixture, OUT)
    det = fixture["detections"]
    print(
        f"co_deformable_detr: {len(fixture['keys'])} keys, {det['boxes'].shape[0]} detections, "
        f"score range {det['scores'].min():.3f}-{det['scores'].max():.3f}, "
        f"{OUT.stat().st_size / 1024:.0f} KB -> {OUT.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
