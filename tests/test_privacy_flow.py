"""The privacy-audit flow in-process on a temporary Prefect server (``prefect_test_harness``).

Runs the real library on the miniature config (random tiny models, one digit per class): the flow plans the
halves, fans the shadow pipelines of both families out as tasks under the GPU concurrency limit, scores LiRA,
runs copy detection and publishes the table, the ROC plot and the copy report as artifacts. In deployment
mode the shadows run as child flow runs of ``privacy-shadows-process``, registered from
``deployments/prefect.yaml`` with the real CLI on the same server and picked up by a real process worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from pydantic import ValidationError

from flows.privacy import PrivacyParams, ShadowFanoutParams, ShadowRunParams, privacy_flow, privacy_shadows_flow
from realfake.build import build_version
from realfake.privacy.audit import LiraConfig, plan_lira
from tests.support.prefect_server import PrefectStack, Worker, miniature_params, write_tiny_models

SHADOW_DEPLOYMENT = "privacy-shadows/privacy-shadows-process"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> PrivacyParams:
    models = write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")
    base = miniature_params(tmp_path_factory.mktemp("out"), models, "v1")
    # One training image per class: ten images, halves of five, so both shadow families stay cheap.
    base["source"] = base["source"] | {"max_per_class": 1}
    base["overrides"] = [*base["overrides"], "finetune.max_steps=1"]
    return PrivacyParams(**base, lira=LiraConfig(n_shadows=4), gpu_limit="privacy-test-gpu")


def _artifacts(key: str, flow_run_id) -> list:
    """The artifacts ``key`` of one flow run (the session's server holds other modules' runs, some of the same keys)."""
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _task_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs if r.state and r.state.is_completed())


def test_params_form_documents_every_field():
    schema = PrivacyParams.model_json_schema()
    for name in ("lira_enabled", "copy_enabled", "lira", "copy_detection", "gpu_limit", "preset", "version"):
        assert schema["properties"][name].get("description"), name
    for section in ("LiraConfig", "CopyDetectionConfig"):
        props = schema["$defs"][section]["properties"]
        assert all(p.get("description") for p in props.values()), section


def test_copy_detection_fails_fast_on_an_unbuilt_version(harness, params):
    state = privacy_flow(params.model_copy(update={"version": "unbuilt"}), return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match="no committed synthetic images"):
        state.result()
    assert not (Path(params.root) / "mini" / "unbuilt" / "runs").exists()  # no shadow was started


def test_privacy_flow_fans_out_shadows_and_publishes_results(harness, params):
    build_version(params.to_config())
    state = privacy_flow(params, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    names = _task_names(state.state_details.flow_run_id)
    for fam in ("real", "synthetic"):
        assert [n for n in names if n.startswith(f"{fam}-shadow-")] == [f"{fam}-shadow-{i}" for i in range(4)]
    for stage in ("privacy-plan", "privacy-score-lira", "privacy-copy-detection"):
        assert any(n.startswith(stage) for n in names), (stage, names)
    metrics = out["lira"]["metrics"]
    assert len(metrics) == 4 and all(0.0 <= m["auc"] <= 1.0 for m in metrics.values())
    assert Path(out["lira"]["files"]["roc"]).is_file()
    (lira,) = _artifacts("mini-privacy-lira", state.state_details.flow_run_id)
    assert "| real-trained (online) |" in lira.data and "lira_roc.png" in lira.data
    (roc,) = _artifacts("mini-privacy-lira-roc", state.state_details.flow_run_id)
    assert "lira_roc.png" in roc.data
    (copy,) = _artifacts("mini-privacy-copy", state.state_details.flow_run_id)
    assert "nearest real is the source" in copy.data and "copy_similarity_hist.png" in copy.data
    assert out["copy"]["n_synthetic"] == 10 and out["copy"]["n_real"] == 10
    assert json.loads(Path(out["copy"]["files"]["summary"]).read_text())["n_synthetic"] == 10


# -- shadows as child flow runs of the shadow deployment, on a real process worker -----------------------------


@pytest.fixture(scope="module")
def shadow_worker(harness, tmp_path_factory):
    """The harness's server with the process pool, the shadow deployment (``prefect deploy``) and one worker."""
    from prefect.settings import PREFECT_API_URL

    stack = PrefectStack(tmp_path_factory.mktemp("prefect-home"), port=urlparse(PREFECT_API_URL.value()).port)
    try:
        stack.cli("work-pool", "create", "realfake-process", "--type", "process")
        stack.cli("--no-prompt", "deploy", "--name", SHADOW_DEPLOYMENT.split("/")[1],
                  "--prefect-file", "deployments/prefect.yaml")
        yield stack.start_worker("realfake-process", "gpu-0", queue="gpu", limit=2)
    finally:
        stack.close()  # stops the worker; the server belongs to the harness


def _children(parent_id) -> list:
    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def _deployment_params(params: PrivacyParams, version: str, **update) -> PrivacyParams:
    fanout = ShadowFanoutParams(mode="deployment", deployment=SHADOW_DEPLOYMENT, shadows_per_run=4)
    return params.model_copy(update={"version": version, "copy_enabled": False, "fanout": fanout, **update})


def test_shadow_run_params_reject_shadows_outside_the_plan():
    lira = LiraConfig(n_shadows=4)
    with pytest.raises(ValidationError, match=r"shadows \[4\] are outside 0\.\.3 \(lira.n_shadows\)"):
        ShadowRunParams(lira=lira, shadows=[0, 4])
    with pytest.raises(ValidationError, match="name a shadow twice"):
        ShadowRunParams(lira=lira, shadows=[1, 1])
    with pytest.raises(ValidationError, match="shadows_per_run"):
        ShadowFanoutParams(shadows_per_run=0)


