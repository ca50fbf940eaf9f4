"""``realfake plan``: counts, schedules, bytes and GPU-hours of a build, checked against arithmetic done by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realfake.config import ConfigError, load_config
from realfake.plan import build_plan, format_plan, load_plan_config

REPO = Path(__file__).resolve().parent.parent
# The paper's recipe at 8 GPUs, written out so the test does not move when a preset's defaults do.
IMAGENETTE = [
    "finetune.epochs=100", "finetune.max_steps=null", "finetune.batch_size=64", "finetune.gradient_accumulation=1",
    "finetune.cache_latents=true", "finetune.resolution=512", "caption.enabled=true", "guidance.enabled=true",
    "synthesis.images_per_real=1", "synthesis.batch_size=16", "synthesis.compile=false", "synthesis.resolution=512",
    "synthesis.steps=30", "synthesis.strength=0.75", "classifier.epochs=200", "classifier.batch_size=128",
    "train_data.streaming=false", "shards.image_format=jpg", "shards.format=webdataset",
]


def test_imagenette_plan_matches_the_hand_arithmetic():
    cfg, listable = load_plan_config("imagenette", overrides=IMAGENETTE)
    assert not listable  # the preset leaves source.uri unset: the counts come from the paper
    plan = build_plan(cfg, gpus=8, list_source=listable)

    # Tab. 5 (METHOD.md): ImageNette 12,811 train / 1,000 test / 10 classes
    assert (plan["real"]["train"], plan["real"]["test"], plan["real"]["classes"]) == (12_811, 1_000, 10)
    assert "Tab. 5" in plan["real"]["source"] and "source.uri not set" in plan["real"]["source"]
    assert plan["synthetic"]["images"] == 12_811  # 12,811 x 1 image per real image

    ft = plan["finetune"]
    assert ft["steps_per_epoch"] == 201  # ceil(12,811 / 64) = ceil(200.17)
    assert ft["steps"] == 20_100  # 100 epochs x 201
    assert ft["samples"] == 1_286_400  # 20,100 x 64
    assert ft["micro_batch"] == 8  # 64 / (8 GPUs x 1 accumulation): the authors' 8 per GPU
    assert not ft["capped"]

    clf = plan["classifier"]
    # map-style data on 8 processes: ceil(12,811 / 8) = 1,602 per process, 1,602 // (128 / 8 = 16) = 100 steps
    assert (clf["steps_per_epoch"], clf["steps"]) == (100, 20_000)  # x 200 epochs
    assert clf["image_passes"] == 2_560_000  # 100 x 128 x 200 (the partial last global batch is dropped)

    stages = {s["stage"]: s for s in plan["stages"]}
    # gpu_finetune.json: 35.03 samples/s with latents cached, H200 -> 1,286,400 / 35.03 / 3600 = 10.20 GPU-hours
    fine = stages["fine-tuning (LoRA)"]
    assert fine["gpu_hours"] == pytest.approx(10.20, rel=1e-3)
    assert fine["wall_hours"] == pytest.approx(10.20 / 8, rel=1e-3)
    assert "H200" in fine["rate"] and "gpu_finetune.json" in fine["rate"]
    # gpu_synthesis_eager.json: engine at batch 16, 5.269 images/s, H200 -> 12,811 / 5.269 / 3600 = 0.6754
    gen = stages["generation"]
    assert gen["gpu_hours"] == pytest.approx(0.6754, rel=1e-3)
    assert "NVIDIA H200" in gen["rate"] and "gpu_synthesis_eager.json" in gen["rate"] and "batch 16" in gen["rate"]
    assert plan["gpu_hours_measured"] == pytest.approx(10.20 + 0.6754, rel=1e-3)
    for stage in ("captioning (BLIP-2)", "guidance embedding (CLIP)", "classifier training"):
        assert stages[stage]["gpu_hours"] is None and stages[stage]["rate"] == "not measured"
    assert plan["not_measured"] == ["captioning (BLIP-2)", "guidance embedding (CLIP)", "classifier training"]

    b = plan["bytes"]
    # 512 px photographs as JPEG q95: tens to a few hundred KB each; the total is per sample x 12,811
    assert 30_000 < b["per_image"] < 300_000
    assert b["per_sample"] == b["per_image"] + 1024 + 2304  # JSON (assumed 1 KiB) + tar headers and padding
    assert b["total"] == b["per_sample"] * 12_811
    assert "photographs" in b["method"] and "jpg q95" in b["method"]

    text = format_plan(plan)
    assert "| fine-tuning | 20,100 steps, 1,286,400 samples" in text
    assert "| generation | 12,811 images | 0.675 | 0.0844 |" in text


def test_a_sampler_setting_without_a_measured_rate_is_not_measured():
    cfg, listable = load_plan_config("imagenette", overrides=[*IMAGENETTE, "synthesis.resolution=768"])
    gen = {s["stage"]: s for s in build_plan(cfg, gpus=8, list_source=listable)["stages"]}["generation"]
    assert gen["gpu_hours"] is None and gen["rate"].startswith("not measured at 768 px")
    cfg, listable = load_plan_config("imagenette", overrides=[*IMAGENETTE, "synthesis.batch_size=12"])
    gen = {s["stage"]: s for s in build_plan(cfg, gpus=8, list_source=listable)["stages"]}["generation"]
    assert "batch 8 (nearest measured batch to 12)" in gen["rate"]  # 8 and 16 are both 4 away: the smaller


def _tree(root: Path, counts: dict[str, dict[str, int]]) -> str:
    rng = np.random.default_rng(0)
    for split, classes in counts.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / split / name / f"{i}.png")
    return str(root)


def test_a_listed_tree_gives_its_own_counts_and_per_class_adapters(tmp_path):
    uri = _tree(tmp_path / "src", {"train": {"cat": 5, "dog": 11}, "test": {"cat": 2, "dog": 3}})
    cfg = load_config(data={
        "dataset": "pets-mini", "source": {"uri": uri},
        "finetune": {"scope": "per_class", "epochs": 3, "max_steps": None, "batch_size": 8},
        "synthesis": {"images_per_real": 2, "resolution": 64},
        "shards": {"image_format": "png"},
    })
    plan = build_plan(cfg, gpus=1)
    assert (plan["real"]["train"], plan["real"]["test"], plan["real"]["classes"]) == (16, 5, 2)
    assert plan["real"]["source"].startswith(f"listed {uri}")
    assert plan["synthetic"]["images"] == 32  # 16 x 2
    # one adapter per class: cat ceil(5 / 8) = 1 step per epoch, dog ceil(11 / 8) = 2; x 3 epochs = 3 + 6
    assert (plan["finetune"]["adapters"], plan["finetune"]["steps"], plan["finetune"]["samples"]) == (2, 9, 72)
    assert "2 of the source's training images" in plan["bytes"]["method"] and "png" in plan["bytes"]["method"]
    # noise does not compress: a 64 x 64 RGB PNG of it holds about its 12,288 raw bytes
    assert 10_000 < plan["bytes"]["per_image"] < 16_000

    paper = build_plan(cfg.model_copy(update={"dataset": "pets"}), list_source=False)
    assert (paper["real"]["train"], paper["real"]["classes"]) == (3_680, 37)  # Tab. 5 for Pets


def test_a_split_by_fraction_counts_what_ingest_will_split(tmp_path):
    uri = _tree(tmp_path, {"src": {"a": 10, "b": 5}})
    cfg = load_config(data={"dataset": "x", "source": {"uri": f"{uri}/src", "test_fraction": 0.2},
                            "finetune": {"max_steps": 4, "batch_size": 8}})
    real = build_plan(cfg)["real"]
    assert (real["train"], real["test"]) == (12, 3)  # a: round(10 x 0.2) = 2 test, b: round(5 x 0.2) = 1


def test_an_unlistable_source_of_an_unknown_dataset_is_one_clear_error(tmp_path):
    cfg = load_config(data={"dataset": "mine", "source": {"uri": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert "\n" not in str(e.value) and "source.uri" in str(e.value) and "'mine'" in str(e.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "realfake.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_the_plan_command_prints_the_tables_and_json():
    sets = [a for s in IMAGENETTE for a in ("--set", s)]
    out = _cli("-p", "imagenette", "--gpus", "8", *sets)
    assert out.returncode == 0, out.stderr
    assert "| real images | 12,811 train, 1,000 test, 10 classes | paper Tab. 5" in out.stdout
    # 1,286,400 / 35.03 / 3600 = 10.2006 GPU-hours, / 8 GPUs = 1.2751 wall hours (3 significant digits)
    assert "| fine-tuning (LoRA) | 1 adapter(s), 20,100 steps x 64 = 1,286,400 samples | 10.2 | 1.28 |" in out.stdout
    as_json = _cli("-p", "imagenette", "--gpus", "8", "--json", *sets)
    assert json.loads(as_json.stdout)["finetune"]["steps"] == 20_100


def test_the_plan_command_names_a_batch_that_does_not_split_in_one_line():
    out = _cli("-p", "imagenette", "--gpus", "8", "--set", "finetune.batch_size=8", "--set",
               "finetune.mmd_weight=0.003")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "finetune.batch_size" in out.stderr and "--gpus 8" in out.stderr


def test_the_build_flow_publishes_the_plan_before_any_work(harness, tmp_path):
    """The plan is the build's first artifact: a build stopped at its version lease (held by another build) has it."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.build import build_flow
    from flows.params import BuildParams
    from tasks.lease import build_lease

    # four shard groups sharing this node's device (local fan-out): the plan's wall hours are for one GPU, not four
    params = BuildParams(preset="demo", root=str(tmp_path / "out"), measure=False, fanout={"groups": 4})
    with build_lease(params.to_config()):
        state = build_flow(params, return_state=True)
    assert state.is_failed() and "lease" in (state.message or "").lower()
    run = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run]))
        artifacts = client.read_artifacts(artifact_filter=runs)
    published = [a for a in artifacts if a.key]  # Prefect's own unkeyed result record aside
    assert sorted(a.key for a in published) == ["demo-v1-config", "demo-v1-plan"]  # nothing else ran
    plan = next(a for a in published if a.key == "demo-v1-plan")
    assert "| real images | 2,000 train, 1,000 test, 10 classes | listed " in plan.data
    assert " 1 GPU(s) |" in plan.data and "4 GPU(s)" not in plan.data


def test_batches_are_split_over_the_planned_gpus():
    cfg, listable = load_plan_config("imagenette", overrides=[*IMAGENETTE, "classifier.batch_size=100"])
    assert build_plan(cfg, gpus=4, list_source=listable)["classifier"]["micro_batch"] == 25  # 100 / 4
    with pytest.raises(ConfigError, match=r"classifier\.batch_size.*--gpus 8"):
        build_plan(cfg, gpus=8, list_source=listable)  # 100 images do not split over 8 GPUs
