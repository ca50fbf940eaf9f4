"""torchrun launched from Python ends with the process that launched it, however that process ends.

A cancelled Prefect flow run is stopped with SIGTERM, whose default action ends Python without running any
``except`` or ``finally``, and after a grace period with SIGKILL; a torchrun started from it (train-eval, a
data-parallel fine-tune group) must not live on with its workers holding GPUs. Each test starts a real parent
process that calls the launcher from a worker thread (as a Prefect task does) on the miniature config, waits
until torchrun's workers are training (train-eval: an epoch was logged; fine-tune: a step checkpoint was
committed), signals the parent and checks by PID that torchrun and every worker are gone within a few seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import mini_config

from realfake.procs import attached_process

REPO = Path(__file__).resolve().parent.parent
GONE_WITHIN_S = 15.0

PARENT = textwrap.dedent(
    """
    import sys, threading
    from realfake.config import BuildConfig

    which, config = sys.argv[1], sys.argv[2]
    cfg = BuildConfig.model_validate_json(open(config).read())

    def run():
        if which == "train-eval":
            from realfake.train_dist import launch

            launch(cfg, "real", nproc_per_node=1, run="cancelled", on_line=lambda line: print(line, flush=True))
        else:
            from tasks.gpu import run_group_process

            run_group_process(cfg, "finetune", ["all"], None, nproc=int(which.rsplit("-", 1)[1]))

    thread = threading.Thread(target=run)  # where a Prefect task runs
    thread.start()
    thread.join()
    """
)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_base, digits_folder) -> tuple[Path, Path]:
    """A prepared miniature version whose classifier and fine-tune would each run for hours: (config, version)."""
    from realfake.build import prepare

    root = tmp_path_factory.mktemp("cancel")
    cfg = mini_config(str(root / "out"), tiny_base, digits_folder, classifier__epochs=100_000,
                      finetune__max_steps=100_000, finetune__checkpoint_every=2,
                      finetune__batch_size=16)  # 8 per rank in the 2-process cases: the MMD needs 8 per micro-batch
    prepare(cfg)
    path = root / "config.json"
    path.write_text(cfg.model_dump_json())
    return path, root / "out" / cfg.dataset / cfg.version


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return out


def _descendants(pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the live descendants of ``pid`` (torchrun starts its workers in
    sessions of their own, still its children)."""
    procs = _processes()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state, cmdline) in procs.items():
            if ppid == parent and state not in "ZX":
                found[child] = (ppid, cmdline)
                todo.append(child)
    return found


def _workers(tree: dict[int, tuple[int, str]]) -> list[int]:
    """The training processes of ``tree``; not the data-loader processes they fork, which carry the same command
    line and come and go with every epoch."""
    return [pid for pid, (ppid, cmdline) in tree.items()
            if _is_worker(cmdline) and not (ppid in tree and _is_worker(tree[ppid][1]))]


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended; only its exit status is left to collect)."""
    alive = []
    for pid in pids:
        try:
            state = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in "ZX":
            alive.append(pid)
    return alive


def _wait_gone(pids: list[int], within_s: float = GONE_WITHIN_S) -> list[int]:
    """Those of ``pids`` still running after up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(pids)


def _is_worker(cmdline: str) -> bool:
    """A training process (torchrun's own command line names the worker module too)."""
    worker = "realfake.train_dist --worker" in cmdline or "tasks.group_worker" in cmdline
    return worker and "torch.distributed.run" not in cmdline


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("which", "workers", "sig", "victim"),
    [
        ("train-eval", 1, signal.SIGTERM, "parent"),
        ("train-eval", 1, signal.SIGKILL, "parent"),
        ("finetune-2", 2, signal.SIGTERM, "parent"),  # run_group_process on a multi-GPU node: torchrun over workers
        ("finetune-2", 2, signal.SIGKILL, "parent"),
        ("finetune-1", 1, signal.SIGKILL, "parent"),  # one group worker process, no torchrun in between
        # torchrun itself killed outright (the out-of-memory killer): its ranks must not live on
        ("train-eval", 1, signal.SIGKILL, "torchrun"),
        ("finetune-2", 2, signal.SIGKILL, "torchrun"),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else str(v),
)
def test_torchrun_and_its_workers_end_with_the_launching_process(config, tmp_path, which, workers, sig, victim):
    config, version = config
    for folder in ("adapters", "runs"):  # no checkpoint of an earlier case to resume
        shutil.rmtree(version / folder, ignore_errors=True)
    log = tmp_path / "parent.log"
    training = (lambda: re.search(r"epoch \d+/", log.read_text()) is not None) if which == "train-eval" else \
        (version / "adapters" / "all" / "checkpoint" / "state.json").exists
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(log, "w") as out:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, which, str(config)], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    tree: dict[int, tuple[int, str]] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert parent.poll() is None, f"the parent exited {parent.returncode} first:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"no running workers after 2 minutes: {tree}\n{log.read_text()[-3000:]}"
            tree = _descendants(parent.pid)
            if len(_workers(tree)) == workers and training():
                break
            time.sleep(0.05)
        launchers = [pid for pid, (_, cmdline) in tree.items() if "torch.distributed.run" in cmdline]
        if workers > 1 or which == "train-eval":
            assert launchers, tree
        key = launchers + _workers(tree)
        assert len(_alive(key)) == len(key), "a worker ended before the parent was signalled"

        if victim == "parent":
            parent.send_signal(sig)
            assert parent.wait(10) == -sig
        else:
            os.kill(launchers[0], sig)  # the parent lives on: its launcher call fails and it reports that
        left = {pid: tree[pid][1] for pid in _wait_gone(list(tree))}
        assert not left, f"still running {GONE_WITHIN_S:.0f} s after the {victim} got {sig.name}: {left}"
    finally:
        for pid in _alive(list(tree)):  # leave no orphan behind when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# -- the mechanism on its own, with plain sleeping children (fast) ------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"]
