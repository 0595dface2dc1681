"""Batch-run the numbered notebooks with papermill into build/ and print their recorded metrics."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from labkit.notebook import HEADLESS_ENV

__all__ = [
    "NotebookRun",
    "discover",
    "ensure_kernel",
    "execute_notebook",
    "format_summary",
    "register",
    "run_notebook",
    "run_notebooks",
    "select",
]

NOTEBOOK_PATTERN = re.compile(r"^\d\d_.*\.ipynb$")
KERNEL_NAME = "labkit"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename over ``path``.

    A reader (or a crashed run) never sees a half-written notebook or page.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden name, same suffix: papermill and nbconvert check the extension.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; publish like a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _render_html(executed: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    _write_atomic(html_path, lambda tmp: tmp.write_text(body, encoding="utf-8"))


def _describe_error(err: BaseException) -> str:
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
) -> NotebookRun:
    """Execute one notebook with papermill and publish ``out_dir/notebooks/NAME.ipynb`` (+ HTML).

    The kernel starts in the notebook's own directory (as in JupyterLab and nbval) with the
    parameters ``quick``, ``device``, ``seed`` injected. Outputs are written atomically; a
    failing notebook is still published, showing the error.

    Args:
        timeout: seconds allowed per cell (``None``: no limit).
        progress: show papermill's per-cell progress bar.

    Returns:
        The :class:`NotebookRun` (never raises for a failing notebook).
    """
    path = Path(path).resolve()
    out = Path(out_dir)
    executed = out / "notebooks" / path.name
    html_path = out / "html" / f"{path.stem}.html"
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
                parameters={"quick": quick, "device": device, "seed": seed},
                kernel_name=kernel,
                cwd=str(path.parent),
                progress_bar={"desc": path.stem, "leave": False} if progress else False,
                execution_timeout=timeout,
                log_output=False,
            )
        except Exception as err:  # a failing notebook is a result, not a crash of the batch
            error = _describe_error(err)
        finally:
            if env_backend is not None:
                os.environ["MPLBACKEND"] = env_backend
            if env_headless is None:
                os.environ.pop(HEADLESS_ENV, None)
            else:
                os.environ[HEADLESS_ENV] = env_headless
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise RuntimeError(error or "papermill wrote no output notebook")

    run = NotebookRun(name=path.name, status="ok", seconds=0.0)
    try:
        _write_atomic(executed, execute)
        run.executed = str(executed)
        from labkit.notebook import read_metrics

        run.metrics = read_metrics(executed)
        if html:
            _render_html(executed, html_path)
            run.html = str(html_path)
    except Exception as err:
        error = error or _describe_error(err)
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
    full: bool = False,
    device: str = "cpu",
    seed: int = 0,
    jobs: int = 1,
    timeout: float | None = None,
    kernel: str = KERNEL_NAME,
    html: bool = True,
    progress: bool = True,
) -> list[NotebookRun]:
    """Run the selected notebooks (all by default), ``jobs`` at a time; keep going on failure.

    Returns:
        One :class:`NotebookRun` per notebook, in notebook order.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs: expected a positive int, got {jobs}")
    paths = select(discover(notebook_dir), names)
    kernel = ensure_kernel(kernel)
    options = {
        "quick": not full,
        "device": device,
        "seed": seed,
        "kernel": kernel,
        "timeout": timeout,
        "html": html,
    }
    results: dict[Path, NotebookRun] = {}
    bar = tqdm(total=len(paths), desc="notebooks", unit="nb", disable=not progress)
    if jobs == 1 or len(paths) <= 1:
        for p in paths:
            bar.set_postfix_str(p.stem)
            results[p] = run_notebook(p, out_dir, progress=progress, **options)
            bar.update()
    else:
        # Kernels are separate processes, so several notebooks share the cores; keep each
        # kernel's thread pool small so they don't oversubscribe them.
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_in_worker, str(p), str(out_dir), options): p for p in paths}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    results[p] = fut.result()
                except Exception as err:  # the worker itself died
                    results[p] = NotebookRun(p.name, "failed", 0.0, error=_describe_error(err))
                bar.set_postfix_str(p.stem)
                bar.update()
    bar.close()
    return [results[p] for p in paths]


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


def _cmd_run(args: argparse.Namespace) -> int:
    try:
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
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"labkit notebooks run: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "full" if args.full else "quick", "runs": [asdict(r) for r in runs]}
    _write_atomic(
        out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n")
    )
    print(format_summary(runs))
    failed = [r for r in runs if not r.ok]
    for r in failed:
        print(f"\n{r.name} failed ({r.executed or 'no output'}):\n{r.error}", file=sys.stderr)
    if runs and not failed:
        print(f"executed notebooks in {out / 'notebooks'}, HTML in {out / 'html'}")
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
        "--full / --device); write executed copies to OUT/notebooks, HTML to OUT/html, and "
        "print each notebook's recorded metrics. Exits 1 if any notebook failed.",
    )
    run.add_argument("names", nargs="*", help="notebooks to run: prefixes like 01 or full names")
    run.add_argument("--full", action="store_true", help="full mode (quick = False)")
    run.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu, as baselines)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed parameter (default: 0)")
    run.add_argument("--jobs", "-j", type=int, default=1, help="notebooks run in parallel")
    run.add_argument("--out", default="build", help="output folder (default: build)")
    run.add_argument(
        "--timeout", type=float, default=None, help="seconds allowed per cell (default: none)"
    )
    run.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default: labkit)")
    run.add_argument("--no-html", action="store_true", help="skip the HTML rendering")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", parents=[common], help="list the numbered notebooks")
    lst.set_defaults(func=_cmd_list)
