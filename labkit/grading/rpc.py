"""The wire between a student's kernel and the grader's checking process.

The grader never runs its checks in the student's kernel. Where the notebook had a check cell,
the graded copy has a *serve cell*: ``labkit.grading.rpc.serve("add", 0, PATH)``. It connects to
the checking process (:mod:`labkit.grading.checker`, a fresh Python with a pristine labkit, in
a sandbox of its own) over a Unix socket and answers its requests until the check is done:

- ``get NAME``: a notebook variable the check cell uses -- ``missing``, a ``module`` or a
  ``ref`` (an importable function or class, which the checker imports itself), a ``function``
  (the student's own: the checker gets a proxy that calls it here), or a ``value`` (data,
  ``torch.save`` bytes);
- ``call NAME``: call the student's function on arguments (``torch.save`` bytes) and send the
  result (``torch.save`` bytes) or the exception it raised (type name, message, traceback).

Everything the kernel sends is untrusted: the checker reads values with
``torch.load(weights_only=True)`` (plus labkit / torch classes, rebuilt from data) and decides
the score itself. A student who patches a check, ``CheckResult``, a builtin or this module in
the kernel changes only what the kernel answers -- which is what their function returns anyway.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import traceback
from typing import Any

__all__ = ["RemoteError", "recv", "safe_load", "send", "serve"]

_HEADER = struct.Struct("!IQ")
MAX_MESSAGE = 1 << 30
SAFE_PREFIXES = ("labkit.", "torch.", "collections.")
# numpy arrays and scalars, as torch documents for weights_only loading
_NUMPY = {
    f"{core}.{name}"
    for core in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {"numpy.ndarray", "numpy.dtype"}


def send(sock: socket.socket, header: dict, blob: bytes = b"") -> None:
    """One message: a JSON header and an optional binary payload."""
    head = json.dumps(header).encode()
    sock.sendall(_HEADER.pack(len(head), len(blob)) + head + blob)


def _exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict, bytes]:
    """The next message (``ConnectionError`` when the other side is gone or misbehaves)."""
    n_head, n_blob = _HEADER.unpack(_exact(sock, _HEADER.size))
    if n_head > 1 << 20 or n_blob > MAX_MESSAGE:
        raise ConnectionError(f"message too large ({n_head} + {n_blob} bytes)")
    header = json.loads(_exact(sock, n_head))
    if not isinstance(header, dict):
        raise ConnectionError("malformed message")
    return header, _exact(sock, n_blob)


def _plain(value: Any) -> Any:
    """JSON for plain Python data (exact types only), ``TypeError`` for anything else."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_plain(v) for v in value]
    if kind is tuple:
        return {"tuple": [_plain(v) for v in value]}
    if kind is dict:
        return {"dict": [[_plain(k), _plain(v)] for k, v in value.items()]}
    raise TypeError(kind.__name__)


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_unplain(v) for v in value["tuple"])
        return {_unplain(k): _unplain(v) for k, v in value["dict"]}
    return value


def encode(value: Any) -> tuple[dict, bytes]:
    """``({"kind": "value", "format": ...}, bytes)``: plain data as JSON (no torch needed in
    the kernel), anything else with ``torch.save``."""
    try:
        return {"kind": "value", "format": "json"}, json.dumps(_plain(value)).encode()
    except (TypeError, ValueError, RecursionError):
        return {"kind": "value", "format": "torch"}, dumps(value)


def decode(header: dict, blob: bytes) -> Any:
    """The checker's side of :func:`encode` (never unpickles code)."""
    if header.get("format") == "json":
        return _unplain(json.loads(blob))
    return safe_load(blob)


