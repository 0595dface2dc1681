"""VOC→COCO conversion on a committed fixture; the tree-crown wheel path on a fake wheel; the CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from labkit.data import CocoDetection
from labkit.data.cli import register
from labkit.data.trees import make_trees, trees_dataset
from labkit.data.voc import parse_voc_xml, voc_to_coco

VOC = Path(__file__).parent / "fixtures" / "voc"


def test_parse_voc_xml():
    rec = parse_voc_xml(VOC / "tiny.xml")
    assert rec["filename"] == "tiny.jpg"
    assert (rec["width"], rec["height"]) == (64, 48)
    assert [o["name"] for o in rec["objects"]] == ["dog", "cat", "cat"]
    assert [o["difficult"] for o in rec["objects"]] == [False, True, False]
    assert rec["objects"][2]["bbox"] == [0.5, 0.0, 10.0, 10.5]


def test_voc_to_coco_fixture():
    coco = voc_to_coco([VOC / "tiny.xml"], VOC)
    # tiny.jpg is absent: the converter falls back to tiny.png, size read from the file
    assert coco["images"] == [{"id": 1, "file_name": "tiny.png", "width": 64, "height": 48}]
    assert coco["categories"] == [
        {"id": 1, "name": "cat", "supercategory": "none"},
        {"id": 2, "name": "dog", "supercategory": "none"},
    ]
    anns = coco["annotations"]
    assert [a["bbox"] for a in anns] == [[4, 6, 26, 34], [35, 10, 25, 34], [0.5, 0, 9.5, 10.5]]
    assert [a["category_id"] for a in anns] == [2, 1, 1]
    assert [a["iscrowd"] for a in anns] == [0, 1, 0]
    assert anns[0]["area"] == 26 * 34
    shifted = voc_to_coco([VOC / "tiny.xml"], VOC, class_names=["dog", "cat"], minus_one=True)
    assert shifted["annotations"][0]["bbox"] == [3, 5, 26, 34]
    assert shifted["annotations"][0]["category_id"] == 1


def test_voc_to_coco_loads_as_dataset(tmp_path):
    ann = tmp_path / "voc.json"
    ann.write_text(json.dumps(voc_to_coco([VOC / "tiny.xml"], VOC)))
    ds = CocoDetection(ann, VOC)
    item = ds[0]
    torch.testing.assert_close(
        item["gt_bboxes"], torch.tensor([[4.0, 6.0, 30.0, 40.0], [0.5, 0.0, 10.0, 10.5]])
    )
    assert item["gt_labels"].tolist() == [1, 0]
    torch.testing.assert_close(item["gt_bboxes_ignore"], torch.tensor([[35.0, 10.0, 60.0, 44.0]]))


def test_voc_errors(tmp_path):
    with pytest.raises(ValueError, match="not in class_names"):
        voc_to_coco([VOC / "tiny.xml"], VOC, class_names=["dog"])
    bad = tmp_path / "bad.xml"
    bad.write_text(
        "<annotation><filename>x.png</filename><object><name>a</name></object></annotation>"
    )
    with pytest.raises(ValueError, match="bndbox"):
        parse_voc_xml(bad)
    bad.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="not valid XML"):
        parse_voc_xml(bad)
    with pytest.raises(ValueError, match="not found"):
        voc_to_coco([VOC / "tiny.xml"], tmp_path)


def _fake_wheel(path: Path, names=("OSBS_029", "SOAP_061")) -> Path:
    xml = (VOC / "tiny.xml").read_text()
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(f"deepforest/data/{name}.xml", xml.replace("tiny.jpg", f"{name}.tif"))
            zf.write(VOC / "tiny.png", f"deepforest/data/{name}.png")
            zf.writestr(f"deepforest/data/{name}.csv", "image_path,xmin\n")
        zf.writestr("deepforest/__init__.py", "")
    return path


def test_make_trees_from_fake_wheel(tmp_path):
    wheel = _fake_wheel(tmp_path / "deepforest-2.1.0-py3-none-any.whl")
    root = tmp_path / "trees"
    manifest = make_trees(root, wheel=wheel, names=("OSBS_029", "SOAP_061"))
    assert manifest["generated"] is True
    assert manifest["counts"] == {"OSBS_029": 3, "SOAP_061": 3}
    assert (root / "images" / "OSBS_029.png").is_file()
    assert (root / "voc" / "SOAP_061.xml").is_file()
    again = make_trees(root, wheel=tmp_path / "missing.whl", names=("OSBS_029", "SOAP_061"))
    assert again["generated"] is False  # cached: the wheel is not even opened
    ds = trees_dataset(root, names=("OSBS_029", "SOAP_061"))
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    assert [ds.img_info(i)["file_name"] for i in range(2)] == ["OSBS_029.png", "SOAP_061.png"]
    assert ds[1]["gt_bboxes"].shape == (2, 4)


def test_make_trees_bad_wheels(tmp_path):
    not_zip = tmp_path / "x.whl"
    not_zip.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a zip"):
        make_trees(tmp_path / "t1", wheel=not_zip)
    partial = _fake_wheel(tmp_path / "p.whl", names=("OSBS_029",))
    with pytest.raises(ValueError, match="SOAP_061.xml"):
        make_trees(tmp_path / "t2", wheel=partial, names=("OSBS_029", "SOAP_061"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_shapes_and_trees(tmp_path, capsys):
    args = _parser().parse_args(
        [
            "data",
            "shapes",
            "--root",
            str(tmp_path / "s"),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--image-size",
            "128",
            "--seed",
            "4",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote 5 files" in out and "instances_train.json" in out
    assert args.func(args) == 0
    assert "up to date" in capsys.readouterr().out
    wheel = _fake_wheel(
        tmp_path / "w.whl", names=("OSBS_029", "SOAP_061", "2019_YELL_2_541000_4977000_image_crop")
    )
    args = _parser().parse_args(
        ["data", "trees", "--root", str(tmp_path / "t"), "--wheel", str(wheel)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "OSBS_029: 3 boxes" in out
    shutil.rmtree(tmp_path / "t")
