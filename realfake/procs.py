"""Child processes that must not outlive the process that started them: torchrun and its workers, shadow models.

A GPU job started as a subprocess (torchrun for data-parallel training, a shard group's worker, a privacy shadow)
holds its GPUs until it exits. :func:`attached_process` makes sure it exits when its parent does, however the
parent ends: an exception, SIGTERM (how a cancelled Prefect flow run is stopped) or SIGKILL.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["STOP_GRACE_S", "attached_process", "end_with_parent", "stop_process"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0
"""How long a stopped child may take to exit before its session is killed: torchrun gives its workers 30 s."""

def _request_death_signal() -> None:
    """Ask the kernel (Linux) for SIGTERM when the thread that started this process dies: prctl(PR_SET_PDEATHSIG).

    Self-contained: its source is also the body of the prelude that runs before an attached command.
    """
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# Runs in the child before the command (Linux): ask for the death signal, give up if the parent is gone already,
# then become the command. exec keeps the process and its death signal, and running this in a fresh interpreter
# avoids Popen's preexec_fn, which is unsafe in a process with threads (a Prefect flow run has several). Where the
# kernel refuses, the command still runs.
_DIE_WITH_PARENT = "import os, sys\n" + inspect.getsource(_request_death_signal) + """
try:
    _request_death_signal()
except Exception as e:
    print(f"realfake: {sys.argv[2:4]} will outlive its parent if that is killed: prctl(PR_SET_PDEATHSIG) "
          f"failed: {e}", file=sys.stderr, flush=True)
else:
    if os.getppid() != int(sys.argv[1]):
        sys.exit("realfake: the process that started this one ended before it could run")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def end_with_parent() -> None:
    """Make this process end (SIGTERM) when the process that started it ends, however that one ends (Linux).

    For processes this package does not start itself: the ranks torchrun starts. :func:`attached_process` ties
    torchrun to its launcher, and torchrun stops its ranks when it is stopped, but if torchrun itself is killed
    outright (SIGKILL, the out-of-memory killer) its ranks would live on holding their GPUs. A rank calls this
    first thing. Elsewhere, or where the kernel refuses, it logs a warning and returns.

    Raises:
        SystemExit: The starting process ended before the death signal was in place.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        _request_death_signal()
    except (OSError, AttributeError) as e:
        log.warning("this process will outlive its parent if that is killed: prctl(PR_SET_PDEATHSIG) failed: %s", e)
        return
    if os.getppid() != parent:
        raise SystemExit("realfake: the process that started this one ended before it could run")


def _die_with_parent(cmd: Sequence[str]) -> list[str]:
    """``cmd`` behind the death-signal prelude on Linux; as it is elsewhere (no such kernel feature)."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a child of :func:`attached_process` and wait for it: SIGTERM to its process group, then SIGKILL.

    torchrun answers SIGTERM by sending SIGTERM to its workers (which it starts in sessions of their own) and
    waiting for them, SIGKILL after 30 s, so ``grace_s`` must be longer than that. Output still arriving on the
    child's pipes is read and dropped meanwhile, so a child blocked on a full pipe can exit.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # it leads its own session, so its group id is its pid
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("process %d did not exit %.0f s after SIGTERM; killing its session", proc.pid, grace_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


@contextmanager
def attached_process(cmd: Sequence[str], grace_s: float = STOP_GRACE_S, **popen: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd, **popen)`` for a child that must not outlive this process: torchrun and its workers.

    The child leads a session of its own, and on Linux the kernel sends it SIGTERM when the thread that started
    it dies (``PR_SET_PDEATHSIG``). So however this process ends, including the ways no ``except`` or
    ``finally`` sees (SIGTERM, whose default action ends Python at once, which is how a cancelled Prefect flow
    run is stopped; SIGKILL), the child is told to stop, and torchrun passes SIGTERM on to its workers. An
    exception in the block (KeyboardInterrupt, a cancellation raised in this thread) stops the child with
    :func:`stop_process` and waits for it before the exception goes on. Leaving the block waits for the child.

    The death signal follows the starting *thread*: use the process in the thread that opened it, and keep that
    thread alive until the child has exited (the block does).
    """
    with subprocess.Popen(_die_with_parent(cmd), start_new_session=True, **popen) as proc:
        try:
            yield proc
        except BaseException:
            stop_process(proc, grace_s)
            raise
