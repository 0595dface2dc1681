"""Batch-run the numbered notebooks with papermill into build/ and print their recorded metrics.

``labkit notebooks run`` runs each selected notebook once with the parameters ``quick``,
``device`` and ``seed`` (and any ``-p NAME VALUE``); ``--seeds 0 1 2`` runs each once per seed
into ``OUT/notebooks/seedN/`` and summarizes every recorded metric across the seeds
(``mean ± std``) in a table and ``OUT/metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from labkit.files import write_atomic
from labkit.notebook import HEADLESS_ENV

__all__ = [
    "FAILED",
    "MetricRow",
    "NotebookRun",
    "discover",
    "ensure_kernel",
    "execute_notebook",
    "format_metrics_table",
    "format_summary",
    "metrics_csv",
    "metrics_table",
    "parse_parameter_value",
    "parse_parameters",
    "register",
    "resolve_parameters",
    "run_notebook",
    "run_notebooks",
    "select",
]

NOTEBOOK_PATTERN = re.compile(r"^\d\d_.*\.ipynb$")
KERNEL_NAME = "labkit"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The parameters every numbered notebook declares, with the values a plain run gives them.
STANDARD_PARAMETERS: dict[str, Any] = {"quick": True, "device": "cpu", "seed": 0}


@dataclass
class NotebookRun:
    """Outcome of one notebook: ``status`` is ``"ok"`` or ``"failed"`` (then ``error`` says why)."""

    name: str
    status: str
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    executed: str | None = None
    html: str | None = None
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def default_notebook_dir() -> Path:
    """``./notebooks`` if it exists, else ``notebooks/`` of the checkout holding ``labkit``."""
    here = Path("notebooks")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def discover(notebook_dir: str | os.PathLike | None = None) -> list[Path]:
    """Numbered notebooks ``NN_*.ipynb`` in ``notebook_dir``, sorted by name."""
    root = Path(notebook_dir) if notebook_dir is not None else default_notebook_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"notebook_dir: {root} is not a directory")
    return sorted(p for p in root.iterdir() if NOTEBOOK_PATTERN.match(p.name))


def select(paths: Sequence[Path], names: Sequence[str] | None) -> list[Path]:
    """Pick notebooks by name, stem, topic or prefix (``"01_anchors.ipynb"``, ``"anchors"``, ``"01"``).

    No names selects every notebook.
    """
    if not names:
        return list(paths)
    chosen: list[Path] = []
    for name in names:
        hits = [p for p in paths if name in (p.name, p.stem, p.stem[3:])]
        hits = hits or [p for p in paths if p.name.startswith(name)]
        if not hits:
            known = ", ".join(p.name for p in paths) or "none"
            raise ValueError(f"names: no notebook matches {name!r} (available: {known})")
        chosen += [p for p in hits if p not in chosen]
    return [p for p in paths if p in chosen]


def parse_parameter_value(text: str) -> Any:
    """Read a ``-p NAME VALUE`` value as papermill's command line does.

    ``True``, ``False`` and ``None`` become those constants, then anything ``int()`` accepts
    an int, anything ``float()`` accepts a float; every other text stays a string.
    """
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: Iterable[Sequence[str]] | None) -> dict[str, Any]:
    """``[(NAME, VALUE), ...]`` from repeated ``-p`` options to ``{NAME: value}``.

    Values go through :func:`parse_parameter_value`; as in papermill, a later ``-p`` for the
    same name wins.
    """
    parameters: dict[str, Any] = {}
    for name, value in pairs or ():
        if not name.isidentifier():
            raise ValueError(f"-p: parameter name {name!r} is not a Python identifier")
        parameters[name] = parse_parameter_value(value)
    return parameters


def resolve_parameters(
    parameters: Mapping[str, Any] | None = None,
    *,
    full: bool | None = None,
    device: str | None = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[dict[str, Any], list[int] | None]:
    """Merge ``-p`` parameters with the flags that stand for them; refuse to set one twice.

    ``full`` (``--full``) sets ``quick``, ``device`` (``--device``) sets ``device``, ``seed``
    (``--seed``) and ``seeds`` (``--seeds``) set ``seed``; ``None`` means the flag was not given.
    A parameter set both by a flag and by ``parameters`` (``-p``), or by ``--seed`` and
    ``--seeds``, raises ``ValueError`` naming both.

    Returns:
        ``(values, seeds)``: every parameter a run gets (``quick``, ``device`` and ``seed``
        always, their defaults ``True``, ``"cpu"``, ``0`` when nobody set them; ``seed`` is the
        first of ``seeds`` when given), and the list of seeds, or ``None`` for a single run.
    """
    given = dict(parameters or {})
    for name in given:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"-p: parameter name {name!r} is not a Python identifier")
    flags: dict[str, tuple[str, Any]] = {}  # parameter -> (flag, value)
    for flag, name, value in (
        ("--full", "quick", None if full is None else not full),
        ("--device", "device", device),
        ("--seed", "seed", seed),
        ("--seeds", "seed", None if seeds is None else list(seeds)),
    ):
        if value is None:
            continue
        if name in given:
            raise ValueError(
                f"parameter {name!r} is set twice, by {flag} and by -p {name}: use one of them"
            )
        if name in flags:
            raise ValueError(
                f"parameter {name!r} is set twice, by {flags[name][0]} and by {flag}: "
                "use one of them"
            )
        flags[name] = (flag, value)

    seed_list = None
    if seeds is not None:
        seed_list = list(seeds)
        if not seed_list:
            raise ValueError("--seeds: expected at least one seed")
        for s in seed_list:
            if not isinstance(s, int) or isinstance(s, bool):
                raise ValueError(f"--seeds: expected ints, got {s!r}")
        repeated = sorted({s for s in seed_list if seed_list.count(s) > 1})
        if repeated:
            raise ValueError(f"--seeds: seed(s) {repeated} given more than once")

    values = {**STANDARD_PARAMETERS, **given}
    values.update({name: value for name, (_, value) in flags.items()})
    if seed_list is not None:
        values["seed"] = seed_list[0]
    if not isinstance(values["quick"], bool):
        raise ValueError(f"-p quick: expected True or False, got {values['quick']!r}")
    if not isinstance(values["seed"], int) or isinstance(values["seed"], bool):
        raise ValueError(f"-p seed: expected an int, got {values['seed']!r}")
    return values, seed_list


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure Jupyter kernel ``name`` exists; register ``labkit`` for this Python if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name in KernelSpecManager().find_kernel_specs():
        return name
    if name != KERNEL_NAME:
        raise ValueError(f"kernel: no Jupyter kernel named {name!r} is installed")
    from ipykernel.kernelspec import install

    install(kernel_name=name, display_name="Python (labkit)", prefix=sys.prefix)
    print(f"registered Jupyter kernel {name!r} for {sys.executable}", file=sys.stderr)
    return name


def _render_html(executed: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    write_atomic(html_path, lambda tmp: tmp.write_text(body, encoding="utf-8"))


def describe_error(err: BaseException) -> str:
    # papermill's PapermillExecutionError carries the failing cell; other errors (timeouts,
    # a dead kernel) only have their message.
    if hasattr(err, "ename") and hasattr(err, "exec_count"):
        tb = _ANSI.sub("", "\n".join(getattr(err, "traceback", []) or []))
        tail = "\n".join(tb.strip().splitlines()[-6:])
        return f"cell {err.exec_count}: {err.ename}: {err.evalue}\n{tail}".rstrip()
    return _ANSI.sub("", f"{type(err).__name__}: {err}")


# A kernel can fail to start for reasons that are nobody's notebook: two parallel runs'
# kernels picking the same free TCP port at the same moment (jupyter_client chooses ports per
# process), or a loaded machine. nbclient reports both from its kernel_info handshake, before
# any cell has run, so the run is simply started again.
START_ATTEMPTS = 3
_STARTUP_MESSAGES = ("before replying to kernel_info", "Kernel didn't respond in")


def is_kernel_startup_failure(err: BaseException) -> bool:
    """True for nbclient's errors that mean the kernel never finished starting."""
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _STARTUP_MESSAGES)


