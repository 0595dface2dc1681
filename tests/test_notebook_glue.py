"""Notebook glue: setup seeds and banner, pick, record/read_metrics round trip, show_source."""

from __future__ import annotations

import json
import random

import matplotlib as mpl
import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import labkit.notebook as nb


def test_setup_returns_session_and_prints_banner(capsys):
    session = nb.setup(quick=True, device="cpu", seed=0)
    assert session == nb.Session(quick=True, device=torch.device("cpu"), seed=0)
    assert capsys.readouterr().out == "labkit 0.1.0 | device cpu | quick mode | seed 0\n"
    nb.setup(quick=False, device="cpu", seed=7)
    assert capsys.readouterr().out == "labkit 0.1.0 | device cpu | full mode | seed 7\n"


def test_setup_seeds_python_numpy_torch():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    nb.setup(seed=3, device="cpu")
    first = draw()
    nb.setup(seed=3, device="cpu")
    assert draw() == first
    nb.setup(seed=4, device="cpu")
    assert draw() != first


def test_setup_fixes_figure_geometry():
    mpl.rcParams["figure.figsize"] = (10.0, 10.0)
    nb.setup(device="cpu")
    assert tuple(mpl.rcParams["figure.figsize"]) == nb.FIGSIZE
    assert mpl.rcParams["figure.dpi"] == nb.DPI


@pytest.mark.parametrize(("kwargs", "name"), [({"quick": "yes"}, "quick"), ({"seed": 1.5}, "seed")])
def test_setup_rejects_bad_arguments(kwargs, name):
    with pytest.raises(TypeError, match=name):
        nb.setup(device="cpu", **kwargs)


def test_pick_follows_the_session():
    session = nb.setup(quick=True, device="cpu")
    assert nb.pick(10, 1000) == 10 and session.pick("a", "b") == "a"
    session = nb.setup(quick=False, device="cpu")
    assert nb.pick(10, 1000) == 1000 and session.pick("a", "b") == "b"


def test_record_outside_ipython_prints_and_converts(capsys):
    nb.setup(device="cpu")
    capsys.readouterr()
    assert nb.record("ap", torch.tensor(0.5)) == 0.5
    assert nb.record("counts", np.array([1, 2])) == [1, 2]
    assert capsys.readouterr().out == "[labkit metric] ap = 0.5\n[labkit metric] counts = [1, 2]\n"
    assert nb.recorded() == {"ap": 0.5, "counts": [1, 2]}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_record_rejects_values_json_cannot_hold(value):
    with pytest.raises(ValueError, match="value"):
        nb.record("bad", value)


def test_record_rejects_bad_name():
    with pytest.raises(TypeError, match="name"):
        nb.record("", 1)


def _notebook_with(outputs_per_cell):
    book = new_notebook()
    book.cells = [new_markdown_cell(f"{nb.METRICS_MIME}")]  # markdown is never read
    for outputs in outputs_per_cell:
        cell = new_code_cell("pass")
        cell.outputs = outputs
        book.cells.append(cell)
    return book


def test_record_in_ipython_displays_bundle_read_back(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr(nb, "in_ipython", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append((obj, raw)))
    nb.record("num_anchors", 182403)
    nb.record("ap", 0.25)
    nb.record("ap", 0.5)  # a later record of the same name wins
    assert shown[0] == (
        {
            nb.METRICS_MIME: {"num_anchors": 182403},
            "text/plain": "[labkit metric] num_anchors = 182403",
        },
        True,
    )
    book = _notebook_with([[new_output("display_data", data=b)] for b, _ in shown])
    expected = {"num_anchors": 182403, "ap": 0.5}
    assert nb.read_metrics(book) == expected
    path = tmp_path / "x.ipynb"
    nbformat.write(book, path)
    assert nb.read_metrics(path) == expected
    assert nb.read_metrics(str(path)) == expected


def test_read_metrics_accepts_json_text_payload_and_ignores_other_outputs():
    book = _notebook_with(
        [
            [new_output("stream", name="stdout", text="hello")],
            [new_output("display_data", data={"text/plain": "x"})],
            [
                new_output(
                    "execute_result",
                    data={nb.METRICS_MIME: json.dumps({"a": 1})},
                    execution_count=1,
                )
            ],
        ]
    )
    assert nb.read_metrics(book) == {"a": 1}
    assert nb.read_metrics(_notebook_with([])) == {}


def test_read_metrics_rejects_non_notebooks():
    with pytest.raises(TypeError, match="notebook"):
        nb.read_metrics({"not": "a notebook"})


def test_show_source_plain_outside_ipython(capsys):
    nb.show_source(nb.pick)
    out = capsys.readouterr().out
    assert out.startswith("def pick(quick_value: Any, full_value: Any) -> Any:\n")
    assert "return quick_value if quick else full_value" in out


def test_show_source_highlighted_in_ipython(monkeypatch):
    from IPython.display import Code

    shown = []
    monkeypatch.setattr(nb, "in_ipython", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    nb.show_source(nb.pick)
    assert isinstance(shown[0], Code)
    assert "def pick" in shown[0].data
    assert "<span" in shown[0]._repr_html_()  # pygments markup


def test_show_source_rejects_builtins():
    with pytest.raises(TypeError, match="obj"):
        nb.show_source(len)


def test_explorer_headless_draws_defaults_without_widgets(monkeypatch, capsys):
    from labkit import notebook

    monkeypatch.setenv(notebook.HEADLESS_ENV, "1")
    calls = []

    def controls(widgets):
        raise AssertionError("no widget may be built in a headless run")

    notebook.explorer(lambda a, b: calls.append((a, b)), {"a": 1, "b": "x"}, controls)
    assert calls == [(1, "x")]
    assert "open the notebook in JupyterLab" in capsys.readouterr().out


def test_explorer_live_builds_an_interactive_widget(monkeypatch):
    import ipywidgets
    from IPython import display as ipy_display

    from labkit import notebook

    monkeypatch.delenv(notebook.HEADLESS_ENV, raising=False)
    shown, calls = [], []
    monkeypatch.setattr(ipy_display, "display", lambda obj: shown.append(obj))
    notebook.explorer(
        lambda a: calls.append(a),
        {"a": 3},
        lambda widgets: {"a": widgets.IntSlider(value=3, min=0, max=5)},
    )
    assert len(shown) == 1 and isinstance(shown[0], ipywidgets.interactive)
    assert calls == [3]  # interactive draws once with the initial value
    shown[0].children[0].value = 5
    assert calls == [3, 5]
