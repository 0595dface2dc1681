"""Recorded zoo comparisons: the claim rule, the seed table and the logged curves."""

import json

import pytest

from labkit.lessons import recorded


def _zoo(tmp_path, values: dict[str, list[float]]):
    """A zoo folder whose manifest holds ``values[name][seed]`` as AP (AP50 = 2 x AP)."""
    rows = []
    for name, aps in values.items():
        for seed, ap in enumerate(aps):
            rows.append({"name": name, "seed": seed, "AP": ap, "AP50": 2 * ap, "file": "x"})
            log = [  # as the engine writes them: a train line, then the val line at its iteration
                {"mode": "train", "iter": 50, "loss": 2.0},
                {"mode": "train", "iter": 100, "loss": 1.0 + seed},
                {"mode": "val", "iter": 100, "AP": ap / 2},
                {"mode": "val", "iter": 200, "AP": ap},
            ]
            text = "\n".join(json.dumps(r) for r in log) + "\n"
            (tmp_path / f"{name}-seed{seed}.log.jsonl").write_text(text)
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"models": rows}))
    return tmp_path


def test_a_difference_counts_only_beyond_the_summed_spread(tmp_path):
    # a: mean 0.30, std 0.01; b: mean 0.25, std 0.01 -> difference 0.05 > spread 0.02
    root = _zoo(tmp_path, {"a": [0.29, 0.30, 0.31], "b": [0.24, 0.25, 0.26], "c": [0.27, 0.31]})
    c = recorded.claim("a", "b", root=root)
    assert c.verdict == "above" and c.n_first == 3 and c.n_second == 3
    assert c.difference == pytest.approx(0.05) and c.spread == pytest.approx(0.02)
    assert recorded.claim("b", "a", root=root).verdict == "below"
    # c: mean 0.29, std 0.02828; a - c = 0.01 < 0.01 + 0.0283 -> noise
    within = recorded.claim("a", "c", root=root)
    assert within.verdict == "within noise" and "within noise" in within.sentence
    assert within.spread == pytest.approx(0.01 + 0.04 / 2**0.5)


def test_one_seed_is_never_a_claim(tmp_path):
    root = _zoo(tmp_path, {"a": [0.5], "b": [0.1, 0.11]})
    c = recorded.claim("a", "b", root=root)
    assert c.verdict == "too few seeds" and c.difference is None
    assert "1 and 2 recorded" in c.sentence
    assert recorded.claim("a", "untrained", root=root).n_second == 0


def test_seed_table_lists_mean_std_and_every_seed(tmp_path):
    root = _zoo(tmp_path, {"a": [0.29, 0.30, 0.31], "b": [0.4]})
    table = recorded.seed_table(["a", "b", "nobody"], ("AP", "AP50"), root=root).splitlines()
    assert table[1].split()[:2] == ["a", "3"]
    assert "0.300 ± 0.010" in table[1] and "0.600 ± 0.020" in table[1]
    assert "s0: 0.290, s1: 0.300, s2: 0.310" in table[1]
    assert "0.400 ± n/a" in table[2]
    assert table[3].split()[:2] == ["nobody", "0"] and "not trained" in table[3]


def test_curves_come_from_the_log(tmp_path):
    root = _zoo(tmp_path, {"a": [0.3, 0.5]})
    assert recorded.val_curve("a", 1, root=root) == ([100, 200], [0.25, 0.5])
    assert recorded.loss_curve("a", 1, root=root) == ([50, 100], [2.0, 2.0])
    assert recorded.mean_of("a", root=root) == pytest.approx(0.4)
    assert recorded.mean_of("nobody", root=root) is None
    with pytest.raises(FileNotFoundError, match="name, seed"):
        recorded.val_curve("a", 7, root=root)


def test_comparison_figure_has_a_line_per_seed_and_a_whisker(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from labkit.viz.recorded import plot_recorded_comparison

    root = _zoo(tmp_path, {"a": [0.3, 0.5], "b": [0.2]})
    fig = plot_recorded_comparison(["a", "b", "nobody"], root=root)
    curves, finals = fig.axes
    assert len(curves.lines) == 3  # two seeds of a, one of b
    labels = [t.get_text() for t in finals.get_xticklabels()]
    assert labels == ["a\n(n = 2)", "b\n(n = 1)", "nobody\nnot trained"]
    assert len(finals.containers) == 1  # one mean ± std whisker: only a has two seeds


def test_zoo_compare_command_prints_the_table_and_the_verdicts(tmp_path, monkeypatch, capsys):
    from labkit.cli import main

    root = _zoo(tmp_path, {"atss": [0.29, 0.30, 0.31], "retinanet": [0.24, 0.25, 0.26]})
    monkeypatch.setenv("LABKIT_ZOO", str(root))
    assert main(["zoo", "compare", "atss", "retinanet", "paa"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["atss", "3"] and out[3].split()[:2] == ["paa", "0"]
    assert out[5].startswith("atss is above retinanet; AP 0.300 vs 0.250")
    assert out[6].startswith("atss vs paa: 3 and 0 recorded seed(s)")
    with pytest.raises(SystemExit, match="unknown zoo names"):
        main(["zoo", "compare", "atss", "nope"])


def test_object_sizes_counts_coco_small_and_box_sides(tmp_path):
    from labkit.data import CocoDetection

    def ann(i, w, h, area, crowd=0):  # COCO's area (here a mask's) and bbox [x, y, w, h]
        return {"id": i, "image_id": 1, "category_id": 1, "bbox": [0, 0, w, h], "area": area,
                "iscrowd": crowd}  # fmt: skip

    anns = [ann(1, 10, 10, 80), ann(2, 20, 20, 300), ann(3, 40, 40, 1500), ann(4, 15, 17, 200),
            ann(5, 5, 5, 20, crowd=1)]  # fmt: skip
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": anns, "categories": [{"id": 1, "name": "box"}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))
    sizes = recorded.object_sizes(CocoDetection(tmp_path / "ann.json", tmp_path, check_files=False))
    # the crowd box is not an object; areas 80, 300, 200 < 32^2 = 1024; sides 10 and
    # sqrt(15 * 17) = 15.97 are under 16 px, 20 and 40 are not
    assert sizes == {"objects": 4, "coco_small": 0.75, "under_side": 0.5}


def test_seed_table_every_seed_lists_each_seed_under_each_metric(tmp_path):
    root = _zoo(tmp_path, {"a": [0.29, 0.30, 0.31], "nobody": []})
    table = recorded.seed_table(["a", "nobody"], ("AP", "AP50"), root=root, every_seed=True)
    lines = table.splitlines()
    assert "per seed" not in lines[0] and len(lines) == 1 + 1 + 3 + 1
    assert "0.300 ± 0.010" in lines[1] and "0.600 ± 0.020" in lines[1]
    assert lines[2].split() == ["seed", "0", "0.290", "0.580"]
    assert lines[4].split() == ["seed", "2", "0.310", "0.620"]
    # every value sits under its metric's column (the end of "AP mean ± std" ~ the mean's end)
    assert lines[2].index("0.290") == lines[1].index("0.300")
    assert lines[2].index("0.580") == lines[1].index("0.600")
    assert lines[5].split()[:2] == ["nobody", "0"] and "not trained" in lines[5]
