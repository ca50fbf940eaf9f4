"""What the Prefect UI's forms send and what its artifacts show, without a browser (tests/test_ui_browser.py drives
the real UI): a section edited in the form overrides only the fields filled in; a child run still rebuilds its
parent's config exactly; the measures table gives every row every column; images are embedded small; the
library's progress lines are throttled and reach a run's log and a progress artifact."""

from __future__ import annotations

import base64
import io
import logging

import pytest
from PIL import Image
from support.s3 import S3Env, moto, s3  # noqa: F401 - pytest fixtures

from flows.params import BuildParams, ConfigParams, ShardGroupParams, config_rows
from realfake.config import load_config
from tests.support.config_diff import differences


def test_one_field_of_a_section_changes_that_field_only() -> None:
    preset = load_config("demo").model_dump(mode="json")
    # what the UI sends once a person toggles `finetune` and fills Max Steps (untouched fields absent or null)
    for sent in ({"max_steps": 200}, {"max_steps": 200, "rank": None, "learning_rate": None, "random_flip": None}):
        cfg = BuildParams.model_validate({"preset": "demo", "finetune": sent}).to_config()
        assert differences(cfg.model_dump(mode="json"), preset) == {"finetune.max_steps"}
        assert (cfg.finetune.rank, cfg.finetune.learning_rate, cfg.finetune.batch_size) == (8, 1e-3, 64)
    # a toggled section left empty changes nothing
    cfg = BuildParams.model_validate({"preset": "demo", "finetune": {}, "classifier": {}}).to_config()
    assert differences(cfg.model_dump(mode="json"), preset) == set()


def test_the_form_prefills_nothing_and_quotes_the_paper_and_the_preset() -> None:
    schema = BuildParams.model_json_schema()
    section = schema["$defs"]["FinetuneConfigForm"]
    assert not section.get("required")
    for name, prop in section["properties"].items():
        assert "default" not in prop, name  # the UI would fill it in and send it
        assert {"type": "null"} not in prop.get("anyOf", []), name
    rank = section["properties"]["rank"]
    assert rank["type"] == "integer"
    assert "Paper (library default): 4." in rank["description"] and "demo preset: 8." in rank["description"]
    assert "demo preset" not in section["properties"]["mmd_weight"]["description"]  # the same as the paper's


def test_a_child_run_keeps_a_none_the_library_does_not_default_to(tmp_path) -> None:
    cfg = load_config(preset="demo", overrides=[f"root={tmp_path}", "finetune.snr_gamma=null",
                                                "finetune.max_grad_norm=null", "train_data.mix_ratio=null"])
    child = ShardGroupParams(**ConfigParams().pinned(cfg), shard_names=["shard-000000"])
    assert child.to_config() == cfg


def test_a_child_run_sent_without_its_none_values_rebuilds_the_parents_config(tmp_path) -> None:
    # Fan-out parents send a child's parameters without None values (the server's schema of a section field has no
    # null): a None the form's default preset sets otherwise (demo: source.max_per_class 200, crop_pct 1.0) stays
    cfg = load_config(preset="demo", overrides=[f"root={tmp_path}", "source.max_per_class=null",
                                                "classifier.crop_pct=null", "finetune.snr_gamma=null"])
    child = ShardGroupParams(**ConfigParams().pinned(cfg), shard_names=["shard-000000"])
    sent = child.model_dump(mode="json", exclude_none=True)
    assert ShardGroupParams.model_validate(sent).to_config() == cfg


def test_the_configuration_rows_say_who_set_each_field() -> None:
    params = BuildParams(preset="demo", finetune={"max_steps": 200}, overrides=["synthesis.seed=3"])
    rows = {r["field"]: r for r in config_rows(params, params.to_config())}
    assert rows["finetune.max_steps"]["set by"] == "form or override"
    assert rows["synthesis.seed"]["set by"] == "form or override"
    assert rows["finetune.rank"] == {"field": "finetune.rank", "this run": "8", "preset": "8", "paper": "4",
                                     "set by": "preset"}
    assert "finetune.mmd_weight" not in rows  # the paper's value, untouched


