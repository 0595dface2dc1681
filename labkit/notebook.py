"""Notebook glue: one-call setup (seed, device, plots), recorded metrics, source display."""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import labkit

__all__ = [
    "HEADLESS_ENV",
    "METRICS_MIME",
    "Session",
    "explorer",
    "headless",
    "pick",
    "read_metrics",
    "record",
    "recorded",
    "setup",
    "show_source",
]

# A custom MIME type keeps metrics machine-readable inside the executed .ipynb while the
# text/plain twin shows readers the same number.
METRICS_MIME = "application/vnd.labkit.metrics+json"

# Fixed figure geometry so a notebook renders the same images on every machine.
FIGSIZE = (6.0, 4.0)
DPI = 100

# Batch runs (``labkit notebooks run``, the test suite, nbval, the grader) set this to 1.
HEADLESS_ENV = "LABKIT_HEADLESS"

_session: Session | None = None
_recorded: dict[str, Any] = {}


@dataclass(frozen=True)
class Session:
    """What a notebook runs with: ``quick`` (small sizes), ``device`` and ``seed``."""

    quick: bool
    device: torch.device
    seed: int

    @property
    def mode(self) -> str:
        """``"quick"`` or ``"full"``."""
        return "quick" if self.quick else "full"

    def pick(self, quick_value: Any, full_value: Any) -> Any:
        """Return ``quick_value`` in quick mode and ``full_value`` in full mode."""
        return quick_value if self.quick else full_value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _set_plot_defaults() -> None:
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.figsize": FIGSIZE,
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "font.size": 9,
            "axes.titlesize": 10,
            "image.interpolation": "nearest",
            "figure.max_open_warning": 0,
            # SVG ids otherwise change on every render.
            "svg.hashsalt": "labkit",
        }
    )


def setup(quick: bool = True, device: str | torch.device = "auto", seed: int = 0) -> Session:
    """Prepare a notebook run: seed everything, choose the device, set plot defaults.

    Args:
        quick: small sizes that run in a couple of minutes on a laptop CPU when True.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... (see :func:`labkit.device`).
        seed: seed for Python, NumPy and torch.

    Returns:
        The :class:`Session`; it is also remembered for :func:`pick`.
    """
    global _session
    if not isinstance(quick, bool):
        raise TypeError(f"quick: expected a bool, got {type(quick).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    chosen = labkit.device(device)
    seed_everything(seed)
    # cuDNN autotuning picks kernels by timing, which makes runs differ; turn it off.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    _set_plot_defaults()
    _recorded.clear()
    _session = Session(quick=quick, device=chosen, seed=seed)
    mode = "quick" if quick else "full"
    print(f"labkit {labkit.__version__} | device {chosen} | {mode} mode | seed {seed}")
    return _session


def pick(quick_value: Any, full_value: Any) -> Any:
    """Return ``quick_value`` in quick mode and ``full_value`` in full mode.

    Uses the session from the last :func:`setup` call (quick mode if there was none).
    """
    quick = True if _session is None else _session.quick
    return quick_value if quick else full_value


def _to_json(value: Any, name: str) -> Any:
    """Turn tensors / NumPy scalars into plain JSON values; reject what JSON cannot hold."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"value: metric {name!r} is not JSON-serializable ({err})") from None
    return value


def in_ipython() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill, nbval), not in a terminal shell."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def record(name: str, value: Any) -> Any:
    """Store a metric in the executed notebook so batch runs and tests can read it back.

    Inside a Jupyter kernel this displays an ``application/vnd.labkit.metrics+json`` bundle
    (plus a ``text/plain`` line readers see); elsewhere it just prints the line. Tensors and NumPy
    values become plain numbers/lists; NaN and inf are rejected.

    Returns:
        The JSON value that was stored.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    value = _to_json(value, name)
    _recorded[name] = value
    line = f"[labkit metric] {name} = {value!r}"
    if in_ipython():
        from IPython.display import display

        display({METRICS_MIME: {name: value}, "text/plain": line}, raw=True)
    else:
        print(line)
    return value


def recorded() -> dict[str, Any]:
    """Metrics recorded in this process since the last :func:`setup` (a copy)."""
    return dict(_recorded)


def read_metrics(notebook: str | os.PathLike | dict) -> dict[str, Any]:
    """Read the metrics an executed notebook recorded with :func:`record`.

    Args:
        notebook: path to an ``.ipynb`` file, or an already loaded notebook (nbformat node
            or plain dict).

    Returns:
        ``{name: value}`` in recording order; a later record of the same name wins.
    """
    if isinstance(notebook, str | os.PathLike):
        with open(Path(notebook), encoding="utf-8") as f:
            notebook = json.load(f)
    if not isinstance(notebook, dict) or "cells" not in notebook:
        raise TypeError("notebook: expected a path or a notebook dict with 'cells'")
    metrics: dict[str, Any] = {}
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {})
            if METRICS_MIME in data:
                payload = data[METRICS_MIME]
                if isinstance(payload, str):  # some writers store JSON MIME data as text
                    payload = json.loads(payload)
                metrics.update(payload)
    return metrics


def show_source(obj: Any) -> None:
    """Show the source of a function, class or module: highlighted in Jupyter, plain text otherwise."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError) as err:
        raise TypeError(f"obj: cannot get the source of {obj!r} ({err})") from None
    if in_ipython():
        from IPython.display import Code, display

        display(Code(source, language="python"))
    else:
        print(source, end="" if source.endswith("\n") else "\n")


def headless() -> bool:
    """True when no person is looking: a batch run set ``LABKIT_HEADLESS=1``.

    ``labkit notebooks run``, ``make test`` and ``labkit assignments grade`` set it; JupyterLab
    does not, so the explorers are live there.
    """
    return os.environ.get(HEADLESS_ENV, "") == "1"


def explorer(
    draw: Callable[..., None], defaults: dict[str, Any], controls: Callable[[Any], dict[str, Any]]
) -> None:
    """Show an ipywidgets explorer that calls ``draw(**values)`` whenever a control moves.

    Args:
        draw: redraws the figure for one setting of every control.
        defaults: the value each control starts at (keys are ``draw``'s arguments).
        controls: ``controls(ipywidgets) -> {name: widget}``, built only when a person is
            looking.

    In a headless batch run no widget is created at all: executing a cell that opens widget
    comms can block nbclient, and so papermill and nbval, for good (jupyter/nbclient#312).
    There ``draw`` runs once with ``defaults``, so the executed notebook still shows the figure.
    """
    if headless():
        print("Interactive explorer: open the notebook in JupyterLab to move the controls.")
        draw(**defaults)
        return
    import ipywidgets as widgets
    from IPython.display import display

    display(widgets.interactive(draw, **controls(widgets)))
