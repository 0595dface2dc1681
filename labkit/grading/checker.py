"""The grader's checking process: hidden tests run here, never in the student's kernel.

``python -P -m labkit.grading.checker`` reads its job as JSON on stdin (the socket path, the
per-cell time limit and, per check cell, the instructor's source with hidden tests, the import
statements it needs and the notebook variables it uses), listens on the Unix socket and, each
time a serve cell of the student's kernel connects (:func:`labkit.grading.rpc.serve`), runs
that check cell in a fresh namespace of this process:

- names the instructor's notebook imports are imported here, from this pristine labkit;
- the student's functions become :class:`RemoteFunction` proxies: each call runs in the
  kernel, its result comes back as data (``torch.load(weights_only=True)``);
- other notebook variables come back as data the same way.

The check's verdict (labkit's checks, ``CheckResult``, ``assert``, the builtins) is computed
only here; one JSON line per check cell goes to stdout, which only the grader reads. The
process is started fresh per submission, in a sandbox of its own (its stdin, stdout and
memory are out of the kernel's reach), and is not dumpable (no ptrace from the kernel in the
unsandboxed fallback).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import io
import json
import os
import pickle
import signal
import socket
import sys
import traceback
from typing import Any

from labkit.grading import rpc

GRACE = 5.0  # seconds over the per-cell limit before this side gives up on the kernel


class RemoteFunction:
    """The student's function, called in their kernel."""

    def __init__(self, sock: socket.socket, name: str):
        self._sock, self.__name__ = sock, name
        self.__qualname__ = name

    def __repr__(self) -> str:
        return f"<the notebook's {self.__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        blob = pickle.dumps((args, kwargs), protocol=4)
        rpc.send(self._sock, {"op": "call", "name": self.__name__}, blob)
        header, blob = rpc.recv(self._sock)
        kind = header.get("kind")
        if kind == "value":
            try:
                result, args_after, kwargs_after = rpc.decode(header, blob)
            except Exception as err:
                raise TypeError(
                    f"{self.__name__} returned a value the grader cannot read back ({err})"
                ) from None
            _write_back(args, args_after)
            _write_back(list(kwargs.values()), [kwargs_after.get(k) for k in kwargs])
            return result
        if kind == "raise":
            raise _rebuild(header)
        if kind == "interrupted":
            raise KeyboardInterrupt
        raise NameError(f"name {self.__name__!r} is not defined in the notebook")


def _write_back(before, after) -> None:
    """Apply what the student's function did to its arguments (in place, in the kernel) to
    the checker's copies, so that a check notices an input modified in place."""
    import torch

    if not isinstance(after, list | tuple) or len(after) != len(before):
        return
    for old, new in zip(before, after, strict=True):
        with contextlib.suppress(Exception):
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                if old.shape == new.shape and old.dtype == new.dtype:
                    old.copy_(new)
            elif isinstance(old, list) and isinstance(new, list):
                old[:] = new
            elif isinstance(old, dict) and isinstance(new, dict):
                old.clear()
                old.update(new)


def _rebuild(header: dict) -> BaseException:
    name, message = str(header.get("type", "Exception")), str(header.get("message", ""))
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt(message)
    cls = getattr(builtins, name, None)
    err: BaseException | None = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            err = cls(message)
    if err is None:  # the student's own class, SystemExit, or one that needs other arguments
        err = type(name, (rpc.RemoteError,), {})(message)
    err.remote_traceback = str(header.get("traceback", ""))
    return err


def _resolve_ref(module: str, qualname: str) -> Any:
    if not (module + ".").startswith((*rpc.SAFE_PREFIXES, "math.", "numpy.", "builtins.")):
        raise ImportError(module)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _fetch(sock: socket.socket, name: str, namespace: dict, notes: list[str]) -> None:
    rpc.send(sock, {"op": "get", "name": name})
    header, blob = rpc.recv(sock)
    kind = header.get("kind")
    try:
        if kind == "module":
            namespace[name] = importlib.import_module(str(header["name"]))
        elif kind == "ref":
            try:
                namespace[name] = _resolve_ref(str(header["module"]), str(header["qualname"]))
            except (ImportError, AttributeError):
                namespace[name] = RemoteFunction(sock, name)
        elif kind == "function":
            namespace[name] = RemoteFunction(sock, name)
        elif kind == "value":
            namespace[name] = rpc.decode(header, blob)
        elif kind == "unavailable":
            notes.append(
                f"the notebook's {name} could not be sent to the grader: {header.get('error')}"
            )
    except Exception as err:
        namespace.pop(name, None)
        notes.append(f"the notebook's {name} could not be read by the grader: {err}")


