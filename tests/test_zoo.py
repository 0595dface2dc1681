"""The model zoo: train an entry, store float16 weights with a manifest, load and verify them."""

import json

import pytest
import torch

from labkit import zoo

TINY = zoo.ZooEntry(
    "tiny_fcos",
    "fcos",
    {"backbone": "tiny", "fpn_channels": 16, "feat_channels": 16},
    {"data": "shapes", "image_size": 64, "batch_size": 2, "max_iters": 2, "warmup_iters": 0},
    "a two-step FCOS for the tests",
)


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """``tiny_fcos`` trained for two steps into a zoo folder in ``tmp_path``."""
    monkeypatch.setitem(zoo.ZOO, TINY.name, TINY)
    root = tmp_path / "zoo"
    row = zoo.train_entry(TINY.name, seed=3, device="cpu", work_root=tmp_path / "work", root=root)
    return root, row


def test_command_is_a_plain_labkit_train_line(tmp_path):
    argv = TINY.command(3, tmp_path, "cpu")
    assert argv[:3] == ["train", "--model", "fcos"]
    assert "--model-arg" in argv and "backbone='tiny'" in argv
    assert argv[argv.index("--max-iters") + 1] == "2"
    assert argv[argv.index("--seed") + 1] == "3" and "--resume" in argv
    entry = zoo.ZOO["fcos_no_centerness"]
    assert "centerness=False" in entry.command(0, tmp_path)


@pytest.mark.slow
def test_train_store_list_load_and_verify(trained, monkeypatch, capsys):
    root, row = trained
    files = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))  # not the lock
    assert files == [
        "MANIFEST.json",
        "tiny_fcos-seed3.coco.txt",
        "tiny_fcos-seed3.log.jsonl",
        "tiny_fcos-seed3.pth",
    ]
    assert zoo.manifest(root) == [row]
    assert row["sha256"] == zoo.sha256_of(root / row["file"]) and row["device"] == "cpu"
    assert row["command"].startswith("labkit train --model fcos")
    assert row["weights_in_repo"] is False  # seed 3: the repository would not keep its weights
    ckpt = torch.load(root / row["file"], weights_only=True)
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float16}
    assert ckpt["recipe"]["name"] == "fcos" and ckpt["config"]["max_iters"] == 2
    model = zoo.load(TINY.name, seed=3, root=root)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    half = ckpt["model"]["head.conv_cls.weight"]
    torch.testing.assert_close(model.head.conv_cls.weight, half.float())
    # zoo list: the row as text and as JSON
    monkeypatch.setenv("LABKIT_ZOO", str(root))
    from labkit.cli import main

    assert main(["zoo", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [row]
    assert main(["zoo", "list"]) == 0
    assert f"tiny_fcos{' ' * 15}    3" in capsys.readouterr().out


@pytest.mark.slow
def test_a_damaged_zoo_file_is_refused(trained):
    root, row = trained
    path = root / row["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        zoo.load(TINY.name, seed=3, root=root)


def test_unknown_or_untrained_names_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        zoo.load("nope", root=tmp_path)
    with pytest.raises(ValueError, match="seed 0 of 'atss' is not trained"):
        zoo.load("atss", root=tmp_path)
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.train_entry("nope")


def test_train_minutes_counts_each_iteration_once(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"mode": "train", "iter": 10, "time": 0.5},
        {"mode": "train", "iter": 20, "time": 1.0},
        {"mode": "val", "iter": 20, "AP": 0.1},
        # a resume from iteration 10 logs iteration 20 again, then goes on
        {"mode": "train", "iter": 20, "time": 2.0},
        {"mode": "train", "iter": 30, "time": 1.0},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines))
    # 10 x 0.5 + 10 x 2.0 + 10 x 1.0 seconds
    assert zoo._train_minutes(log) == pytest.approx(35 / 60)


def test_compare_gives_mean_and_sample_std_over_seeds(tmp_path):
    rows = [
        {"name": "atss", "seed": s, "AP": ap, "AP50": 0.5}
        for s, ap in ((0, 0.30), (1, 0.34), (2, 0.32))
    ] + [{"name": "retinanet", "seed": 0, "AP": 0.2, "AP50": 0.4}]
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"models": rows}))
    atss, retina, paa = zoo.compare(["atss", "retinanet", "paa"], root=tmp_path)
    assert atss["seeds"] == [0, 1, 2] and atss["n"] == 3
    assert atss["mean"] == pytest.approx(0.32) and atss["std"] == pytest.approx(0.02)
    assert retina["mean"] == pytest.approx(0.2) and retina["std"] is None
    assert paa == {"name": "paa", "seeds": [], "values": [], "n": 0, "mean": None, "std": None}