def test_every_measure_of_every_row_is_a_column() -> None:
    from tasks.artifacts import measure_rows

    measures = {"real": {"top1": 0.9, "top5": 1.0, "train_images": 20, "per_class": [0.9, 0.8]},
                "realfake": {"top1": 0.7, "top5": 0.95, "train_images": 20, "label_fidelity": 0.65,
                             "mmd": 0.0123456, "frechet": 12.345, "per_class": [0.7, 0.6]}}
    rows = measure_rows(measures)
    assert [list(r) for r in rows] == [list(rows[1])] * 2  # the same columns, in the same order
    real, fake = rows
    assert fake["trained on"] == "(c) Real-Fake synthetic"
    assert (fake["label fidelity %"], fake["MMD to real test"], fake["Frechet to real test"]) == (65.0, 0.01235, 12.345)
    assert real["label fidelity %"] is None and real["real-test top-1 %"] == 90.0


def test_an_embedded_image_is_a_small_png() -> None:
    from tasks.artifacts import embedded_png

    big = Image.effect_noise((3000, 900), 60).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    uri, size = embedded_png(buf.getvalue(), max_side=1200, max_bytes=400_000)
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert len(data) <= 400_000
    shown = Image.open(io.BytesIO(data))
    assert shown.size == size and max(size) <= 1200 and shown.format == "PNG"


def test_progress_lines_are_throttled() -> None:
    from realfake.progress import LOGGER, StageProgress

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep, logger = Keep(), logging.getLogger(LOGGER)
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        shown = StageProgress("finetune", 5, "step", "mini", "v1", scope="all", samples_per_unit=8, every_s=3600)
        for step in range(1, 6):
            shown.update(step, loss=0.5 / step)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    records = keep.records
    assert [r.realfake_progress["done"] for r in records] == [1, 5]  # the first and the last, none between
    first = records[0].realfake_progress
    assert first["text"].startswith("finetune mini/v1 all: step 1/5 (20%), loss 0.5, ")
    assert "samples/s" in first["text"] and "ETA" in first["text"] and first["eta_s"] >= 0


@pytest.mark.slow
def test_progress_reaches_the_run_log_and_a_progress_artifact(harness) -> None:
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    import tasks.artifacts  # noqa: F401 - installs the bridge, as every flow module does
    from realfake.progress import StageProgress

    @task
    def train() -> None:
        shown = StageProgress("finetune", 3, "step", "mini", "v1", scope="all", samples_per_unit=8, every_s=0)
        for step in range(1, 4):
            shown.update(step, loss=1.0 / step)

    @flow(name="progress-bridge")
    def run() -> None:
        train()

    state = run(return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    # Run logs reach the server in background batches: drain them (no timeout) before reading them back,
    # or a loaded machine reads the log before the batch holding step 2 is sent.
    from prefect.logging.handlers import APILogWorker
    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    progress = [a for a in artifacts if a.key == "mini-v1-finetune-progress"]
    assert len(progress) == 1 and progress[0].type == "progress" and progress[0].data == 100.0
    assert progress[0].description.startswith("finetune mini/v1 all: step 3/3 (100%), loss 0.3333")
    assert any("finetune mini/v1 all: step 2/3 (67%), loss 0.5" in entry.message for entry in logs)


@pytest.mark.slow
def test_the_grid_of_an_s3_root_is_embedded(harness, s3: S3Env) -> None:  # noqa: F811
    """An S3 root's grid reaches the UI as the local one does: read through the store's options and embedded (no
    pre-signed URL, no link the browser cannot open)."""
    import fsspec
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.artifacts import publish_grid

    grid = Image.new("RGB", (300, 120), (200, 30, 30))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    uri = f"{s3.root}/mini/v1/report/grid.png"
    with fsspec.open(uri, "wb", **s3.storage_options) as f:
        f.write(buf.getvalue())

    @flow(name="s3-grid")
    def publish() -> None:
        publish_grid(uri, "mini", "v1", s3.storage_options)

    state = publish(return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    md = {a.key: a for a in artifacts}["mini-v1-grid"].data
    assert f"Grid file: `{uri}`" in md and "X-Amz-" not in md
    embedded = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    shown = Image.open(io.BytesIO(base64.b64decode(embedded)))
    assert shown.size == (300, 120) and shown.getpixel((10, 10)) == (200, 30, 30)