def test_deployment_mode_fails_before_any_work_when_the_deployment_is_missing(harness, params):
    bad = _deployment_params(params, "nodeploy").model_copy(
        update={"fanout": ShadowFanoutParams(mode="deployment", deployment="privacy-shadows/not-registered")})
    state = privacy_flow(bad, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"fanout.deployment: deployment 'privacy-shadows/not-registered' is not "
                                         "registered"):
        state.result()
    assert not (Path(params.root) / "mini" / "nodeploy").exists()  # not even planned


def test_shadow_flow_alone_needs_the_parents_plan(harness, params):
    child = ShadowRunParams(**params.pinned(params.to_config()) | {"version": "noplan"}, lira=LiraConfig(n_shadows=4),
                            shadows=[0], gpu_limit="privacy-test-gpu")
    state = privacy_shadows_flow(child, return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match=r"noplan/runs/privacy-lira/plan\.json: no LiRA plan"):
        state.result()


@pytest.mark.timeout(300)
def test_shadows_run_as_child_flow_runs_and_a_rerun_starts_only_the_missing_one(shadow_worker: Worker, params):
    fan = _deployment_params(params, "fan")
    state = privacy_flow(fan, return_state=True)
    assert state.is_completed(), f"{state.message}\n--- worker ---\n{shadow_worker.output()[-4000:]}"
    out = state.result()
    parent = state.state_details.flow_run_id
    children = _children(parent)
    assert sorted((c.parameters["params"]["family"], c.parameters["params"]["shadows"]) for c in children) == [
        ("real", [0, 1, 2, 3]), ("synthetic", [0, 1, 2, 3])]
    assert all(c.state.is_completed() and shadow_worker.ran(str(c.id)) for c in children)
    # The parent trained nothing itself; every shadow task ran inside a child.
    assert not [n for n in _task_names(parent) if "-shadow-" in n and not n.startswith("child-")]
    for c in children:
        fam = c.parameters["params"]["family"]
        assert [n for n in _task_names(c.id) if n.startswith(f"{fam}-shadow-")] == [
            f"{fam}-shadow-{i}" for i in range(4)]
    logits = Path(params.root) / "mini" / "fan" / "runs" / "privacy-lira" / "logits"
    assert sorted(p.name for p in logits.iterdir()) == [f"{f}-{i:03d}.npz" for f in ("real", "synthetic")
                                                        for i in range(4)]
    assert out["lira"]["fanout"] == {"mode": "deployment", "skipped": {"real": [], "synthetic": []}}
    assert len(out["lira"]["metrics"]) == 4  # scored from the logits the children stored

    (logits / "real-002.npz").unlink()
    again = privacy_flow(fan, return_state=True)
    assert again.is_completed(), f"{again.message}\n--- worker ---\n{shadow_worker.output()[-4000:]}"
    (child,) = _children(again.state_details.flow_run_id)
    assert (child.parameters["params"]["family"], child.parameters["params"]["shadows"]) == ("real", [2])
    assert child.state.is_completed() and (logits / "real-002.npz").is_file()
    assert again.result()["lira"]["fanout"]["skipped"] == {"real": [0, 1, 3], "synthetic": [0, 1, 2, 3]}


def test_a_child_told_other_lira_settings_than_the_plan_is_refused(harness, params):
    cfg = params.model_copy(update={"version": "seeded"}).to_config()
    plan_lira(cfg, LiraConfig(n_shadows=4, split_seed=0))
    child = ShadowRunParams(**params.pinned(cfg), lira=LiraConfig(n_shadows=4, split_seed=1), shadows=[0],
                            gpu_limit="privacy-test-gpu")
    state = privacy_shadows_flow(child, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"lira.split_seed 0 in the plan, 1 here"):
        state.result()
    assert not (Path(params.root) / "mini" / "seeded" / "runs" / "privacy-lira" / "logits").exists()


@pytest.mark.timeout(300)
def test_a_failed_child_run_fails_the_parent_naming_its_shadows(shadow_worker: Worker, params):
    bad = _deployment_params(
        params, "badshadow", lira=LiraConfig(n_shadows=4, families=["real"]),
        fanout=ShadowFanoutParams(mode="deployment", deployment=SHADOW_DEPLOYMENT, shadows_per_run=2),
        # valid for the parent's pre-flight, fatal where a shadow builds its classifier
        overrides=[*params.overrides, "classifier.model_kwargs={no_such_kwarg: 1}"],
    )
    state = privacy_flow(bad, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError) as err:
        state.result()
    message = str(err.value)
    assert "privacy audit of mini/badshadow: 2 shadow run(s) failed" in message
    for batch in ("real shadows 0, 1", "real shadows 2, 3"):
        assert f"mini/badshadow, {batch}: child flow run" in message and "ended FAILED" in message, message
    # The child names the shadow of its batch that failed, with the library's own error.
    assert "real shadow 0 of mini/badshadow: " in message and "no_such_kwarg" in message, message
    children = _children(state.state_details.flow_run_id)
    assert len(children) == 2 and all(c.state.is_failed() for c in children)  # a failed child is not retried
    assert not (Path(params.root) / "mini" / "badshadow" / "runs" / "privacy-lira" / "logits").exists()
