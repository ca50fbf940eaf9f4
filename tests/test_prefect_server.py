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
    anchor = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    params = {"params": miniature_params(root, models, "ignored", measure=False, version_prefix="sched-")}
    (schedule,) = stack.api("POST", f"/deployments/{regen['id']}/schedules", [
        {"schedule": {"interval": 3600, "anchor_date": anchor, "timezone": "UTC"}, "active": True,
         "parameters": params, "max_scheduled_runs": 1}
    ])
    try:
        # wait for the run the scheduler creates (it looks every 2 s here: the server's scheduler loop setting); the
        # deadline only keeps a broken scheduler from hanging the suite, far beyond any loaded machine's delay
        deadline = time.monotonic() + 900
        runs: list = []
        while not runs:
            assert time.monotonic() < deadline, "the activated schedule created no flow run (15 minutes)"
            assert stack.server.poll() is None, "the Prefect server died while the schedule was waiting"
            runs = stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [regen["id"]]}}})
            time.sleep(0.5)
        first = min(runs, key=lambda r: r["expected_start_time"])
        stack.wait_flow_run(first["id"], timeout=300)
    finally:
        stack.api("PATCH", f"/deployments/{regen['id']}/schedules/{schedule['id']}", {"active": False})
    pointer = read_latest(str(root), "mini")
    assert pointer["previous"] == "v1" and re.fullmatch(r"sched-\d{8}-\d{6}", pointer["version"])
    assert verify_version(version_store(str(root), "mini", pointer["version"])) == []
