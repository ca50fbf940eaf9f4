"""The privacy-audit flow in-process on a temporary Prefect server (``prefect_test_harness``).

Runs the real library on the miniature config (random tiny models, one digit per class): the flow plans the
halves, fans the shadow pipelines of both families out as tasks under the GPU concurrency limit, scores LiRA,
runs copy detection and publishes the table, the ROC plot and the copy report as artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.privacy import PrivacyParams, privacy_flow
from realfake.build import build_version
from realfake.privacy.audit import LiraConfig
from tests.support.prefect_server import miniature_params, write_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> PrivacyParams:
    models = write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")
    base = miniature_params(tmp_path_factory.mktemp("out"), models, "v1")
    # One training image per class: ten images, halves of five, so both shadow families stay cheap.
    base["source"] = base["source"] | {"max_per_class": 1}
    base["overrides"] = [*base["overrides"], "finetune.max_steps=1"]
    return PrivacyParams(**base, lira=LiraConfig(n_shadows=4), gpu_limit="privacy-test-gpu")


def _artifacts(key: str) -> list:
    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


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
    (lira,) = _artifacts("mini-privacy-lira")
    assert "| real-trained (online) |" in lira.data and "lira_roc.png" in lira.data
    (roc,) = _artifacts("mini-privacy-lira-roc")
    assert "lira_roc.png" in roc.data
    (copy,) = _artifacts("mini-privacy-copy")
    assert "nearest real is the source" in copy.data and "copy_similarity_hist.png" in copy.data
    assert out["copy"]["n_synthetic"] == 10 and out["copy"]["n_real"] == 10
    assert json.loads(Path(out["copy"]["files"]["summary"]).read_text())["n_synthetic"] == 10