ROWS = zoo.manifest()


def _first_train_line(path):
    for text in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(text)
        if record.get("mode") == "train":
            return record
    raise AssertionError(f"{path} has no train line")


def test_every_shipped_zoo_file_loads_with_its_hash_verified():
    """Each zoo model whose weights the repository keeps (seed 0 of every name) matches its
    manifest row: hash, size, float16 weights. Every row, kept or not, has its log and table."""
    assert ROWS, "data/zoo/MANIFEST.json lists no model"
    kept = [r for r in ROWS if zoo.weights_in_repo(r)]
    assert [(r["name"], r["seed"]) for r in kept] == sorted({(r["name"], 0) for r in ROWS})
    for row in kept:
        path = zoo.zoo_dir() / row["file"]
        assert path.stat().st_size == row["bytes"] and zoo.sha256_of(path) == row["sha256"]
        model = zoo.load(row["name"], row["seed"])
        assert not model.training
    for row in ROWS:
        assert row["bytes"] <= 8 * 2**20, f"{row['file']} is over the 8 MB budget"
        for suffix in (".coco.txt", ".log.jsonl"):
            assert (zoo.zoo_dir() / row["file"].replace(".pth", suffix)).is_file()
    assert sum(r["bytes"] for r in kept) <= 80 * 2**20, "the zoo is over its 80 MB budget"


def test_git_ignores_exactly_the_weights_the_repository_does_not_keep():
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = zoo.zoo_dir().parents[1]
    names = ["data/zoo/atss-seed0.pth", "data/zoo/atss-seed1.pth", "data/zoo/paa-seed12.pth"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *names], cwd=repo, capture_output=True, text=True
    )
    if done.returncode == 128:
        pytest.skip(f"{repo} is not a git checkout")
    assert done.stdout.split() == names[1:]


def test_a_seed_without_kept_weights_says_how_to_get_them(tmp_path):
    row = {
        "name": "atss",
        "seed": 1,
        "recipe": "atss",
        "file": "atss-seed1.pth",
        "sha256": "0" * 64,
        "bytes": 3_000_000,
        "weights_in_repo": False,
        "AP": 0.214,
        "AP50": 0.333,
        "train_minutes": 23.7,
        "device": "cpu",
    }
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"models": [row]}))
    with pytest.raises(FileNotFoundError, match=r"seed 0 only.*labkit zoo train atss --seed 1"):
        zoo.load("atss", seed=1, root=tmp_path)
    assert not zoo.weights_in_repo(row)
    assert zoo.weights_in_repo({"name": "atss", "seed": 0})  # rows written before the field
    listing = zoo._format_rows([row])
    assert listing.splitlines()[1].endswith("*") and "keeps seed 0's" in listing