def _error_output(err: BaseException) -> dict:
    remote = getattr(err, "remote_traceback", "")
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "labkit/grading/" not in f.filename.replace("\\", "/")
    ]
    lines = traceback.format_list(frames[-3:])
    if remote:
        lines.append(remote)
    ename = type(err).__name__
    return {
        "output_type": "error",
        "ename": ename,
        "evalue": str(err),
        "traceback": [*"".join(lines).rstrip().splitlines(), f"{ename}: {err}"],
    }


def _timeout(signum, frame):
    raise KeyboardInterrupt("the check cell exceeded the per-cell time limit")


def run_slot(sock: socket.socket, slot: dict, cell_timeout: float | None) -> dict:
    """Run one check cell against the connected kernel; its outputs, notebook-style."""
    from labkit.grading import feedback
    from labkit.grading.feedback import CHECK_MIME, DONE_MIME

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    notes: list[str] = []
    results: list[dict] = []
    outputs: list[dict] = []
    stdout = io.StringIO()
    feedback._RESULT_SINK = results
    if cell_timeout:
        signal.signal(signal.SIGALRM, _timeout)
        signal.setitimer(signal.ITIMER_REAL, cell_timeout + GRACE)
    error: BaseException | None = None
    try:
        for statement in slot["imports"]:
            with contextlib.suppress(Exception):
                exec(compile(statement, "<import>", "exec"), namespace)
        for name in slot["names"]:
            if name not in namespace:
                _fetch(sock, name, namespace, notes)
        code = compile(slot["source"], "<check cell>", "exec")
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    except BaseException as err:  # noqa: BLE001 -- every outcome is a result
        error = err
    finally:
        if cell_timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
        feedback._RESULT_SINK = None
    for result in results:
        outputs.append(
            {"output_type": "display_data", "data": {CHECK_MIME: result}, "metadata": {}}
        )
    if error is None:
        outputs.append(
            {
                "output_type": "display_data",
                "data": {DONE_MIME: {"exercise": slot["exercise"], "index": slot["index"]}},
                "metadata": {},
            }
        )
    else:
        outputs.append(_error_output(error))
    return {
        "exercise": slot["exercise"],
        "index": slot["index"],
        "outputs": outputs,
        "stdout": stdout.getvalue()[-5000:],
        "notes": notes,
    }


def _report(record: dict) -> str:
    from labkit.grading.feedback import CHECK_MIME

    lines = [
        o["data"][CHECK_MIME]["report"]
        for o in record["outputs"]
        if CHECK_MIME in o.get("data", {})
    ]
    errors = [o for o in record["outputs"] if o["output_type"] == "error"]
    if errors and errors[0]["ename"] != "CheckFailed":
        lines.append("\n".join(errors[0]["traceback"][-8:]))
    if not lines:
        lines.append(record["stdout"].rstrip() or "passed")
    return f"[labkit grader] {record['exercise']}:\n" + "\n".join(lines)


def listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    listener.listen(4)
    return listener


def serve_forever(job: dict, listener: socket.socket, out) -> None:
    """Accept serve cells one at a time; each check cell is run once, for the first claim."""
    pending = {(s["exercise"], int(s["index"])): s for s in job["slots"]}
    while pending:
        sock, _ = listener.accept()
        try:
            sock.settimeout(30)
            hello, _ = rpc.recv(sock)
            sock.settimeout(None)
            key = (str(hello.get("exercise")), hello.get("index"))
            slot = pending.pop(key, None) if isinstance(key[1], int) else None
            if slot is None:
                continue
            out.write(json.dumps({"event": "start", "exercise": slot["exercise"]}) + "\n")
            out.flush()
            record = run_slot(sock, slot, job.get("cell_timeout"))
            out.write(json.dumps(record) + "\n")
            out.flush()
            with contextlib.suppress(OSError, ConnectionError):
                rpc.send(sock, {"op": "done", "report": _report(record)})
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            sock.close()


def main() -> int:
    with contextlib.suppress(Exception):  # no ptrace / /proc/PID/mem from the same user
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    job = json.loads(sys.stdin.read())
    listener = listen(job["socket"])  # kernels may connect while torch loads
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # stray prints of the checks do not mix with the records
    import torch  # noqa: F401 -- loaded before the first check runs

    import labkit.grading.checks  # noqa: F401

    serve_forever(job, listener, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