def execute_notebook(*args: Any, **kwargs: Any) -> None:
    """``papermill.execute_notebook(*args, **kwargs)``, started again (up to ``START_ATTEMPTS``
    runs in all) when the kernel fails to start; every other error is raised as it is."""
    import papermill as pm

    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            pm.execute_notebook(*args, **kwargs)
            return
        except Exception as err:
            if attempt == START_ATTEMPTS or not is_kernel_startup_failure(err):
                raise


def run_notebook(
    path: str | os.PathLike,
    out_dir: str | os.PathLike = "build",
    *,
    quick: bool = True,
    device: str = "cpu",
    seed: int = 0,
    kernel: str = KERNEL_NAME,
    timeout: float | None = None,
    progress: bool = False,
    html: bool = True,
    parameters: Mapping[str, Any] | None = None,
    subdir: str | None = None,
) -> NotebookRun:
    """Execute one notebook with papermill and publish ``out_dir/notebooks/NAME.ipynb`` (+ HTML).

    The kernel starts in the notebook's own directory (as in JupyterLab and nbval) with the
    parameters ``quick``, ``device``, ``seed`` injected. Outputs are written atomically; a
    failing notebook is still published, showing the error.

    Args:
        timeout: seconds allowed per cell (``None``: no limit).
        progress: show papermill's per-cell progress bar.
        parameters: more parameters to inject (not ``quick``, ``device`` or ``seed``).
        subdir: publish into ``out_dir/notebooks/SUBDIR/`` and ``out_dir/html/SUBDIR/``
            instead (``"seed1"`` for one run of a ``--seeds`` batch).

    Returns:
        The :class:`NotebookRun` (never raises for a failing notebook).
    """
    path = Path(path).resolve()
    extra = dict(parameters or {})
    clash = sorted(extra.keys() & STANDARD_PARAMETERS.keys())
    if clash:
        raise ValueError(f"parameters: pass {clash} as the keyword arguments of the same name")
    out = Path(out_dir)
    folder = Path(subdir) if subdir else Path()
    executed = out / "notebooks" / folder / path.name
    html_path = out / "html" / folder / f"{path.stem}.html"
    label = path.stem if not subdir else f"{subdir}/{path.stem}"
    start = time.perf_counter()
    error = None

    def execute(tmp: Path) -> None:
        nonlocal error
        env_backend = os.environ.pop("MPLBACKEND", None)  # let the kernel use inline plots
        env_headless = os.environ.get(HEADLESS_ENV)
        os.environ[HEADLESS_ENV] = "1"  # explorers draw once instead of opening widgets
        try:
            execute_notebook(
                str(path),
                str(tmp),
                parameters={"quick": quick, "device": device, "seed": seed, **extra},
                kernel_name=kernel,
                cwd=str(path.parent),
                progress_bar={"desc": label, "leave": False} if progress else False,
                execution_timeout=timeout,
                log_output=False,
            )
        except Exception as err:  # a failing notebook is a result, not a crash of the batch
            error = describe_error(err)
        finally:
            if env_backend is not None:
                os.environ["MPLBACKEND"] = env_backend
            if env_headless is None:
                os.environ.pop(HEADLESS_ENV, None)
            else:
                os.environ[HEADLESS_ENV] = env_headless
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise RuntimeError(error or "papermill wrote no output notebook")

    run = NotebookRun(name=path.name, status="ok", seconds=0.0, seed=seed)
    try:
        write_atomic(executed, execute)
        run.executed = str(executed)
        from labkit.notebook import read_metrics

        run.metrics = read_metrics(executed)
        if html:
            _render_html(executed, html_path)
            run.html = str(html_path)
    except Exception as err:
        error = error or describe_error(err)
    run.seconds = time.perf_counter() - start
    if error is not None:
        run.status, run.error = "failed", error
    return run


