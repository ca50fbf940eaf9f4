"""End to end with a real Prefect server, real workers and the real CLI, as an operator would run it.

``prefect server start`` on loopback (SQLite in a temporary PREFECT_HOME), both work pools (the process pool
and the Kubernetes GPU pool created from infra/'s job template), every deployment of
``deployments/prefect.yaml`` registered with ``prefect deploy --all``, then ``prefect deployment run`` of the
build on the miniature config picked up by ``prefect worker start``. Also: shard groups as child runs spread
over two workers, and the regeneration schedule producing a new version and moving ``latest``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

import pytest

from realfake.data.card import verify_version
from realfake.data.storage import version_store
from tasks.versions import read_latest
from tests.support.prefect_server import (
    close_shared_stack,
    deployment,
    miniature_params,
    run_deployment_cli,
    shared_stack,
    write_tiny_models,
)

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    stack = shared_stack(tmp_path_factory.mktemp("prefect"))
    request.session.addfinalizer(close_shared_stack)
    return stack


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def main_worker(stack):
    worker = stack.start_worker("realfake-process", "main", queue="default", limit=2)
    yield worker
    stack.stop_worker(worker)


def test_gpu_pool_accepts_the_kubernetes_job_template(stack):
    pool = stack.api("GET", "/work_pools/realfake-gpu")
    assert pool["type"] == "kubernetes"
    variables = pool["base_job_template"]["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1
    gpu = deployment(stack, "synthesize-shards")
    assert gpu["work_pool_name"] == "realfake-gpu" and gpu["job_variables"]["gpu_count"] == 1


def test_build_deployment_runs_on_a_worker_and_the_dataset_verifies(stack, main_worker, models, root):
    run_id = run_deployment_cli(stack, "build/build", miniature_params(root, models, "v1", measure=False))
    run = stack.wait_flow_run(run_id, timeout=300)
    assert run["work_pool_name"] == "realfake-process"
    assert main_worker.ran(run_id)
    assert verify_version(version_store(str(root), "mini", "v1")) == []
    artifacts = stack.api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    keys = {a["key"] for a in artifacts}
    assert {"mini-v1-classes", "mini-v1-card", "mini-v1-grid", "mini-v1-report", "mini-v1-synthesis-progress"} <= keys


def test_two_workers_each_pick_up_a_child_shard_group(stack, main_worker, models, root):
    gpu_workers = [stack.start_worker("realfake-process", f"gpu-{i}", queue="gpu", limit=1) for i in range(2)]
    try:
        params = miniature_params(
            root, models, "v2", measure=False,
            fanout={"mode": "deployment", "groups": 2, "poll_seconds": 1.0,
                    "shard_deployment": "synthesize-shards/synthesize-shards-process",
                    "finetune_deployment": "finetune/finetune-process"},
        )
        run_id = run_deployment_cli(stack, "build/build", params)
        stack.wait_flow_run(run_id, timeout=600)  # 300 before fine-tuning became a child run too
        # the shard groups' child runs (the fine-tune lane is a child run too: tests/test_preemption.py)
        children = [c for c in stack.child_runs(run_id) if "shard_names" in c["parameters"]["params"]]
        assert len(children) == 2 and all(c["state"]["type"] == "COMPLETED" for c in children)
        assert all(c["deployment_id"] == deployment(stack, "synthesize-shards-process")["id"] for c in children)
        picked = {w.name: {c["id"] for c in children if w.ran(c["id"])} for w in gpu_workers}
        assert all(len(ids) == 1 for ids in picked.values()), picked  # each worker ran exactly one group
        assert verify_version(version_store(str(root), "mini", "v2")) == []
    finally:
        for w in gpu_workers:
            stack.stop_worker(w)


def test_activated_regeneration_schedule_writes_a_new_version_and_moves_latest(stack, main_worker, models, root):
    # Start from a known pointer: v1, built above.
    from tasks.versions import dataset_store

    dataset_store(str(root), "mini").write_bytes(b'{"version": "v1"}', "latest.json")
    regen = deployment(stack, "regenerate")
    params = {"params": miniature_params(root, models, "ignored", measure=False, version_prefix="sched-")}
    # An interval schedule's first run is at its anchor only if the scheduler looks before the anchor has passed;
    # one that looks later (a loaded machine: its loop runs every 2 s here, its database can be locked for seconds)
    # schedules the next interval, an hour on. So: anchor a little ahead, and when the run the scheduler made is not
    # the anchored one, remove that schedule and anchor again further ahead than the delay just observed.
    margin, seen = 2.0, set()
    for _ in range(4):
        created = dt.datetime.now(dt.UTC)
        anchor = created + dt.timedelta(seconds=margin)
        (schedule,) = stack.api("POST", f"/deployments/{regen['id']}/schedules", [
            {"schedule": {"interval": 3600, "anchor_date": anchor.isoformat(), "timezone": "UTC"}, "active": True,
             "parameters": params, "max_scheduled_runs": 1}
        ])
        try:
            first = _scheduled_run(stack, regen["id"], seen)
            seen.add(first["id"])
            at = dt.datetime.fromisoformat(first["expected_start_time"])
            if at <= anchor + dt.timedelta(seconds=1):
                stack.wait_flow_run(first["id"], timeout=300)
                break
            # the scheduler looked after the anchor: ahead by 3x the delay it took to make the run, next time
            margin = max(4 * margin, 3 * (dt.datetime.fromisoformat(first["created"]) - created).total_seconds())
        finally:
            stack.api("DELETE", f"/deployments/{regen['id']}/schedules/{schedule['id']}")
    else:
        raise AssertionError(f"the scheduler never made the anchored run in time (last margin {margin:.0f} s)")
    pointer = read_latest(str(root), "mini")
    assert pointer["previous"] == "v1" and re.fullmatch(r"sched-\d{8}-\d{6}", pointer["version"])
    assert verify_version(version_store(str(root), "mini", pointer["version"])) == []


def _scheduled_run(stack, deployment_id: str, seen: set) -> dict:
    """The earliest run of the deployment that is not in ``seen``, once the scheduler has made one."""
    # the deadline only keeps a broken scheduler from hanging the suite, far beyond any loaded machine's delay
    deadline = time.monotonic() + 900
    while True:
        assert time.monotonic() < deadline, "the activated schedule created no flow run (15 minutes)"
        assert stack.server.poll() is None, "the Prefect server died while the schedule was waiting"
        runs = [r for r in stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
                if r["id"] not in seen]
        if runs:
            return min(runs, key=lambda r: r["expected_start_time"])
        time.sleep(0.5)
