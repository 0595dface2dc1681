"""The grader's OS sandbox: bubblewrap (``bwrap``) per submission, resource limits, kill as a whole.

Every process that runs student code (papermill and its kernel) and the fresh checking process
run under :func:`sandbox_command`::

    bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp ...   read-only system, private /tmp
          --tmpfs <submissions> --tmpfs <gradebook dir> ...         other students, hidden tests,
                                                                    gradebook: not there at all
          --bind <scratch> /tmp/labkit                              the only writable folder
          --unshare-all --unshare-user --uid 65534 --gid 65534      no network (loopback only),
          --die-with-parent --new-session                           own pids, no capabilities

with a minimal environment (no secrets of the grader's shell), ``RLIMIT_AS`` (memory per
process), ``RLIMIT_CPU``, ``RLIMIT_NPROC`` and, where the machine allows (root with cgroups),
a cgroup capping the number of processes / threads, the memory of the whole sandbox and its
CPU share. The grader kills the sandbox's process group on timeout; ``--die-with-parent`` and
the PID namespace take every process inside with it, and ``/tmp`` (kernel connection files)
was a tmpfs that vanishes with it.

Where ``bwrap`` is missing or cannot start (no user namespaces), :func:`probe` says why and the
grader falls back to plain processes (mode ``"unsandboxed"``), loudly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Limits", "Sandbox", "kill_group", "probe", "sandbox_command"]

INSIDE = "/tmp/labkit"  # the scratch folder as the sandbox sees it (work/ in it: the cwd)
RUN_INSIDE = "/tmp/.labkit-papermill"  # papermill's notebooks, away from the notebook's cwd
NOBODY = 65534
_ENV_KEEP = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "USER", "LOGNAME", "TERM", "VIRTUAL_ENV",
    "PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
    "LABKIT_HEADLESS", "LABKIT_DATA", "TORCH_HOME", "HF_HOME", "JUPYTER_PATH", "JUPYTER_DATA_DIR",
    "JUPYTER_CONFIG_DIR",
)  # fmt: skip


@dataclass
class Limits:
    """Per-sandbox bounds: ``memory`` bytes per process (``RLIMIT_AS``; the cgroup gets twice
    that for the whole sandbox), ``processes`` tasks (threads included) in the sandbox, CPU
    seconds per process and ``cpus`` cores of CPU share (cgroup)."""

    memory: int = 8 << 30
    processes: int = 512
    cpu_seconds: int = 3600
    cpus: float = 1.0


@dataclass
class Sandbox:
    """How runs are isolated: ``mode`` is ``"bubblewrap"`` or ``"unsandboxed"`` (``reason`` says why)."""

    mode: str
    reason: str = ""
    hidden: list[str] = field(default_factory=list)

    @property
    def isolated(self) -> bool:
        return self.mode == "bubblewrap"

    def warning(self) -> str:
        return (
            ""
            if self.isolated
            else (
                "WARNING: graded WITHOUT the bubblewrap sandbox (weaker mode 'unsandboxed': "
                f"student code can read and write what the grader can; {self.reason})"
            )
        )


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def shared_data() -> dict[str, Path]:
    """The public data lessons read, shared read-only with every sandbox: ``LABKIT_DATA`` (the
    generated datasets) and ``LABKIT_ZOO`` (the trained zoo models), as resolved here. Inside,
    the checkout around them may be hidden, so the sandbox gets them by these variables."""
    from labkit.data.paths import data_root
    from labkit.zoo import zoo_dir

    return {"LABKIT_DATA": data_root().resolve(), "LABKIT_ZOO": zoo_dir().resolve()}


def _rebound() -> list[str]:
    """What lessons need that lives under ``/tmp`` (the interpreter, a venv, the labkit package
    of a checkout there, its data and zoo folders): bound back read-only over the sandbox's empty
    ``/tmp``, so a grader run from a clone in ``/tmp`` still works. Only those folders come back,
    not the checkout around them (its notebooks hold hidden tests)."""
    paths = [str(p) for p in [*_needed(), *shared_data().values()]]
    out: list[str] = []
    for p in paths:
        if os.path.exists(p) and _under(p, "/tmp") and p not in out:
            out.append(p)
    return sorted(out, key=lambda s: (s.count("/"), s))


def _bwrap_base() -> list[str]:
    cmd = [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
        "--tmpfs", "/tmp", "--unshare-all", "--unshare-user", "--uid", str(NOBODY),
        "--gid", str(NOBODY), "--hostname", "sandbox", "--die-with-parent", "--new-session",
    ]  # fmt: skip
    for path in _rebound():
        cmd += ["--ro-bind", path, path]
    return cmd


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str, str]:
    if os.environ.get("LABKIT_GRADER_SANDBOX", "") == "off":
        return "unsandboxed", "LABKIT_GRADER_SANDBOX=off"
    if shutil.which("bwrap") is None:
        return "unsandboxed", "bwrap not found: install the 'bubblewrap' package"
    try:
        result = subprocess.run(
            [*_bwrap_base(), "--", sys.executable, "-c", "import os; print(os.getuid())"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return "unsandboxed", f"bwrap failed to start: {err}"
    if result.returncode != 0 or result.stdout.strip() != str(NOBODY):
        why = (result.stderr or result.stdout).strip().splitlines()
        return "unsandboxed", f"bwrap failed to start: {why[-1] if why else result.returncode}"
    return "bubblewrap", ""


def probe() -> Sandbox:
    """The strongest isolation this machine offers (bwrap tried once per process)."""
    return Sandbox(*_probe())


def _needed() -> list[Path]:
    import labkit

    paths = [sys.prefix, sys.base_prefix, sys.executable, Path(labkit.__file__).parent]
    return [Path(p).resolve() for p in paths]


def hidden_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Folders to cover with an empty tmpfs: the given ones and the temp dir, minus any that
    holds Python or labkit (those stay visible, read-only)."""
    needed = _needed()
    out: list[str] = []
    for p in [*paths, tempfile.gettempdir()]:
        p = Path(p).resolve()
        if not p.is_dir() or p == Path("/") or str(p) in out:
            continue
        # A folder holding Python or labkit stays visible, read-only; under /tmp they are
        # bound back one by one (``_rebound``), so /tmp itself can be covered.
        if not _under(str(p), "/tmp") and any(n == p or p in n.parents for n in needed):
            continue
        out.append(str(p))
    return sorted(out, key=lambda s: (s.count("/"), s))