def dumps(value: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def safe_load(blob: bytes) -> Any:
    """``torch.load(weights_only=True)``, also rebuilding labkit / torch classes from their data
    (never running code the sender chose: only classes are allowed, under known packages)."""
    import importlib

    import torch

    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob)):
        module, _, qualname = name.rpartition(".")
        numpy = name in _NUMPY or name.startswith("numpy.dtypes.")
        if not (name.startswith(SAFE_PREFIXES) or numpy):
            raise TypeError(f"the value holds a {name}, which the grader does not read back")
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise TypeError(f"the value holds an unknown class {name}") from None
        if not isinstance(obj, type) and not numpy:
            raise TypeError(f"the value refers to {name}, which is not a class")
        allowed.append(obj)
    if any(getattr(obj, "__module__", "").startswith("numpy") for obj in allowed):
        import numpy as np  # arrays rebuild their dtype from one of these classes

        allowed += [c for c in vars(np.dtypes).values() if isinstance(c, type)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")


class RemoteError(Exception):
    """An exception raised by the student's function in the kernel (for types the grader does
    not rebuild); ``remote_traceback`` is the kernel's traceback text."""


# ---------------------------------------------------------------------------------------
# kernel side (untrusted)
# ---------------------------------------------------------------------------------------


def _describe(value: Any) -> tuple[dict, bytes]:
    import inspect
    import types

    if isinstance(value, types.ModuleType):
        return {"kind": "module", "name": value.__name__}, b""
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
        if module and module != "__main__" and "<" not in qualname and not module.startswith("_"):
            if inspect.getmodule(value) is not None and "ipykernel" not in str(module):
                return {"kind": "ref", "module": module, "qualname": qualname}, b""
        return {"kind": "function"}, b""
    try:
        return encode(value)
    except Exception as err:
        if callable(value):
            return {"kind": "function"}, b""
        return {"kind": "unavailable", "error": f"{type(err).__name__}: {err}"}, b""


def _connect(path: str, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt("the check cell exceeded the per-cell time limit")


def serve(exercise: str, index: int, path: str, wait: float = 300.0) -> None:
    """Answer the checking process for check cell ``index`` of ``exercise`` (runs in the kernel).

    From the moment the checker answers, the check has ``LABKIT_GRADER_CELL_TIMEOUT`` seconds:
    then the student's function (or the wait) is interrupted, as papermill would interrupt a
    cell.
    """
    import os
    import pickle
    import signal

    import __main__

    namespace = vars(__main__)
    budget = float(os.environ.get("LABKIT_GRADER_CELL_TIMEOUT") or 0)
    sock = _connect(path, time.monotonic() + wait)
    try:
        send(sock, {"op": "hello", "exercise": exercise, "index": index})
        if budget > 0:
            signal.signal(signal.SIGALRM, _interrupt)
            signal.setitimer(signal.ITIMER_REAL, budget)
        while True:
            try:
                header, blob = recv(sock)
            except KeyboardInterrupt:
                send(sock, {"kind": "interrupted"})
                raise
            op = header.get("op")
            if op == "done":
                print(header.get("report", ""))
                return
            name = str(header.get("name"))
            if name not in namespace:
                send(sock, {"kind": "missing"})
                continue
            if op == "get":
                send(sock, *_describe(namespace[name]))
                continue
            try:
                args, kwargs = pickle.loads(blob)  # the grader's data (torch: if tensors)
                result = namespace[name](*args, **kwargs)
                # The arguments go back too: the check sees what the function did to them.
                reply = encode((result, args, kwargs))
            except BaseException as err:  # the student's exception, sent to the checker
                frames = traceback.extract_tb(err.__traceback__)[1:]  # without serve's frame
                reply = (
                    {
                        "kind": "raise",
                        "type": type(err).__name__,
                        "message": str(err)[:5000],
                        "traceback": "".join(traceback.format_list(frames[-3:])),
                    },
                    b"",
                )
                send(sock, *reply)
                if isinstance(err, KeyboardInterrupt | SystemExit):
                    raise
                continue
            send(sock, *reply)
    finally:
        if budget > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
        sock.close()
