"""Batch reruns: ``labkit notebooks run -p NAME VALUE`` and ``--seeds``, metrics across seeds.

papermill's kernel start costs seconds per run, so a stand-in executes the notebook in this
process: papermill's own ``parameterize_notebook`` injects the parameters, every code cell runs
with ``exec``, each ``labkit.notebook.record`` becomes the display output the real kernel shows,
and a failing cell publishes the notebook and raises ``PapermillExecutionError`` as papermill does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import nbformat
import pytest

import labkit.notebook
from labkit import cli
from labkit import run_notebooks as runner
from labkit.notebook import METRICS_MIME, read_metrics

RECORD_SEED = (
    "labkit.notebook.record('metric', seed * 2)\nlabkit.notebook.record('name', f's{seed}')"
)


@pytest.fixture
def papermill_calls(monkeypatch):
    """Replace papermill's execution with the in-process stand-in; returns its calls."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    calls: list[dict] = []
    cell_records: list[tuple[str, object]] = []
    real_record = labkit.notebook.record

    def capture(name, value):
        value = real_record(name, value)
        cell_records.append((name, value))
        return value

    monkeypatch.setattr(labkit.notebook, "record", capture)

    def execute(input_path, output_path, parameters=None, **kwargs):
        calls.append({"input": Path(input_path).name, "output": Path(output_path), **kwargs})
        calls[-1]["parameters"] = dict(parameters)
        book = parameterize_notebook(load_notebook_node(str(input_path)), parameters)
        namespace: dict = {}
        for index, cell in enumerate(book.cells):
            if cell.cell_type != "code":
                continue
            cell_records.clear()
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the kernel's, not ours
                    exec(cell.source, namespace)
            except Exception as err:
                nbformat.write(book, output_path)
                raise PapermillExecutionError(
                    index, index, cell.source, type(err).__name__, str(err), []
                ) from err
            finally:
                cell.outputs = [
                    nbformat.v4.new_output(
                        "display_data", data={METRICS_MIME: {name: value}, "text/plain": name}
                    )
                    for name, value in cell_records
                ]
        nbformat.write(book, output_path)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    return calls


