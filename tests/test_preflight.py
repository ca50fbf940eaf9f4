"""Pre-flight: a configuration that validates but cannot run fails in seconds, naming every bad field."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import mini_config

from realfake.config import ConfigError
from realfake.preflight import PreflightError, check_model, preflight


def _two_classes(tmp_path: Path) -> str:
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
    return str(tmp_path / "src")


def test_a_runnable_config_passes_in_seconds(tmp_path, tiny_base, digits_folder):
    cfg = mini_config(str(tmp_path / "out"), tiny_base, digits_folder)
    t = time.perf_counter()
    checked = preflight(cfg)
    assert time.perf_counter() - t < 10
    assert {"source.uri", "root", "device", "models.base", "models.clip", "classifier"} <= set(checked)


def test_every_problem_is_listed_with_its_field_and_value(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "not-a-folder").write_text("x")
    cfg = mini_config(str(tmp_path / "not-a-folder" / "out"), str(tmp_path / "missing" / "model"),
                      str(tmp_path / "no-source"), device="cuda:7",
                      models={"base": str(tmp_path / "missing" / "model"), "clip": "some-org/not-cached-clip"},
                      synthesis__prompt_template="photo of {class_name} in {place}",
                      classifier__model="resnet9000", classifier__opt="sgdx", classifier__scale=[0.9, 0.1])
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)
    expected = [
        f"source.uri = '{tmp_path / 'no-source'}': does not exist",
        "root = ", "is not a folder",
        "device = 'cuda:7'",
        "synthesis.prompt_template = 'photo of {class_name} in {place}': unknown placeholder(s) ['place']",
        f"models.base = '{tmp_path / 'missing' / 'model'}': the folder does not exist",
        "models.clip = 'some-org/not-cached-clip': not in the Hugging Face cache",
        "classifier.model = 'resnet9000'", "classifier.opt = 'sgdx'", "classifier.scale = (0.9, 0.1)",
    ]
    for part in expected:
        assert part in msg, part
    assert len(err.value.problems) == 9


def test_incomplete_model_folder_names_the_missing_files(tmp_path, tiny_base):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_base, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    problem = check_model("sd", str(broken))
    assert problem == ("not a complete Stable Diffusion save: missing scheduler/scheduler_config.json, "
                       "unet/*.safetensors")
    assert check_model("clip", str(broken)) is None  # the CLIP tower in clip/ is complete
    (broken / "clip" / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json" in check_model("clip", str(broken))
    assert check_model("sd", str(broken / "model_index.json")) == "is a file, not a model folder"


def test_hub_ids_are_checked_against_the_cache_when_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-sd" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (cache / "models--org--tiny-sd" / "refs").mkdir()
    (cache / "models--org--tiny-sd" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert check_model("sd", "org/tiny-sd") is None
    assert "not in the Hugging Face cache" in check_model("sd", "org/other")
    assert "not in the Hugging Face cache" in check_model("sd", "org/tiny-sd", revision="v2")
    assert "nor a valid hub id" in check_model("sd", "bad id with spaces")
    assert check_model("sd", "realfake-demo-base") is None  # built on first use


def test_single_class_fails_only_when_a_classifier_is_trained(tmp_path, tiny_base):
    (tmp_path / "src" / "only").mkdir(parents=True)
    (tmp_path / "src" / ".hidden").mkdir()
    cfg = mini_config(str(tmp_path / "out"), tiny_base, str(tmp_path / "src"))
    with pytest.raises(PreflightError, match="single class folder: a classifier needs at least two classes"):
        preflight(cfg, measure=True)
    assert "source.uri" in preflight(cfg, measure=False)


def test_presplit_sources_count_the_train_classes(tmp_path, tiny_base):
    for split in ("train", "test"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
    cfg = mini_config(str(tmp_path / "out"), tiny_base, str(tmp_path / "src"))
    with pytest.raises(PreflightError, match="single class folder"):
        preflight(cfg)
    (tmp_path / "src" / "train" / "b").mkdir()
    preflight(cfg, check_models=False)


@pytest.mark.parametrize(("device", "ok"), [("cpu", True), ("auto", True), ("gpu", False), ("cuda:0", None)])
def test_device_is_checked(tmp_path, tiny_base, device, ok):
    import torch

    if ok is None:
        ok = torch.cuda.is_available()
    cfg = mini_config(str(tmp_path / "out"), tiny_base, _two_classes(tmp_path), device=device)
    if ok:
        preflight(cfg, check_models=False)
    else:
        with pytest.raises(PreflightError, match=f"device = '{device}'"):
            preflight(cfg, check_models=False)