# A child that starts a grandchild in its process group, as a plain group worker starts data-loader processes.
FAMILY = [sys.executable, "-c", "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
          "'import time; time.sleep(120)']); print(c.pid, flush=True); time.sleep(120)"]


def _signal_parent_expect_child_gone(script: str, cwd: Path, sig: signal.Signals) -> None:
    """Run ``script`` as a parent process that prints the pid of a child it started, send the parent ``sig`` and
    assert that the child ends within :data:`GONE_WITHIN_S`."""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive([child])
        parent.send_signal(sig)
        assert parent.wait(10) == -sig
        assert not _wait_gone([child]), f"the child outlived its parent's {sig.name}"
    finally:
        parent.kill()
        parent.communicate()
        if child is not None and _alive([child]):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_child_ends_when_the_process_that_started_it_is_killed(tmp_path, sig):
    script = textwrap.dedent(
        f"""
        import subprocess, sys, threading
        from realfake.procs import attached_process

        def run():
            with attached_process({SLEEPER!r}, stdout=subprocess.PIPE, text=True) as proc:
                assert proc.stdout.readline() == "ready\\n"
                print(proc.pid, flush=True)
                proc.wait()

        threading.Thread(target=run).start()
        """
    )
    _signal_parent_expect_child_gone(script, tmp_path, sig)


def test_a_process_that_asked_to_end_with_its_parent_does_when_the_parent_is_killed(tmp_path):
    """What a torchrun rank does (:func:`realfake.procs.end_with_parent`): a plain Popen child, not attached,
    ends when the process that started it is SIGKILLed."""
    rank = [sys.executable, "-c", "import time; from realfake.procs import end_with_parent; end_with_parent(); "
            "print('ready', flush=True); time.sleep(120)"]
    middle = textwrap.dedent(
        f"""
        import subprocess, time
        child = subprocess.Popen({rank!r}, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert child.stdout.readline() == "ready\\n"
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    _signal_parent_expect_child_gone(middle, tmp_path, signal.SIGKILL)


def test_an_exception_in_the_block_stops_the_child_and_its_process_group():
    with pytest.raises(KeyboardInterrupt):
        with attached_process(FAMILY, stdout=subprocess.PIPE, text=True) as proc:
            grandchild = int(proc.stdout.readline())
            raise KeyboardInterrupt
    assert proc.returncode == -signal.SIGTERM
    assert not _wait_gone([grandchild]), "the child's process group was not stopped"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    ignores = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "print('ready', flush=True); time.sleep(120)"]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the task failed"):
        with attached_process(ignores, grace_s=1.0, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout.readline() == "ready\n"
            raise RuntimeError("the task failed")
    assert proc.returncode == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - t0 < 10


def test_a_finished_child_is_left_as_it_ended():
    with attached_process([sys.executable, "-c", "import sys; sys.exit(3)"]) as proc:
        proc.wait()
    assert proc.returncode == 3


def test_a_finetune_batch_that_does_not_split_over_the_ranks_fails_before_torchrun_starts(config):
    from realfake.config import BuildConfig
    from tasks.gpu import run_group_process

    cfg = BuildConfig.model_validate_json(config[0].read_text())
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"batch_size": 8})})
    # a ValueError from this process: the ranks' own failure would come back as the worker's RuntimeError
    with pytest.raises(ValueError, match=r"finetune.batch_size=8 over 2 process\(es\).*leaves 4 images"):
        run_group_process(cfg, "finetune", ["all"], None, nproc=2)