def _run_in_worker(path: str, out_dir: str, options: dict) -> NotebookRun:
    return run_notebook(path, out_dir, **options)


def run_notebooks(
    names: Sequence[str] | None = None,
    *,
    notebook_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "build",
    full: bool | None = None,
    device: str | None = None,
    seed: int | None = None,
    jobs: int = 1,
    timeout: float | None = None,
    kernel: str = KERNEL_NAME,
    html: bool = True,
    progress: bool = True,
    parameters: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[NotebookRun]:
    """Run the selected notebooks (all by default), ``jobs`` at a time; keep going on failure.

    Args:
        full, device, seed: the ``--full``, ``--device``, ``--seed`` flags (``None``: not given;
            quick mode, ``"cpu"``, seed 0 unless ``parameters`` set them).
        parameters: parameters for every run, like papermill's ``-p NAME VALUE``; one that a
            flag also sets raises ``ValueError`` (see :func:`resolve_parameters`).
        seeds: run every notebook once per seed (parameter ``seed``), publishing each run
            into ``out_dir/notebooks/seedN/`` and ``out_dir/html/seedN/``; the progress bar
            counts every run.

    Returns:
        One :class:`NotebookRun` per run (its ``seed`` set), in notebook order, then seed order.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs: expected a positive int, got {jobs}")
    values, seed_list = resolve_parameters(
        parameters, full=full, device=device, seed=seed, seeds=seeds
    )
    paths = select(discover(notebook_dir), names)
    kernel = ensure_kernel(kernel)
    options: dict[str, Any] = {
        "quick": values["quick"],
        "device": values["device"],
        "seed": values["seed"],
        "kernel": kernel,
        "timeout": timeout,
        "html": html,
    }
    extra = {k: v for k, v in values.items() if k not in STANDARD_PARAMETERS}
    if extra:
        options["parameters"] = extra
    # One task per run: (notebook, seed, run_notebook options).
    if seed_list is None:
        tasks = [(p, values["seed"], options) for p in paths]
    else:
        tasks = [
            (p, s, {**options, "seed": s, "subdir": f"seed{s}"}) for p in paths for s in seed_list
        ]

    def label(p: Path, s: int) -> str:
        return p.stem if seed_list is None else f"{p.stem} seed {s}"

    results: dict[tuple[Path, int], NotebookRun] = {}
    bar = tqdm(
        total=len(tasks),
        desc="notebooks" if seed_list is None else "runs",
        unit="nb" if seed_list is None else "run",
        disable=not progress,
    )
    if jobs == 1 or len(tasks) <= 1:
        for p, s, opts in tasks:
            bar.set_postfix_str(label(p, s))
            results[p, s] = run_notebook(p, out_dir, progress=progress, **opts)
            bar.update()
    else:
        # Kernels are separate processes, so several notebooks share the cores; keep each
        # kernel's thread pool small so they don't oversubscribe them.
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_run_in_worker, str(p), str(out_dir), opts): (p, s)
                for p, s, opts in tasks
            }
            for fut in as_completed(futures):
                p, s = futures[fut]
                try:
                    results[p, s] = fut.result()
                except Exception as err:  # the worker itself died
                    error = describe_error(err)
                    results[p, s] = NotebookRun(p.name, "failed", 0.0, error=error, seed=s)
                bar.set_postfix_str(label(p, s))
                bar.update()
    bar.close()
    runs = [results[p, s] for p, s, _ in tasks]
    for run, (_, s, _) in zip(runs, tasks, strict=True):
        run.seed = s
    return runs


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_summary(runs: Sequence[NotebookRun]) -> str:
    """A fixed-width table: notebook, status, time, then one recorded metric per line."""
    width = max([len("notebook"), *(len(r.name) for r in runs)])
    lines = [f"{'notebook':<{width}}  {'status':<6}  {'time':>7}  metrics"]
    lines.append("-" * len(lines[0]))
    for r in runs:
        metrics = [f"{k} = {_fmt_value(v)}" for k, v in r.metrics.items()]
        if not r.ok:
            metrics.insert(0, (r.error or "failed").splitlines()[0])
        metrics = metrics or ["-"]
        status = "ok" if r.ok else "FAILED"
        lines.append(f"{r.name:<{width}}  {status:<6}  {r.seconds:>6.1f}s  {metrics[0]}")
        lines += [f"{'':<{width}}  {'':<6}  {'':>7}  {m}" for m in metrics[1:]]
    n_failed = sum(not r.ok for r in runs)
    lines.append(f"{len(runs)} notebook(s), {n_failed} failed")
    return "\n".join(lines)


class _Failed:
    """Type of :data:`FAILED`."""

    def __repr__(self) -> str:
        return "FAILED"


FAILED: Any = _Failed()  # a MetricRow value for a run that failed


@dataclass
class MetricRow:
    """One metric of one notebook across seeds.

    ``values[seed]`` is the value that seed's run recorded, or :data:`FAILED` when that run
    failed; a seed whose run succeeded without recording the metric is absent. ``mean`` and
    ``std`` (sample std, ddof=1) are over the successful runs' values, ``None`` when some value is
    not a number (bools, strings, lists), when there is none, and for ``std`` with one value;
    ``n`` counts those values. A notebook that recorded nothing has one row with ``metric ""``.
    """

    notebook: str
    metric: str
    values: dict[int, Any]
    mean: float | None = None
    std: float | None = None
    n: int = 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metrics_table(runs: Sequence[NotebookRun]) -> tuple[list[int], list[MetricRow]]:
    """Every recorded metric of every notebook, one value per seed, with mean and std.

    Returns:
        ``(seeds, rows)``: the seeds in the order the runs have them, and the
        :class:`MetricRow` s in notebook order, each notebook's metrics in recording order.
    """
    seeds = list(dict.fromkeys(r.seed for r in runs))
    by_notebook: dict[str, dict[Any, NotebookRun]] = {}
    for r in runs:
        by_notebook.setdefault(r.name, {})[r.seed] = r
    rows = []
    for notebook, per_seed in by_notebook.items():
        names = dict.fromkeys(m for r in per_seed.values() if r.ok for m in r.metrics)
        for metric in names or [""]:
            values = {}
            for seed, r in per_seed.items():
                if not r.ok:
                    values[seed] = FAILED
                elif metric in r.metrics:
                    values[seed] = r.metrics[metric]
            present = [v for v in values.values() if v is not FAILED]
            row = MetricRow(notebook, metric, values, n=len(present))
            if present and all(_is_number(v) for v in present):
                row.mean = statistics.fmean(present)
                if len(present) > 1:
                    row.std = statistics.stdev(float(v) for v in present)
            rows.append(row)
    return seeds, rows


def _seed_column(seed: Any) -> str:
    return f"seed{seed}"


def format_metrics_table(runs: Sequence[NotebookRun]) -> str:
    """A fixed-width table of :func:`metrics_table`: notebook, metric, one column per seed,
    ``mean ± std`` and ``n``, then one line per failed run and a count of runs.

    A failed run shows as ``failed``, a metric a run did not record as ``-``, the std of a
    single value as ``-``; non-numeric metrics have an empty ``mean ± std``.
    """
    seeds, rows = metrics_table(runs)
    header = ["notebook", "metric", *(_seed_column(s) for s in seeds), "mean ± std", "n"]
    table = [header]
    previous = None
    for row in rows:
        cells = [row.notebook if row.notebook != previous else "", row.metric or "-"]
        previous = row.notebook
        for seed in seeds:
            if seed not in row.values:
                cells.append("-")
            elif row.values[seed] is FAILED:
                cells.append("failed")
            else:
                cells.append(_fmt_value(row.values[seed]))
        if row.mean is None:
            cells.append("")
        else:
            std = "-" if row.std is None else f"{row.std:.4g}"
            cells.append(f"{row.mean:.4g} ± {std}")
        cells.append(str(row.n))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        *left, n = cells
        text = "  ".join(f"{c:<{w}}" for c, w in zip(left, widths, strict=False))
        return f"{text}  {n:>{widths[-1]}}"

    lines = [fmt(header), "-" * len(fmt(header))]
    lines += [fmt(cells) for cells in table[1:]]
    failed = [r for r in runs if not r.ok]
    for r in failed:
        reason = (r.error or "failed").splitlines()[0]
        lines.append(f"FAILED {r.name} {_seed_column(r.seed)}: {reason}")
    notebooks = len({r.name for r in runs})
    lines.append(
        f"{len(runs)} run(s) of {notebooks} notebook(s) x {len(seeds)} seed(s), "
        f"{len(failed)} failed"
    )
    return "\n".join(lines)


def _csv_value(value: Any) -> str:
    if value is FAILED:
        return "failed"
    if isinstance(value, str):
        return value
    if _is_number(value):
        return repr(value)
    return json.dumps(value)


def metrics_csv(runs: Sequence[NotebookRun]) -> str:
    """:func:`metrics_table` as CSV text.

    Columns: ``notebook, metric, seedN...`` (one per seed), ``mean, std, n``. A failed run's
    cell reads ``failed``, a metric the run did not record is empty; numbers are written in
    full precision, strings as they are, other values as JSON. ``mean`` and ``std`` are empty
    for non-numeric metrics, ``std`` also for a single value.
    """
    seeds, rows = metrics_table(runs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["notebook", "metric", *(_seed_column(s) for s in seeds), "mean", "std", "n"])
    for row in rows:
        values = [_csv_value(row.values[s]) if s in row.values else "" for s in seeds]
        mean = "" if row.mean is None else repr(row.mean)
        std = "" if row.std is None else repr(row.std)
        writer.writerow([row.notebook, row.metric, *values, mean, std, row.n])
    return buffer.getvalue()


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        parameters = parse_parameters(args.parameters)
        values, seeds = resolve_parameters(
            parameters, full=args.full, device=args.device, seed=args.seed, seeds=args.seeds
        )
        runs = run_notebooks(
            args.names,
            notebook_dir=args.notebook_dir,
            out_dir=args.out,
            full=args.full,
            device=args.device,
            seed=args.seed,
            jobs=args.jobs,
            timeout=args.timeout,
            kernel=args.kernel,
            html=not args.no_html,
            progress=not args.no_progress,
            parameters=parameters,
            seeds=seeds,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"labkit notebooks run: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"mode": "quick" if values["quick"] else "full"}
    if parameters:
        summary["parameters"] = parameters
    if seeds is not None:
        summary["seeds"] = seeds
    summary["runs"] = [asdict(r) for r in runs]
    write_atomic(
        out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n")
    )
    failed = [r for r in runs if not r.ok]
    if seeds is None:
        print(format_summary(runs))
        for r in failed:
            print(f"\n{r.name} failed ({r.executed or 'no output'}):\n{r.error}", file=sys.stderr)
        if runs and not failed:
            print(f"executed notebooks in {out / 'notebooks'}, HTML in {out / 'html'}")
        return 1 if failed else 0

    csv_path = out / "metrics.csv"
    text = metrics_csv(runs)
    write_atomic(csv_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(format_metrics_table(runs))
    for r in failed:
        where = r.executed or "no output"
        print(f"\n{r.name} seed {r.seed} failed ({where}):\n{r.error}", file=sys.stderr)
    if runs and not failed:
        print(f"executed notebooks in {out / 'notebooks'}/seedN, HTML in {out / 'html'}/seedN")
    print(f"metrics per seed in {csv_path}")
    return 1 if failed else 0


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        paths = discover(args.notebook_dir)
    except FileNotFoundError as err:
        print(f"labkit notebooks list: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p.name)
    return 0


def _positive_seconds(text: str) -> float:
    """``--timeout``'s type: a finite number of seconds > 0 (``--timeout -5`` used to reach
    the kernel as no limit at all)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds (omit the option for no limit), got {text!r}"
        )
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labkit notebooks run`` and ``labkit notebooks list``."""
    nb = subparsers.add_parser("notebooks", help="run or list the numbered notebooks")
    sub = nb.add_subparsers(dest="notebooks_command", metavar="{run,list}", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--notebook-dir",
        default=None,
        help="folder with the NN_*.ipynb notebooks (default: the checkout's notebooks/)",
    )

    run = sub.add_parser(
        "run",
        parents=[common],
        help="execute notebooks with papermill into build/",
        description="Execute numbered notebooks with papermill (quick mode on the CPU unless "
        "--full / --device / -p); write executed copies to OUT/notebooks, HTML to OUT/html, and "
        "print each notebook's recorded metrics. With --seeds, run each notebook once per seed "
        "into OUT/notebooks/seedN and OUT/html/seedN, and print and write to OUT/metrics.csv "
        "every metric per seed with its mean ± std. Exits 1 if any run failed.",
    )
    run.add_argument("names", nargs="*", help="notebooks to run: prefixes like 01 or full names")
    run.add_argument(
        "--full", action="store_true", default=None, help="full mode (parameter quick = False)"
    )
    run.add_argument(
        "--device",
        default=None,
        help="device parameter: cpu, cuda, cuda:N or auto (default: cpu, as baselines)",
    )
    run.add_argument("--seed", type=int, default=None, help="seed parameter (default: 0)")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        dest="parameters",
        metavar=("NAME", "VALUE"),
        help="set a notebook parameter for every run, as papermill does (repeatable; VALUE "
        "True/False/None, an int or a float, else a string): -p quick False -p device cuda",
    )
    run.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="SEED",
        help="run every notebook once per seed and summarize the metrics across seeds "
        "(put notebook names before this option)",
    )
    run.add_argument("--jobs", "-j", type=int, default=1, help="notebooks run in parallel")
    run.add_argument("--out", default="build", help="output folder (default: build)")
    run.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        help="seconds allowed per cell, > 0 (default: none)",
    )
    run.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default: labkit)")
    run.add_argument("--no-html", action="store_true", help="skip the HTML rendering")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", parents=[common], help="list the numbered notebooks")
    lst.set_defaults(func=_cmd_list)
