"""The labkit command line: help, version, notebooks list/run on a throwaway notebook folder."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import nbformat
import pytest

from labkit import cli
from labkit.notebook import read_metrics


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: labkit")
    for command in ("notebooks", "data", "train", "eval"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: labkit" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == "labkit 0.1.0"


def test_python_dash_m_labkit():
    proc = subprocess.run(
        [sys.executable, "-m", "labkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "labkit 0.1.0"


def test_missing_subcommand_module_is_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.setattr(
        cli,
        "SUBCOMMAND_MODULES",
        (*cli.SUBCOMMAND_MODULES[:1], ("labkit.no_such_module", ("ghost",), "a missing command")),
    )
    assert cli.main(["ghost", "--anything"]) == 2
    assert "labkit ghost: unavailable" in capsys.readouterr().err
    assert cli.main(["notebooks", "list", "--notebook-dir", "."]) == 0


def test_notebooks_list(tmp_path, capsys, make_notebook):
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "1_short.ipynb"):
        make_notebook(tmp_path / name, "pass")
    assert cli.main(["notebooks", "list", "--notebook-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["01_a.ipynb", "02_b.ipynb"]
    assert cli.main(["notebooks", "list", "--notebook-dir", str(tmp_path / "nope")]) == 2


def test_notebooks_run_unknown_name_fails_cleanly(tmp_path, capsys, make_notebook):
    make_notebook(tmp_path / "01_a.ipynb", "pass")
    assert cli.main(["notebooks", "run", "07", "--notebook-dir", str(tmp_path)]) == 2
    assert "no notebook matches '07'" in capsys.readouterr().err


@pytest.mark.slow
def test_notebooks_run_writes_outputs_and_summary(tmp_path, capsys, make_notebook, labkit_kernel):
    nb_dir, out = tmp_path / "nbs", tmp_path / "build"
    nb_dir.mkdir()
    make_notebook(
        nb_dir / "01_ok.ipynb",
        "import os\n"
        "labkit.notebook.record('quick', quick)\n"
        "labkit.notebook.record('seed', seed)\n"
        "labkit.notebook.record('cwd_is_notebook_dir', os.path.isfile('01_ok.ipynb'))\n"
        "labkit.notebook.record('ap', 0.125)",
    )
    make_notebook(nb_dir / "02_fail.ipynb", "raise RuntimeError('deliberate failure')")
    make_notebook(nb_dir / "03_skipped.ipynb", "pass")
    argv = ["notebooks", "run", "01", "02_fail", "--notebook-dir", str(nb_dir)]
    argv += ["--out", str(out), "--device", "cpu", "--seed", "5", "--full", "--no-progress"]
    argv += ["--jobs", "2"]  # worker processes: a failure in one must not stop the other
    status = cli.main(argv)
    captured = capsys.readouterr()

    assert status == 1  # one notebook failed, the other still ran
    expected = {"quick": False, "seed": 5, "cwd_is_notebook_dir": True, "ap": 0.125}
    assert read_metrics(out / "notebooks" / "01_ok.ipynb") == expected
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["01_ok.ipynb", "02_fail.ipynb"]
    assert sorted(p.name for p in (out / "html").iterdir()) == ["01_ok.html", "02_fail.html"]
    assert "<html" in (out / "html" / "01_ok.html").read_text()
    executed = nbformat.read(out / "notebooks" / "01_ok.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters == {"quick": False, "device": "cpu", "seed": 5}

    lines = captured.out.splitlines()
    assert lines[0].split() == ["notebook", "status", "time", "metrics"]
    row = next(line for line in lines if line.startswith("01_ok.ipynb"))
    assert row.split()[1] == "ok" and row.split()[3:] == ["quick", "=", "false"]
    assert any(line.split() == ["ap", "=", "0.125"] for line in lines)
    fail_row = next(line for line in lines if line.startswith("02_fail.ipynb"))
    assert "FAILED" in fail_row and "RuntimeError: deliberate failure" in fail_row
    assert "2 notebook(s), 1 failed" in captured.out
    assert "RuntimeError: deliberate failure" in captured.err

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "full"
    assert [(r["name"], r["status"]) for r in summary["runs"]] == [
        ("01_ok.ipynb", "ok"),
        ("02_fail.ipynb", "failed"),
    ]
    assert summary["runs"][0]["metrics"] == expected


def test_serial_run_keeps_notebook_order_and_options(tmp_path, monkeypatch, capsys, make_notebook):
    from labkit import run_notebooks as runner

    for name in ("02_b.ipynb", "01_a.ipynb", "03_c.ipynb"):
        make_notebook(tmp_path / name, "pass")
    calls = []

    def fake_run(path, out_dir, **options):
        calls.append((path.name, str(out_dir), options))
        return runner.NotebookRun(path.name, "ok", 0.5, metrics={"n": len(calls)})

    monkeypatch.setattr(runner, "run_notebook", fake_run)
    argv = [
        "notebooks",
        "run",
        "03",
        "01",
        "--notebook-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "b"),
    ]
    assert cli.main([*argv, "--timeout", "30", "--no-html"]) == 0
    assert [c[0] for c in calls] == ["01_a.ipynb", "03_c.ipynb"]
    assert calls[0][2] == {
        "progress": True,
        "quick": True,
        "device": "cpu",
        "seed": 0,
        "kernel": "labkit",
        "timeout": 30.0,
        "html": False,
    }
    out = capsys.readouterr().out
    assert "01_a.ipynb  ok" in out and "2 notebook(s), 0 failed" in out


def test_shapes_with_more_training_images_and_crop_training(tmp_path, monkeypatch):
    from labkit.engine import cli as engine_cli

    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    train = engine_cli.build_dataset("shapes:6", "train", (128, 128), crop=64, scale_range=(0.5, 1.0))
    assert len(train) == 6 and (tmp_path / "shapes-n6" / "instances_train.json").is_file()
    item = train[0]
    assert item["img"].shape[1:] == (64, 64)  # a 64-px crop, padded to a multiple of 32
    with pytest.raises(ValueError, match="shapes:N"):
        engine_cli.build_dataset("shapes:x", "train", (128, 128))
    with pytest.raises(argparse.ArgumentTypeError, match="--scale-range"):
        engine_cli.parse_scale_range("1.0,0.5")
    assert engine_cli.parse_scale_range("0.6,1") == (0.6, 1.0)
