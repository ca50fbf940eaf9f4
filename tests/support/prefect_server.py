"""A real Prefect server, real workers and the real CLI on loopback, for end-to-end tests.

:class:`PrefectStack` starts ``prefect server start`` on 127.0.0.1 with SQLite in a temporary PREFECT_HOME,
runs ``prefect`` CLI commands against it (work pools, ``deploy``, ``deployment run``), starts and stops
``prefect worker start`` processes whose output goes to log files, and waits for flow runs through the
client. Every process it starts is stopped by :meth:`PrefectStack.close`, by its own id.
:func:`ensure_chromium` installs Debian's ``chromium`` for the browser test when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHROMIUM", "PrefectStack", "Worker", "ensure_chromium", "free_port", "until"]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what: str, check, timeout: float, every: float = 0.2):
    """Poll ``check()`` until it returns something truthy and return that: a test waits on observed state (a run's
    state, a commit seen); ``timeout`` only keeps a broken server or build from hanging the suite."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout:.0f} s"
        time.sleep(every)


def ensure_chromium() -> str:
    """Path of headless Chromium, installing Debian's ``chromium`` package first when it is missing.

    Raises:
        RuntimeError: the install failed (its output is in the message).
    """
    if Path(CHROMIUM).exists():
        return CHROMIUM
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return CHROMIUM


@dataclass
class Worker:
    """One ``prefect worker start`` process and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ran(self, flow_run_id: str) -> bool:
        """True when this worker submitted the flow run and the server did not abort the submission.

        Several workers may race for one scheduled run; the server lets one of them have it and tells the
        others to abort, which they log.
        """
        out = self.output()
        submitted = f"submitting flow run '{flow_run_id}'" in out
        return submitted and f"Aborted submission of flow run '{flow_run_id}'" not in out


@dataclass
class PrefectStack:
    """A Prefect server on loopback with its own PREFECT_HOME, plus workers started against it."""

    home: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    workers: list[Worker] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of every process of this stack: the server, workers, CLI and flow runs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="true",
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            # Fast loops so schedules and workers react within seconds, not minutes.
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            PREFECT_LOCAL_STORAGE_PATH=str(self.home / "storage"),
            PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
            PREFECT_LOGGING_LEVEL="INFO",
            # Requests the server answers 503 (SQLite busy under load; clients are to retry) are logged with the cause.
            PREFECT_API_LOG_RETRYABLE_ERRORS="true",
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        env.update(extra)
        return env

    # -- server ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> PrefectStack:
        """Start the server and wait for its health endpoint (minutes on a loaded 2-core machine)."""
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "wb")  # noqa: SIM115 - closed with the process
        self.server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.server.returncode}:\n{self.server_log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        _stop(self.server)  # not left running after a failed start
        raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{self.server_log()[-3000:]}")

    def server_log(self) -> str:
        p = self.home / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- CLI ------------------------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300.0, check: bool = True, **extra_env: str) -> str:
        """Run ``prefect ARGS`` from the repository root against this server; returns its output."""
        proc = subprocess.run(
            [PREFECT, *args], env=self.env(**extra_env), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
        return out

    def api(self, method: str, path: str, body: dict | None = None) -> dict | list:
        """One JSON call to the REST API, retried like Prefect's own client on the answers it marks retryable
        (429, 502, 503: a SQLite database busy under a loaded server), at most 6 tries with growing waits."""
        for attempt in range(6):
            req = urllib.request.Request(
                f"{self.api_url}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    data = r.read()
                return json.loads(data) if data else {}
            except urllib.error.HTTPError as e:
                if e.code not in (429, 502, 503) or attempt == 5:
                    raise
                time.sleep(float(e.headers.get("Retry-After") or 2**attempt))
        raise AssertionError("unreachable")

    # -- workers --------------------------------------------------------------------------------------------
    def start_worker(self, pool: str, name: str, queue: str | None = None, limit: int = 1) -> Worker:
        """Start ``prefect worker start`` on ``pool`` (optionally one queue), running at most ``limit`` runs."""
        log_path = self.home / f"worker-{name}.log"
        cmd = [PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", str(limit)]
        if queue:
            cmd += ["--work-queue", queue]
        proc = subprocess.Popen(
            cmd, env=self.env(), cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )
        worker = Worker(name, proc, log_path)
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: Worker) -> None:
        _stop(worker.proc)
        if worker in self.workers:
            self.workers.remove(worker)

    # -- flow runs ------------------------------------------------------------------------------------------
    def flow_run(self, run_id: str) -> dict:
        return self.api("GET", f"/flow_runs/{run_id}")

    def wait_flow_run(self, run_id: str, timeout: float = 300.0) -> dict:
        """Poll a flow run until it is final; returns it. Raises with the logs when it does not complete."""
        deadline = time.monotonic() + timeout
        run = self.flow_run(run_id)
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1.0)
        if run["state"]["type"] != "COMPLETED":
            raise AssertionError(
                f"flow run {run['name']} ended {run['state']['type']}: {run['state'].get('message')}\n"
                f"--- logs ---\n{self.run_logs(run_id)[-6000:]}\n--- workers ---\n"
                + "\n".join(w.output()[-2000:] for w in self.workers)
            )
        return run

    def run_logs(self, run_id: str) -> str:
        logs = self.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return "\n".join(f"{entry['level']} {entry['message']}" for entry in logs)

    def child_runs(self, parent_id: str) -> list[dict]:
        """Flow runs started by ``parent_id`` (its subflows, including child runs of deployments)."""
        task_runs = self.api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_id]}}, "limit": 200})
        ids = {t["id"] for t in task_runs}
        runs = self.api("POST", "/flow_runs/filter", {"limit": 200})
        return [r for r in runs if r.get("parent_task_run_id") in ids]

    # -- shutdown -------------------------------------------------------------------------------------------
    def close(self) -> None:
        for w in list(self.workers):
            self.stop_worker(w)
        if self.server is not None:
            _stop(self.server)
            self.server = None

    def __enter__(self) -> PrefectStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    # Each process leads its own session (start_new_session), so its flow-run children stop with it.
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)



# -- one stack shared by every server / browser test module of a pytest session ----------------------------
_SHARED: dict[str, PrefectStack] = {}


def shared_stack(base: Path) -> PrefectStack:
    """The session's stack: server started, both pools created, every deployment of prefect.yaml registered.

    Started once (about half a minute on 2 cores) and reused by every module that asks; call
    :func:`close_shared_stack` at session end.
    """
    if "stack" in _SHARED:
        return _SHARED["stack"]
    stack = PrefectStack(base / "prefect-home").start(timeout=300)  # a loaded 2-core machine took over 120 s
    try:
        stack.cli("work-pool", "create", "realfake-process", "--type", "process")
        stack.cli("work-pool", "create", "realfake-gpu", "--type", "kubernetes",
                  "--base-job-template", "infra/k8s-gpu-job-template.json")
        stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=600)
    except Exception:
        stack.close()
        raise
    _SHARED["stack"] = stack
    return stack


def close_shared_stack() -> None:
    stack = _SHARED.pop("stack", None)
    if stack is not None:
        stack.close()


def deployment(stack: PrefectStack, name: str) -> dict:
    """The registered deployment called ``name``."""
    found = [d for d in stack.api("POST", "/deployments/filter", {}) if d["name"] == name]
    assert found, f"deployment {name!r} is not registered"
    return found[0]


def run_deployment_cli(stack: PrefectStack, name: str, params: dict) -> str:
    """``prefect deployment run NAME --params JSON``; returns the new flow run's id."""
    out = stack.cli("deployment", "run", name, "--params", json.dumps({"params": params}))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, f"no flow run id in the output of prefect deployment run:\n{out}"
    return match.group(1)