# Retraining a prefix costs ~20 s per entry: one seed per zoo name proves the command line
# reproduces its run; the other seeds of that name differ only in --seed.
PREFIX_ROWS = [
    r for r in ROWS if r["seed"] == min(x["seed"] for x in ROWS if x["name"] == r["name"])
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "row", PREFIX_ROWS, ids=[f"{r['name']}-seed{r['seed']}" for r in PREFIX_ROWS]
)
def test_shipped_zoo_entry_reproduces_its_first_logged_losses(row, tmp_path):
    """Retraining the entry from its seed reproduces the logged losses of its first logging
    window.

    The prefix run stops after that window with a constant schedule: the entry's cosine factor
    over the first 50 of 2,800 steps differs from 1 by less than 1e-3, far below the tolerance.
    """
    import argparse

    from labkit.engine import cli as engine_cli

    stored = _first_train_line(zoo.zoo_dir() / row["file"].replace(".pth", ".log.jsonl"))
    argv = zoo.ZOO[row["name"]].command(row["seed"], tmp_path / "prefix", "cpu")
    argv.remove("--resume")
    argv[argv.index("--max-iters") + 1] = str(stored["iter"])
    if "--lr-schedule" in argv:
        argv[argv.index("--lr-schedule") + 1] = "step"
    argv += ["--milestones", "--no-eval", "--no-progress"]
    parser = argparse.ArgumentParser()
    engine_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    again = _first_train_line(tmp_path / "prefix" / "log.jsonl")
    assert again["iter"] == stored["iter"]
    # PAA's re-assignment (a GMM split per object), the DETRs' Hungarian matching and RepPoints'
    # second stage (MaxIoU on the first stage's boxes) are discrete, so the prefix's constant
    # learning rate (within 1e-3 of the cosine's) can move a logged mean by 2-2.5e-3 (PAA;
    # deformable_detr's loss_bbox on a clean clone; reppoints' loss_cls 1.8e-3): allow 5e-3.
    # Two recipes average over a handful of positives chosen discretely: FSAF keeps one level per
    # object (its lowest loss) and Faster R-CNN samples RoIs from the RPN's ranked proposals, so
    # one changed choice moves a term by about 1 % (measured: fsaf loss_cls / loss_bbox 1.1e-2 /
    # 1.3e-2 and its total up to 5.2e-3; faster_rcnn loss_bbox 1.3e-2): they get 2e-2.
    discrete = ("paa", "deformable_detr", "co_deformable_detr", "reppoints")
    few_positives = ("fsaf", "faster_rcnn")
    # bf16 autocast (the *_bf16 entries) rounds every activation to 8 bits of mantissa, which
    # amplifies the constant-vs-cosine learning-rate difference: atss_bf16's loss_cls moved by
    # 6.4e-3 (measured). 1e-2 still tells seeds apart: atss seeds 0-2 log loss_cls 0.804,
    # 0.837 and 0.873 at step 50.
    amp = zoo.ZOO[row["name"]].train_args.get("amp", False)
    if row["recipe"] in few_positives:
        rel = 2e-2
    elif amp:
        rel = 1e-2
    elif row["recipe"] in discrete:
        rel = 5e-3
    else:
        rel = 2e-3
    # The total and the head's own terms: RepPoints logs its box loss per stage
    # (loss_pts_init / loss_pts_refine), Faster R-CNN its RPN's apart from its RoI head's.
    head_terms = ("loss_cls", "loss_bbox", "loss_pts_init", "loss_pts_refine", "loss_rpn_cls")
    keys = ["loss"] + [key for key in head_terms if key in stored]
    assert len(keys) >= 3, f"{row['file']}'s log names no head loss the test knows: {stored}"
    for key in keys:
        assert again[key] == pytest.approx(stored[key], rel=rel), key


EVAL_ROWS = [
    r
    for r in ROWS
    if r["name"] in ("atss", "fcos", "atss_bf16", "fcos_bf16", "fcos_uniform_giou_bf16")
    and r["seed"] == 0
]


@pytest.mark.slow
@pytest.mark.parametrize("row", EVAL_ROWS, ids=[r["name"] for r in EVAL_ROWS])
def test_labkit_eval_on_a_zoo_file_reproduces_the_listed_ap(row, tmp_path, capsys):
    from labkit.cli import main

    out = tmp_path / "metrics.json"
    path = zoo.zoo_dir() / row["file"]
    assert main(["eval", "--checkpoint", str(path), "--no-progress", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert round(metrics["AP"], 4) == row["AP"] and round(metrics["AP50"], 4) == row["AP50"]


def test_metrics_beyond_ap_come_from_the_coco_table(tmp_path):
    row = {"name": "atss", "seed": 0, "AP": 0.3, "file": "atss-seed0.pth"}
    (tmp_path / "atss-seed0.coco.txt").write_text(
        "    AP    AP50    AP75     APs\n 0.301   0.500   0.290   0.100\n\nclass  AP\n"
    )
    assert zoo.row_metric(row, "AP", tmp_path) == 0.3  # the manifest's own field first
    assert zoo.row_metric(row, "AP75", tmp_path) == 0.29
    with pytest.raises(ValueError, match="metric: 'APxl'"):
        zoo.row_metric(row, "APxl", tmp_path)


def test_the_bf16_atss_and_fcos_entries_reach_ap_035():
    """The lessons issue's target for the CPU zoo: ATSS and FCOS at COCO AP >= 0.35 on the
    shapes val split (the number `labkit eval` reproduces, checked above)."""
    for name in ("atss_bf16", "fcos_bf16", "fcos_uniform_giou_bf16"):
        assert zoo.manifest_row(name, 0)["AP"] >= 0.35, name
