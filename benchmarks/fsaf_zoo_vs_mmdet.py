"""The zoo's FSAF against mmdetection's own FSAFHead: same weights, same shapes batches, same loss.

Why: the zoo's ``fsaf`` reaches AP 0.002 where FCOS reaches 0.17 with the same backbone, data and
schedule. This script tells a labkit bug from the setting: it loads the trained zoo model, copies
its head's weights into mmdetection 3.3.0's ``FSAFHead`` (``fsaf_r50_fpn_1x_coco.py``'s head and
train_cfg, sized to the tiny model) through labkit's key map, and computes both heads' losses on
the zoo's training batches (320-px crops), ignored boxes included. It prints the largest loss
differences; then, from the same targets, how many objects get any positive anchor, the positives
per object, and mmdetection's ``pos_recall`` (with FSAF's default ``score_threshold=None``: the
top-1 accuracy of the classifier on the positive anchors; chance is 1 / number of classes).

Run it in an environment with mmdetection 3.3.0 / mmengine / mmcv (``mmcv._ext`` is stood in as in
``mmdet_fixtures.py``; FSAF's loss calls none of it), with labkit on the path::

    PYTHONPATH=. /tmp/mmdet-venv/bin/python benchmarks/fsaf_zoo_vs_mmdet.py --batches 16

Results are in benchmarks/RESULTS.md ("FoveaBox, FSAF, RepPoints and Faster R-CNN in the zoo").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmdet_fixtures import install_mmcv_ext_stub  # noqa: E402


def mmdet_fsaf_head(head: torch.nn.Module, stacked_convs: int):
    """mmdetection's FSAFHead for the config ``fsaf_r50_fpn_1x_coco.py`` with ``head``'s
    sizes and weights."""
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from labkit.convert.mmdet_keys import mmdet_key_map

    register_all_modules()
    configs = Path(mmdet.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(configs / "fsaf" / "fsaf_r50_fpn_1x_coco.py"))
    head_cfg = cfg.model.bbox_head
    head_cfg.num_classes = head.retina_cls.out_channels
    head_cfg.in_channels = head_cfg.feat_channels = head.retina_cls.in_channels
    head_cfg.stacked_convs = stacked_convs
    head_cfg.train_cfg, head_cfg.test_cfg = cfg.model.train_cfg, cfg.model.test_cfg
    mm_head = MODELS.build(head_cfg)
    ours = head.state_dict()
    key_map = mmdet_key_map("fsaf", stacked_convs=stacked_convs)
    state = {
        mm_key.removeprefix("bbox_head."): ours[lk_key.removeprefix("head.")]
        for mm_key, lk_key in key_map.items()
        if mm_key.startswith("bbox_head.")
    }
    mm_head.load_state_dict(state, strict=True)
    return mm_head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16, help="batches of 4 training images")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed of fsaf")
    args = parser.parse_args(argv)

    install_mmcv_ext_stub()
    from mmengine.structures import InstanceData

    from labkit import zoo
    from labkit.data import collate
    from labkit.data.spec import build_dataset

    model = zoo.load("fsaf", seed=args.seed).float()
    head = model.head
    stacked = sum(isinstance(m, torch.nn.Conv2d) for m in head.cls_convs.modules())
    mm_head = mmdet_fsaf_head(head, stacked)
    entry = zoo.ZOO["fsaf"].command(args.seed, Path("unused"), "cpu")
    spec = entry[entry.index("--data") + 1]
    crop = int(entry[entry.index("--train-crop") + 1])
    low, high = (float(v) for v in entry[entry.index("--scale-range") + 1].split(","))
    data = build_dataset(spec, "train", (512, 512), crop=crop, scale_range=(low, high))
    torch.manual_seed(0)

    recall, diff_cls, diff_bbox = [], [], []
    objects = covered = positives = 0
    for b in range(args.batches):
        batch = collate([data[i] for i in range(4 * b, 4 * b + 4)])
        n = len(batch["gt_bboxes"])
        gts = [
            InstanceData(bboxes=batch["gt_bboxes"][i], labels=batch["gt_labels"][i])
            for i in range(n)
        ]
        ignored = [InstanceData(bboxes=batch["gt_bboxes_ignore"][i]) for i in range(n)]
        metas = [
            {
                "img_shape": batch["img_metas"][i]["img_shape"],
                "pad_shape": batch["img_metas"][i]["pad_shape"],
                "batch_input_shape": tuple(batch["img"].shape[-2:]),
            }
            for i in range(n)
        ]
        with torch.no_grad():
            feats = model.neck(model.backbone(batch["img"]))
            ours, targets = head.loss_and_targets(feats, batch)
            theirs = mm_head.loss_by_feat(*mm_head(feats), gts, metas, ignored)
        recall.append(float(theirs["pos_recall"]))
        for gt_boxes, gt_inds in zip(batch["gt_bboxes"], targets.pos_gt_inds, strict=True):
            objects += len(gt_boxes)
            covered += gt_inds.unique().numel()
            positives += gt_inds.numel()
        diff_cls.append(abs(float(ours["loss_cls"]) - float(sum(theirs["loss_cls"]))))
        diff_bbox.append(abs(float(ours["loss_bbox"]) - float(sum(theirs["loss_bbox"]))))

    print(f"fsaf seed {args.seed}, {args.batches} batches of 4 training crops ({crop} px)")
    print("| quantity | value |\n|---|---|")
    print(f"| max abs loss_cls difference, labkit - mmdet | {max(diff_cls):.2e} |")
    print(f"| max abs loss_bbox difference, labkit - mmdet | {max(diff_bbox):.2e} |")
    print(f"| objects | {objects} |")
    print(
        f"| objects with at least one positive anchor | {covered} ({100 * covered / objects:.1f} %) |"
    )
    print(f"| positive anchors per object | {positives / objects:.2f} |")
    chance = 100 / head.retina_cls.out_channels
    print(
        f"| mmdet pos_recall: top-1 accuracy on the positives, % (chance {chance:.0f}), "
        f"mean [min, max] over batches | {statistics.mean(recall):.1f} "
        f"[{min(recall):.1f}, {max(recall):.1f}] |"
    )


if __name__ == "__main__":
    main()
