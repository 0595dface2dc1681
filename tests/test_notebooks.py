"""Notebook regression: lesson structure, papermill runs vs. recorded-metric baselines, atomic outputs."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import nbformat
import pytest

from labkit import run_notebooks as runner

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
BASELINES = Path(__file__).resolve().parent / "notebook_baselines.json"
NOTEBOOKS = runner.discover(NOTEBOOK_DIR) if NOTEBOOK_DIR.is_dir() else []
PARAMETERS = {"quick": True, "device": "auto", "seed": 0}
# Notebooks that analyse a trained model may also take the user's own (labkit.lessons.trained).
OPTIONAL_PARAMETERS = {"checkpoint": None, "data": None}
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of the whole CI job


def _load_baselines() -> dict:
    return json.loads(BASELINES.read_text(encoding="utf-8"))


def _close(got, want, atol: float, rtol: float) -> bool:
    if isinstance(want, bool) or isinstance(got, bool) or isinstance(want, str):
        return got == want
    if isinstance(want, int | float) and isinstance(got, int | float):
        if math.isnan(want) or math.isnan(got):
            return math.isnan(want) and math.isnan(got)
        return abs(got - want) <= atol + rtol * abs(want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(
            _close(g, w, atol, rtol) for g, w in zip(got, want, strict=True)
        )
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k], atol, rtol) for k in want)
    return got == want


def compare_metrics(recorded: dict, baseline: dict) -> list[str]:
    """Problems with ``recorded`` metrics against ``baseline`` entries (empty list: all good).

    A baseline entry is ``{"value": v, "atol": a, "rtol": r}`` (tolerances default to 0) or a
    bare value compared exactly; numbers pass when ``|got - v| <= a + r * |v|``, lists and dicts
    element by element, strings and bools exactly.
    """
    problems = []
    for name in sorted(recorded.keys() - baseline.keys()):
        problems.append(
            f"metric {name!r} = {recorded[name]!r} was recorded but has no baseline: add it to "
            f"tests/notebook_baselines.json"
        )
    for name in sorted(baseline.keys() - recorded.keys()):
        problems.append(f"baseline metric {name!r} was not recorded by the notebook")
    for name in sorted(baseline.keys() & recorded.keys()):
        entry = baseline[name]
        if isinstance(entry, dict) and "value" in entry:
            want, atol, rtol = entry["value"], entry.get("atol", 0.0), entry.get("rtol", 0.0)
        else:
            want, atol, rtol = entry, 0.0, 0.0
        if not _close(recorded[name], want, atol, rtol):
            problems.append(
                f"metric {name!r} = {recorded[name]!r}, baseline {want!r} (atol {atol}, rtol {rtol})"
            )
    return problems


def _code_cells(book) -> list:
    return [c for c in book.cells if c.cell_type == "code"]


# ---------------------------------------------------------------------------------------------
# Structure of every numbered notebook (fast).


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_a_runnable_lesson(path):
    book = nbformat.read(path, as_version=4)
    spec = book.metadata.get("kernelspec", {})
    assert spec.get("name") == "labkit", (
        f"{path.name}: kernelspec name must be 'labkit', got {spec}"
    )
    assert spec.get("language") == "python", f"{path.name}: kernelspec language must be python"

    code = _code_cells(book)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, (
        f"{path.name}: expected one cell tagged 'parameters', got {len(tagged)}"
    )
    assert code[0] is tagged[0], f"{path.name}: the first code cell must be the parameters cell"
    tree = ast.parse(tagged[0].source)
    assigned = {}
    for stmt in tree.body:
        simple = isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
        assert simple and isinstance(stmt.targets[0], ast.Name), (
            f"{path.name}: the parameters cell may only hold simple assignments"
        )
        assigned[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    optional = {k: v for k, v in assigned.items() if k in OPTIONAL_PARAMETERS}
    assert (
        assigned == {**PARAMETERS, **optional} and optional.items() <= OPTIONAL_PARAMETERS.items()
    ), (
        f"{path.name}: parameters cell must define exactly {PARAMETERS} (and may define "
        f"{OPTIONAL_PARAMETERS}), got {assigned}"
    )

    assert len(code) >= 2, f"{path.name}: the parameters cell must be followed by a setup cell"
    calls = [
        node
        for node in ast.walk(ast.parse(code[1].source))
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setup"
    ]
    assert calls and [getattr(a, "id", None) for a in calls[0].args] == list(PARAMETERS), (
        f"{path.name}: the cell after the parameters must call labkit.notebook.setup(quick, device, seed)"
    )

    assert any(c.cell_type == "markdown" and "Exercise" in c.source for c in book.cells), (
        f"{path.name}: needs an exercises section (a markdown cell containing 'Exercise')"
    )
    unexecuted = [i for i, c in enumerate(code) if c.source.strip() and c.execution_count is None]
    assert not unexecuted, (
        f"{path.name}: commit the notebook executed (code cells {unexecuted} have no outputs yet)"
    )


def test_every_baseline_belongs_to_a_notebook():
    names = {p.name for p in NOTEBOOKS}
    stale = sorted(set(_load_baselines()) - names)
    assert not stale, f"tests/notebook_baselines.json has keys for missing notebooks: {stale}"


def test_compare_metrics_reports_each_problem():
    baseline = {
        "ap": {"value": 0.5, "atol": 0.01, "rtol": 0.0},
        "count": {"value": 10, "atol": 0, "rtol": 0.1},
        "per_level": {"value": [1, 2], "atol": 0.0, "rtol": 0.0},
        "name": "retina",
        "gone": {"value": 1.0},
    }
    recorded = {"ap": 0.505, "count": 11, "per_level": [1, 2], "name": "retina", "new": 3}
    assert compare_metrics(recorded, baseline) == [
        "metric 'new' = 3 was recorded but has no baseline: add it to tests/notebook_baselines.json",
        "baseline metric 'gone' was not recorded by the notebook",
    ]
    recorded = {"ap": 0.52, "count": 12, "per_level": [1, 3], "name": "atss", "gone": 1.0}
    problems = compare_metrics(recorded, baseline)
    assert [p.split(" = ")[0] for p in problems] == [
        "metric 'ap'",
        "metric 'count'",
        "metric 'name'",
        "metric 'per_level'",
    ]


# ---------------------------------------------------------------------------------------------
# Runner writes build outputs atomically (a fake papermill keeps this fast).


def test_runner_publishes_outputs_atomically(tmp_path, monkeypatch, make_notebook):
    import papermill

    src = tmp_path / "nbs" / "01_tiny.ipynb"
    src.parent.mkdir()
    make_notebook(src, "labkit.notebook.record('x', 1)")
    final = tmp_path / "build" / "notebooks" / "01_tiny.ipynb"
    final.parent.mkdir(parents=True)
    final.write_text("OLD")
    seen = {}

    def fake_execute(input_path, output_path, parameters=None, **kwargs):
        out = Path(output_path)
        seen.update(out=out, parameters=parameters, cwd=kwargs.get("cwd"))
        # While papermill writes, the published file is still the old, complete one.
        assert out != final and out.parent == final.parent and out.suffix == ".ipynb"
        assert final.read_text() == "OLD"
        book = nbformat.read(input_path, as_version=4)
        book.cells[3].outputs = [
            nbformat.v4.new_output(
                "display_data",
                data={"application/vnd.labkit.metrics+json": {"x": 1}, "text/plain": "x"},
            )
        ]
        nbformat.write(book, str(out))

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    run = runner.run_notebook(src, tmp_path / "build", quick=False, device="cpu", seed=2)
    assert run.ok, run.error
    assert run.metrics == {"x": 1}
    assert seen["parameters"] == {"quick": False, "device": "cpu", "seed": 2}
    assert seen["cwd"] == str(src.parent)
    assert not seen["out"].exists()  # renamed into place
    assert nbformat.read(final, as_version=4).cells[3].outputs[0].data["text/plain"] == "x"
    assert (
        (tmp_path / "build" / "html" / "01_tiny.html")
        .read_text()
        .lstrip()
        .startswith("<!DOCTYPE html>")
    )
    leftovers = [p.name for p in (tmp_path / "build").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_interrupted_write_keeps_the_old_output(tmp_path):
    final = tmp_path / "out" / "a.ipynb"
    final.parent.mkdir()
    final.write_text("OLD")

    def partial_then_interrupt(tmp):
        tmp.write_text("HALF")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.write_atomic(final, partial_then_interrupt)
    assert final.read_text() == "OLD"
    assert [p.name for p in final.parent.iterdir()] == ["a.ipynb"]


def test_runner_reports_a_notebook_that_never_ran(tmp_path, monkeypatch, make_notebook):
    import papermill

    src = tmp_path / "01_tiny.ipynb"
    make_notebook(src, "pass")

    def no_kernel(*args, **kwargs):
        raise RuntimeError("kernel died")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    run = runner.run_notebook(src, tmp_path / "build", html=False)
    assert run.status == "failed" and "kernel died" in run.error
    assert not (tmp_path / "build" / "notebooks" / "01_tiny.ipynb").exists()


def test_select_by_prefix_topic_and_name(tmp_path, make_notebook):
    for name in ("01_anchors.ipynb", "02_assignment.ipynb", "10_codetr.ipynb"):
        make_notebook(tmp_path / name, "pass")
    paths = runner.discover(tmp_path)
    pick = runner.select
    assert [p.name for p in pick(paths, None)] == [p.name for p in paths]
    assert [p.name for p in pick(paths, ["02", "01_anchors"])] == [
        "01_anchors.ipynb",
        "02_assignment.ipynb",
    ]
    assert [p.name for p in pick(paths, ["codetr"])] == ["10_codetr.ipynb"]
    assert [p.name for p in pick(paths, ["0"])] == ["01_anchors.ipynb", "02_assignment.ipynb"]
    with pytest.raises(ValueError, match="names"):
        pick(paths, ["99"])


# ---------------------------------------------------------------------------------------------
# Every numbered notebook, executed in quick mode on the CPU, reproduces its recorded metrics.


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reproduces_its_metrics(path, tmp_path, labkit_kernel):
    baselines = _load_baselines()
    run = runner.run_notebook(
        path,
        tmp_path,
        quick=True,
        device="cpu",
        seed=0,
        kernel=labkit_kernel,
        timeout=CELL_TIMEOUT_S,
        html=False,
    )
    if not run.ok:
        pytest.fail(f"{path.name} failed under papermill:\n{run.error}", pytrace=False)
    assert path.name in baselines, (
        f"{path.name} has no entry in tests/notebook_baselines.json; it recorded {run.metrics}"
    )
    problems = compare_metrics(run.metrics, baselines[path.name])
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)