def write_tiny_models(folder: Path) -> Path:
    """Random tiny SD-architecture pipeline + CLIP vision encoder saved where the production loader reads them."""
    from realfake.models.tiny import TinySpec, build_clip_tokenizer, build_tiny_clip_vision, build_tiny_sd, save_tiny_sd

    if (folder / "model_index.json").exists():
        return folder
    spec = TinySpec(image_size=16)
    tok = build_clip_tokenizer(folder / "_tokenizer")
    return save_tiny_sd(folder, build_tiny_sd(spec, tok, seed=0), build_tiny_clip_vision(spec, seed=0))


def miniature_params(root: Path, models: Path, version: str, **extra) -> dict:
    """Flow parameters of the miniature config: 3 digits per class at 16 px, random tiny models, a few steps."""
    return {
        "preset": None,
        "dataset": "mini",
        "version": version,
        "root": str(root),
        "device": "cpu",
        "source": {"kind": "demo_digits", "max_per_class": 3, "image_size": 16, "test_fraction": 0.34},
        "models": {"base": str(models), "clip": str(models / "clip")},
        "overrides": list(MINIATURE_OVERRIDES),
        **extra,
    }


MINIATURE_OVERRIDES = (
    "finetune.max_steps=2",
    "finetune.batch_size=8",  # the MMD term needs 8 images a micro-batch
    "finetune.resolution=16",
    "synthesis.steps=4",
    "synthesis.resolution=16",
    "synthesis.batch_size=8",
    "shards.max_count=8",
    "classifier.model=resnet10t",
    "classifier.image_size=16",
    "classifier.epochs=1",
    "classifier.batch_size=16",
    "classifier.decay_milestones=[]",
)