def sandbox_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: nothing of the grader's shell beyond what Python needs."""
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.update({k: str(v) for k, v in shared_data().items() if v.is_dir()})
    env.update(
        TMPDIR="/tmp",
        JUPYTER_RUNTIME_DIR="/tmp/jupyter-runtime",
        IPYTHONDIR="/tmp/ipython",
        MPLCONFIGDIR="/tmp/matplotlib",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra or {})
    return env


def sandbox_command(
    sandbox: Sandbox,
    argv: Sequence[str],
    binds: Sequence[tuple[str, str, bool]] = (),
    chdir: str | None = None,
) -> list[str]:
    """``argv`` wrapped in bwrap (or as is, unsandboxed); ``binds``: ``(host, inside, writable)``."""
    if not sandbox.isolated:
        return list(argv)
    cmd = _bwrap_base()
    # Parents first; a folder inside a hidden one (or inside /tmp, a fresh tmpfs) is not there.
    covered = ["/tmp"]
    rebound = _rebound()
    for path in sandbox.hidden:
        shown_again = any(_under(path, r) for r in rebound)  # e.g. notebooks/ of a /tmp clone
        if not shown_again and any(_under(path, c) for c in covered):
            continue
        cmd += ["--tmpfs", path, "--remount-ro", path]  # empty, and nothing can be written
        covered.append(path)
    for shadow in ("/etc/shadow", "/etc/gshadow"):
        if os.path.exists(shadow):
            cmd += ["--ro-bind", "/dev/null", shadow]
    for host, inside, writable in binds:
        cmd += ["--bind" if writable else "--ro-bind", host, inside]
    if chdir:
        cmd += ["--chdir", chdir]
    return [*cmd, "--", *argv]


# ---------------------------------------------------------------------------------------
# resource limits
# ---------------------------------------------------------------------------------------


class _Cgroup:
    """A v1 or v2 cgroup with pids / memory / cpu limits; silently nothing where not allowed."""

    def __init__(self, limits: Limits):
        self.dirs: list[Path] = []
        name = f"labkit-grader-{uuid.uuid4().hex[:12]}"
        root = Path("/sys/fs/cgroup")
        if os.geteuid() != 0 or not root.is_dir():
            return
        memory = str(2 * limits.memory)
        quota = str(int(100_000 * limits.cpus))
        if (root / "cgroup.controllers").is_file():  # v2
            self._make(root / name, {"pids.max": str(limits.processes), "memory.max": memory,
                                     "cpu.max": f"{quota} 100000"})  # fmt: skip
            return
        for controller, files in (
            ("pids", {"pids.max": str(limits.processes)}),
            ("memory", {"memory.limit_in_bytes": memory}),
            ("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": quota}),
        ):
            self._make(root / controller / name, files)

    def _make(self, path: Path, files: dict[str, str]) -> None:
        try:
            path.mkdir()
        except OSError:
            return
        self.dirs.append(path)
        for key, value in files.items():
            with contextlib.suppress(OSError):
                (path / key).write_text(value)

    def join(self) -> None:
        """Move the calling process in (run in the child before exec: os calls only)."""
        pid = str(os.getpid()).encode()
        for path in self.dirs:
            try:
                fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            except OSError:
                continue
            with contextlib.suppress(OSError):
                os.write(fd, pid)
            os.close(fd)

    def remove(self) -> None:
        for path in self.dirs:
            procs = path / "cgroup.procs"
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), 9)
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    import time

                    time.sleep(0.1)


@contextlib.contextmanager
def limited(limits: Limits) -> Iterator:
    """A ``preexec_fn`` that applies ``limits`` to the child; the cgroup is removed on exit."""
    group = _Cgroup(limits)

    def preexec() -> None:
        group.join()
        for what, value in (
            (resource.RLIMIT_AS, limits.memory),
            (resource.RLIMIT_CPU, limits.cpu_seconds),
            (resource.RLIMIT_NPROC, limits.processes),
            (resource.RLIMIT_CORE, 0),
        ):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(what, (value, value))

    try:
        yield preexec
    finally:
        group.remove()


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with ``start_new_session=True``: its whole process group, and
    every descendant that left the group."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, 9)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