@pytest.fixture
def nb_dir(tmp_path, make_notebook):
    """A notebook folder with ``01_seeded.ipynb``: records ``metric = seed * 2`` and a string."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    make_notebook(folder / "01_seeded.ipynb", RECORD_SEED)
    return folder


def _run(nb_dir: Path, out: Path, *extra: str) -> int:
    argv = ["notebooks", "run", "--notebook-dir", str(nb_dir), "--out", str(out)]
    return cli.main([*argv, "--no-progress", *extra])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# -p NAME VALUE


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("True", True),
        ("False", False),
        ("None", None),
        ("3", 3),
        ("-2", -2),
        ("0.25", 0.25),
        ("1e3", 1000.0),
        ("cpu", "cpu"),
        ("cuda:0", "cuda:0"),
        ("true", "true"),
        ("", ""),
    ],
)
def test_parameter_values_parse_like_papermills_cli(text, value):
    from papermill.cli import _resolve_type

    got = runner.parse_parameter_value(text)
    assert got == value and type(got) is type(value)
    assert got == _resolve_type(text) and type(got) is type(_resolve_type(text))


def test_parameters_reach_the_notebook(tmp_path, papermill_calls, make_notebook, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    make_notebook(
        folder / "01_params.ipynb",
        "labkit.notebook.record('quick', quick)\n"
        "labkit.notebook.record('device', device)\n"
        "labkit.notebook.record('seed', seed)\n"
        "labkit.notebook.record('lr', lr)\n"
        "labkit.notebook.record('tag', tag)",
    )
    out = tmp_path / "build"
    argv = ["-p", "quick", "False", "--parameter", "seed", "3", "-p", "lr", "0.25"]
    assert _run(folder, out, "--no-html", *argv, "-p", "tag", "a b") == 0

    assert [c["parameters"] for c in papermill_calls] == [
        {"quick": False, "device": "cpu", "seed": 3, "lr": 0.25, "tag": "a b"}
    ]
    executed = out / "notebooks" / "01_params.ipynb"  # one run: the plain output path
    assert read_metrics(executed) == {
        "quick": False,
        "device": "cpu",
        "seed": 3,
        "lr": 0.25,
        "tag": "a b",
    }
    injected = [
        c
        for c in nbformat.read(executed, as_version=4).cells
        if "injected-parameters" in c.metadata.get("tags", [])
    ]
    assert len(injected) == 1 and "lr = 0.25" in injected[0].source
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "full"
    assert summary["parameters"] == {"quick": False, "seed": 3, "lr": 0.25, "tag": "a b"}
    assert not (out / "metrics.csv").exists()
    assert "01_params.ipynb  ok" in capsys.readouterr().out


def test_flags_still_map_onto_the_same_parameters(nb_dir, tmp_path, papermill_calls):
    out = tmp_path / "build"
    assert _run(nb_dir, out, "--no-html", "--full", "--device", "auto", "--seed", "4") == 0
    assert papermill_calls[0]["parameters"] == {"quick": False, "device": "auto", "seed": 4}
    assert read_metrics(out / "notebooks" / "01_seeded.ipynb") == {"metric": 8, "name": "s4"}


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--seed", "1", "-p", "seed", "2"], ["--seed", "-p seed"]),
        (["-p", "quick", "True", "--full"], ["--full", "-p quick"]),
        (["--device", "cuda", "-p", "device", "cpu"], ["--device", "-p device"]),
        (["-p", "seed", "2", "--seeds", "0", "1"], ["--seeds", "-p seed"]),
        (["--seed", "1", "--seeds", "0", "1"], ["--seed", "--seeds"]),
    ],
)
def test_flag_and_parameter_setting_the_same_one_is_an_error(
    nb_dir, tmp_path, papermill_calls, capsys, argv, names
):
    assert _run(nb_dir, tmp_path / "build", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit notebooks run: parameter ")
    assert all(name in err for name in names), err
    assert "set twice" in err
    assert papermill_calls == []
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"parameters": {"quick": "no"}}, "quick: expected True or False"),
        ({"parameters": {"seed": 1.5}}, "seed: expected an int"),
        ({"parameters": {"not-a-name": 1}}, "not a Python identifier"),
        ({"seeds": [0, 1, 0]}, r"seed\(s\) \[0\] given more than once"),
        ({"seeds": []}, "at least one seed"),
        ({"full": True, "parameters": {"quick": False}}, "by --full and by -p quick"),
    ],
)
def test_resolve_parameters_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        runner.resolve_parameters(**kwargs)


def test_resolve_parameters_defaults_and_seeds():
    assert runner.resolve_parameters() == ({"quick": True, "device": "cpu", "seed": 0}, None)
    values, seeds = runner.resolve_parameters({"lr": 0.1}, device="cuda", seeds=[2, 5])
    assert values == {"quick": True, "device": "cuda", "seed": 2, "lr": 0.1}
    assert seeds == [2, 5]
    assert runner.parse_parameters([["a", "1"], ["b", "x"], ["a", "2"]]) == {"a": 2, "b": "x"}


# ---------------------------------------------------------------------------------------------
# --seeds


def test_seeds_run_each_notebook_once_per_seed(nb_dir, tmp_path, papermill_calls, capsys):
    out = tmp_path / "build"
    argv = ["notebooks", "run", "--notebook-dir", str(nb_dir), "--out", str(out)]
    assert cli.main([*argv, "--seeds", "0", "1", "2"]) == 0  # with progress bars and HTML
    captured = capsys.readouterr()

    assert [c["parameters"]["seed"] for c in papermill_calls] == [0, 1, 2]
    for seed in (0, 1, 2):
        executed = out / "notebooks" / f"seed{seed}" / "01_seeded.ipynb"
        assert read_metrics(executed) == {"metric": seed * 2, "name": f"s{seed}"}
        assert "<html" in (out / "html" / f"seed{seed}" / "01_seeded.html").read_text()
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["seed0", "seed1", "seed2"]
    assert sorted(p.name for p in (out / "html").iterdir()) == ["seed0", "seed1", "seed2"]

    rows = _csv_rows(out / "metrics.csv")
    assert list(rows[0]) == ["notebook", "metric", "seed0", "seed1", "seed2", "mean", "std", "n"]
    assert rows == [
        {
            "notebook": "01_seeded.ipynb",
            "metric": "metric",
            "seed0": "0",
            "seed1": "2",
            "seed2": "4",
            "mean": "2.0",
            "std": "2.0",
            "n": "3",
        },
        {
            "notebook": "01_seeded.ipynb",
            "metric": "name",
            "seed0": "s0",
            "seed1": "s1",
            "seed2": "s2",
            "mean": "",
            "std": "",
            "n": "3",
        },
    ]
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []

    lines = captured.out.splitlines()
    assert lines[0].split() == [
        "notebook",
        "metric",
        "seed0",
        "seed1",
        "seed2",
        "mean",
        "±",
        "std",
        "n",
    ]
    assert lines[2].split() == ["01_seeded.ipynb", "metric", "0", "2", "4", "2", "±", "2", "3"]
    assert lines[3].split() == ["name", '"s0"', '"s1"', '"s2"', "3"]
    assert "3 run(s) of 1 notebook(s) x 3 seed(s), 0 failed" in captured.out
    assert "3/3" in captured.err  # one progress bar over every run

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    assert [(r["seed"], r["status"]) for r in summary["runs"]] == [(0, "ok"), (1, "ok"), (2, "ok")]


def test_failed_seed_is_reported_and_exits_non_zero(
    tmp_path, papermill_calls, make_notebook, capsys
):
    folder = tmp_path / "nbs"
    folder.mkdir()
    body = RECORD_SEED + "\nif seed == 1:\n    raise RuntimeError('seed 1 diverged')"
    make_notebook(folder / "01_flaky.ipynb", body)
    make_notebook(folder / "02_steady.ipynb", "labkit.notebook.record('ap', 0.5 + seed)")
    out = tmp_path / "build"
    assert _run(folder, out, "--no-html", "--seeds", "0", "1", "2") == 1
    captured = capsys.readouterr()

    assert len(papermill_calls) == 6  # the failure did not stop the other runs
    # A failing run is still published, showing the error.
    assert (out / "notebooks" / "seed1" / "01_flaky.ipynb").exists()
    rows = {(r["notebook"], r["metric"]): r for r in _csv_rows(out / "metrics.csv")}
    assert list(rows) == [
        ("01_flaky.ipynb", "metric"),
        ("01_flaky.ipynb", "name"),
        ("02_steady.ipynb", "ap"),
    ]
    flaky = rows["01_flaky.ipynb", "metric"]
    assert [flaky[f"seed{s}"] for s in range(3)] == ["0", "failed", "4"]
    assert (flaky["mean"], flaky["std"], flaky["n"]) == ("2.0", repr(8**0.5), "2")
    name = rows["01_flaky.ipynb", "name"]
    assert [name[f"seed{s}"] for s in range(3)] == ["s0", "failed", "s2"]
    assert (name["mean"], name["std"], name["n"]) == ("", "", "2")
    steady = rows["02_steady.ipynb", "ap"]
    assert (steady["mean"], steady["std"], steady["n"]) == ("1.5", "1.0", "3")

    row = next(line for line in captured.out.splitlines() if line.startswith("01_flaky"))
    assert row.split() == ["01_flaky.ipynb", "metric", "0", "failed", "4", "2", "±", "2.828", "2"]
    failed = [line for line in captured.out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert failed[0].startswith("FAILED 01_flaky.ipynb seed1: cell ")
    assert failed[0].endswith(": RuntimeError: seed 1 diverged")
    assert "6 run(s) of 2 notebook(s) x 3 seed(s), 1 failed" in captured.out
    assert "01_flaky.ipynb seed 1 failed" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["ok", "failed", "ok", "ok", "ok", "ok"]


def test_one_seed_has_no_std(nb_dir, tmp_path, papermill_calls, capsys):
    out = tmp_path / "build"
    assert _run(nb_dir, out, "--no-html", "--seeds", "4") == 0
    assert read_metrics(out / "notebooks" / "seed4" / "01_seeded.ipynb")["metric"] == 8
    metric = _csv_rows(out / "metrics.csv")[0]
    assert (metric["seed4"], metric["mean"], metric["std"], metric["n"]) == ("8", "8.0", "", "1")
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("01_seeded")
    )
    assert row.split() == ["01_seeded.ipynb", "metric", "8", "8", "±", "-", "1"]


def test_plain_run_keeps_its_output_paths(nb_dir, tmp_path, papermill_calls):
    out = tmp_path / "build"
    assert _run(nb_dir, out) == 0
    assert [p.name for p in (out / "notebooks").iterdir()] == ["01_seeded.ipynb"]
    assert [p.name for p in (out / "html").iterdir()] == ["01_seeded.html"]
    assert sorted(p.name for p in out.iterdir()) == ["html", "notebooks", "summary.json"]
    assert papermill_calls[0]["parameters"] == {"quick": True, "device": "cpu", "seed": 0}


# ---------------------------------------------------------------------------------------------
# The table itself


def _nb_run(name, seed, metrics=None, status="ok", error=None):
    return runner.NotebookRun(name, status, 1.0, metrics=metrics or {}, error=error, seed=seed)


def test_metrics_table_handles_non_numeric_missing_and_all_failed():
    runs = [
        _nb_run("01_a.ipynb", 0, {"ok": True, "sizes": [1, 2], "loss": 1.0, "mixed": 1}),
        _nb_run("01_a.ipynb", 1, {"ok": False, "sizes": [3], "mixed": "x"}),
        _nb_run("02_b.ipynb", 0, status="failed", error="RuntimeError: boom"),
        _nb_run("02_b.ipynb", 1, status="failed", error="RuntimeError: boom"),
    ]
    seeds, rows = runner.metrics_table(runs)
    assert seeds == [0, 1]
    table = {(r.notebook, r.metric): (r.values, r.mean, r.std, r.n) for r in rows}
    assert table == {
        ("01_a.ipynb", "ok"): ({0: True, 1: False}, None, None, 2),
        ("01_a.ipynb", "sizes"): ({0: [1, 2], 1: [3]}, None, None, 2),
        ("01_a.ipynb", "loss"): ({0: 1.0}, 1.0, None, 1),  # seed 1 did not record it
        ("01_a.ipynb", "mixed"): ({0: 1, 1: "x"}, None, None, 2),
        ("02_b.ipynb", ""): ({0: runner.FAILED, 1: runner.FAILED}, None, None, 0),
    }
    text = runner.metrics_csv(runs).splitlines()
    assert text[0] == "notebook,metric,seed0,seed1,mean,std,n"
    assert text[1:] == [
        "01_a.ipynb,ok,true,false,,,2",
        '01_a.ipynb,sizes,"[1, 2]",[3],,,2',
        "01_a.ipynb,loss,1.0,,1.0,,1",
        "01_a.ipynb,mixed,1,x,,,2",
        "02_b.ipynb,,failed,failed,,,0",
    ]
    printed = runner.format_metrics_table(runs).splitlines()
    assert printed[4].split() == ["loss", "1", "-", "1", "±", "-", "1"]
    assert printed[6].split() == ["02_b.ipynb", "-", "failed", "failed", "0"]
    assert printed[-1] == "4 run(s) of 2 notebook(s) x 2 seed(s), 2 failed"


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "soon"])
def test_non_positive_timeout_is_refused(nb_dir, tmp_path, papermill_calls, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        _run(nb_dir, tmp_path / "build", f"--timeout={value}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(
        "error: argument --timeout: expected a positive number of seconds (omit the option "
        f"for no limit), got {value!r}"
    )
    assert papermill_calls == []


def test_positive_timeout_reaches_papermill(nb_dir, tmp_path, papermill_calls):
    assert _run(nb_dir, tmp_path / "build", "--no-html", "--timeout", "2.5") == 0
    assert papermill_calls[0]["execution_timeout"] == 2.5
