"""The flows in-process on a temporary Prefect server: the build, its artifacts, caching, regeneration.

Runs the real library on the miniature config (random tiny models, a few digits per class) through
``prefect_test_harness``, which starts a real Prefect API on loopback with a throwaway database.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.build import build_flow
from flows.finetune import finetune_flow
from flows.params import BuildParams, FinetuneParams, RegenerateParams
from flows.regenerate import regenerate_flow, regeneration_config
from realfake.config import ConfigError
from realfake.data.card import verify_version
from realfake.data.storage import version_store
from tasks.cache import is_transient
from tasks.gpu import split_groups
from tasks.versions import promote_latest_task, read_latest
from tests.support.prefect_server import miniature_params, until, write_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def built(harness, models, root):
    state = build_flow(BuildParams(**miniature_params(root, models, "v1", measure=False)), return_state=True)
    return state


def _artifacts(key: str, flow_run_id) -> list:
    """The artifacts ``key`` of one flow run (the session's server holds other modules' runs, some of the same keys)."""
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_build_flow_completes_and_the_version_verifies(built, root):
    assert built.is_completed(), built.message
    report = built.result()
    store = version_store(str(root), "mini", "v1")
    assert verify_version(store) == []
    card = store.read_json("dataset.json")
    assert card["synthetic"]["num_images"] == sum(card["real"]["splits"]["train"].values())
    assert Path(report["grid"]).is_file()


def test_build_publishes_counts_card_grid_report_and_progress(built):
    run = built.state_details.flow_run_id
    (counts,) = _artifacts("mini-v1-classes", run)
    rows = json.loads(counts.data)
    assert len(rows) == 10 and all(r["synthetic"] == r["real train"] for r in rows)
    (card,) = _artifacts("mini-v1-card", run)
    assert card.type == "markdown" and "dataset.json" in card.data  # link artifacts are rendered as markdown
    (grid,) = _artifacts("mini-v1-grid", run)
    assert "grid.png" in grid.data
    (report,) = _artifacts("mini-v1-report", run)
    assert "| stage |" in report.data
    (progress,) = _artifacts("mini-v1-synthesis-progress", run)
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "images/s" in progress.description


def test_finetune_is_cached_by_content_and_recomputed_when_its_files_are_gone(built, models, root):
    params = FinetuneParams(**miniature_params(root, models, "v1"))
    first = finetune_flow(params, return_state=True)
    assert _task_states(first.state_details.flow_run_id)["finetune-all"] == "Cached"
    adapter = Path(first.result()["all"]["adapter"])
    shutil.rmtree(adapter)
    again = finetune_flow(params, return_state=True)
    states = _task_states(again.state_details.flow_run_id)
    assert sorted(states.values()).count("Completed") >= 1  # the refresh run trained it again
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()


def test_bad_parameters_fail_before_any_work(harness, models, root):
    params = BuildParams(**miniature_params(root, models, "bad", overrides=["synthesis.strength=3"]))
    state = build_flow(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"synthesis\.strength"):
        state.result()
    assert not (root / "mini" / "bad").exists()


def test_regeneration_moves_latest_only_to_a_version_that_verifies(built, models, root):
    params = RegenerateParams(**miniature_params(root, models, "ignored", measure=False), version_prefix="r")
    state = regenerate_flow(params, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    pointer = read_latest(str(root), "mini")
    assert pointer["version"] == out["version"] and out["version"].startswith("r")
    new_store = version_store(str(root), "mini", out["version"])
    assert verify_version(new_store) == []
    # The next regeneration reads the recorded config back from the latest card.
    nxt = regeneration_config(params)
    assert nxt.version != out["version"] and nxt.synthesis.steps == 4

    # A version that does not verify (a shard lost after finalize) never becomes latest.
    v1 = version_store(str(root), "mini", "v1")
    broken_cfg = regeneration_config(params).model_copy(update={"version": "v1"})
    shard = next(p for p in Path(v1.path("synthetic")).iterdir() if p.suffix == ".tar")
    shard.unlink()
    with pytest.raises(RuntimeError, match="does not verify"):
        promote_latest_task.with_options(retries=0).fn(broken_cfg)
    assert read_latest(str(root), "mini")["version"] == out["version"]


def test_split_groups_is_balanced_and_order_preserving():
    names = [f"shard-{i:06d}" for i in range(7)]
    groups = split_groups(names, 3)
    assert [len(g) for g in groups] == [3, 2, 2]
    assert sorted(sum(groups, [])) == names and groups[0][:2] == ["shard-000000", "shard-000003"]
    assert split_groups(names[:2], 8) == [["shard-000000"], ["shard-000001"]]
    assert split_groups([], 4) == []


def test_only_transient_faults_are_retried():
    assert is_transient(ConnectionResetError("peer reset"))
    assert is_transient(TimeoutError())
    assert is_transient(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_transient(ConfigError("bad field"))
    assert not is_transient(FileNotFoundError("manifest"))
    assert not is_transient(RuntimeError("shape mismatch"))
    from realfake.data.shards import LeaseHeldError
    from realfake.data.storage import StorageFullError

    assert not is_transient(StorageFullError("no space left on /out", "space"))  # stays full until someone acts
    assert not is_transient(LeaseHeldError("being written by build 'other'"))


@pytest.mark.parametrize("worker_confirms", [True, False], ids=["cancel-confirmed", "node-gone"])
def test_a_child_past_its_deadline_is_cancelled_then_crashed_if_unconfirmed_and_re_submitted(harness, monkeypatch,
                                                                                              worker_confirms):
    """The deadline path of run_child_deployment against a real Prefect API; this test plays the worker (it reports
    the child Running, then confirms the cancellation or, as a gone node, never answers)."""
    import threading

    from prefect import flow
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Cancelled, Completed, Running

    import tasks.child_runs as child_runs

    # a worker that never answers is given 1 s instead of 60 (what the parent does after it is what is tested)
    monkeypatch.setattr(child_runs, "CANCEL_GRACE_SECONDS", 600.0 if worker_confirms else 1.0)
    name = f"lane-{'confirmed' if worker_confirms else 'gone'}"

    @flow(name=f"hangs-{name}")
    def hangs() -> None:
        pass

    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow(hangs), name="gpu")

        def runs():
            ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            return client.read_flow_runs(deployment_filter=ours)

        result: dict = {}

        def parent():
            try:
                result["run"] = child_runs.run_child_deployment(f"hangs-{name}/gpu", {}, f"group {name}", name,
                                                                deadline_s=1.0, poll_s=0.1)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        thread = threading.Thread(target=parent, daemon=True)
        thread.start()
        (first,) = until("the first child run", runs, 300, every=0.1)
        client.set_flow_run_state(first.id, Running(), force=True)  # a worker started it; then it hangs
        until("the parent cancelling the overdue child",
              lambda: client.read_flow_run(first.id).state.name == "Cancelling", 300, every=0.1)
        if worker_confirms:
            client.set_flow_run_state(first.id, Cancelled(), force=True)
        second = until("the re-submitted child run", lambda: [r for r in runs() if r.id != first.id], 300,
                       every=0.1)[0]
        assert second.name == f"{name}-run-2"
        ended = client.read_flow_run(first.id).state
        if worker_confirms:
            assert ended.is_cancelled()
        else:  # nobody confirmed within the grace: the parent marked it Crashed itself, with the reason
            assert ended.is_crashed() and "no result within its deadline of 1 s" in ended.message
        client.set_flow_run_state(second.id, Running(), force=True)
        client.set_flow_run_state(second.id, Completed(), force=True)
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        assert result["run"].id == second.id and result["run"].state.is_completed()
        assert len(runs()) == 2


def test_rerun_if_lost_reschedules_a_crashed_top_level_run_at_most_three_times_and_never_a_child(harness):
    from uuid import uuid4

    from prefect import flow, task
    from prefect.states import Completed, Crashed, Running

    from tasks.lost_runs import (
        AUTOMATION_NAME,
        LOST_ATTEMPTS,
        RERUN_AUTOMATION_NAME,
        RERUN_DEPLOYMENT,
        WATCH_TAG,
        _same,
        ensure_lost_run_detection,
        rerun_automation,
        rerun_if_lost,
    )

    @flow(name="gpu-work")
    def gpu_work() -> None:
        pass

    @task(name="lane")
    def lane() -> None:  # a parent's task that waits on its child run
        pass

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(gpu_work)
        deployment_id = client.create_deployment(flow_id=flow_id, name="gpu")

        def watched_run(parent_task_run_id=None):
            run = client.create_flow_run_from_deployment(deployment_id, tags=[WATCH_TAG],
                                                         parent_task_run_id=parent_task_run_id)
            client.set_flow_run_state(run.id, Running(), force=True)
            client.set_flow_run_state(run.id, Crashed(message="no heartbeat"), force=True)
            return run

        top = watched_run()
        for crash in range(1, LOST_ATTEMPTS):
            assert rerun_if_lost(f"prefect.flow-run.{top.id}").endswith(
                f"crashed ({crash} of {LOST_ATTEMPTS}): scheduled again on its pool, it resumes")
            state = client.read_flow_run(top.id).state
            assert (state.type.value, state.name) == ("SCHEDULED", "AwaitingRetry")
            assert "nothing to re-run" in rerun_if_lost(top.id)  # a second firing for the same crash
            client.set_flow_run_state(top.id, Running(), force=True)
            client.set_flow_run_state(top.id, Crashed(message="no heartbeat"), force=True)
        assert f"crashed {LOST_ATTEMPTS} times: left Crashed" in rerun_if_lost(top.id)
        assert client.read_flow_run(top.id).state.is_crashed()

        parent = client.create_flow_run(gpu_work)
        task_run = client.create_task_run(lane, parent.id, dynamic_key="0", id=uuid4(), state=Running())
        child = watched_run(parent_task_run_id=task_run.id)
        assert "is a child run: its parent re-submits it" in rerun_if_lost(child.id)
        assert client.read_flow_run(child.id).state.is_crashed()

        unwatched = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(unwatched.id, Crashed(), force=True)
        assert "not a watched deployment run: left Crashed" in rerun_if_lost(unwatched.id)
        done = client.create_flow_run_from_deployment(deployment_id, tags=[WATCH_TAG])
        client.set_flow_run_state(done.id, Completed(), force=True)
        assert "is COMPLETED: nothing to re-run" in rerun_if_lost(done.id)

        # installing: the lost-run automation always; the re-run one once the rerun-lost deployment is registered
        ensure_lost_run_detection()
        assert [a.name for a in client.read_automations_by_name(RERUN_AUTOMATION_NAME)] == []
        rerun_flow_id = client.create_flow_from_name(RERUN_DEPLOYMENT.split("/")[0])
        rerun_id = client.create_deployment(flow_id=rerun_flow_id, name=RERUN_DEPLOYMENT.split("/")[1])
        ensure_lost_run_detection()
        ensure_lost_run_detection()  # idempotent: one of each, the re-run one aimed at that deployment
        (installed,) = client.read_automations_by_name(RERUN_AUTOMATION_NAME)
        assert installed.actions[0].deployment_id == rerun_id
        assert _same(installed, rerun_automation(rerun_id))  # as read back from the server: no update next time
        assert len(client.read_automations_by_name(AUTOMATION_NAME)) == 1
