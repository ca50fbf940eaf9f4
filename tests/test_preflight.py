"""Pre-flight: a configuration that validates but cannot run fails in seconds, naming every bad field."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import mini_config
from support.s3 import moto  # noqa: F401 - pytest fixture

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


# --------------------------------------------------------------------------------------------------------
# Pretrained classifier weights: resolved before any training, the way timm resolves them
# --------------------------------------------------------------------------------------------------------
NARROW = {"channels": [8, 16, 32, 64]}  # the miniature classifier: resnet18 at 1/8 width


def _save_state_dict(path: Path, model: str, **kwargs) -> dict:
    import timm
    import torch

    torch.manual_seed(1)
    state = timm.create_model(model, pretrained=False, **kwargs).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return state


def _with_weights(tmp_path: Path, tiny_base: str, **classifier):
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True, exist_ok=True)
    return mini_config(str(tmp_path / "out"), tiny_base, str(tmp_path / "src"),
                       **{f"classifier__{k}": v for k, v in classifier.items()})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_pretrained_weights_file_passes_and_is_what_timm_loads(tmp_path, tiny_base, suffix):
    from realfake.classify import build_classifier

    weights = tmp_path / f"narrow-resnet18{suffix}"
    saved = _save_state_dict(weights, "resnet18", num_classes=1000, **NARROW)
    cfg = _with_weights(tmp_path, tiny_base, pretrained=True,
                        model_kwargs={**NARROW, "pretrained_cfg_overlay": {"file": str(weights)}})
    assert "classifier" in preflight(cfg, check_models=False)
    # the file preflight accepted is the one the classifier starts from (its head replaced for 2 classes)
    net = build_classifier(cfg.classifier, 2).net
    assert all((net.state_dict()[k] == v).all() for k, v in saved.items() if not k.startswith("fc."))
    assert net.fc.out_features == 2


def test_unusable_weights_files_fail_naming_the_field_the_file_and_the_reason(tmp_path, tiny_base):
    from realfake.classify import build_classifier

    missing = tmp_path / "nowhere" / "weights.pth"
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    wider = tmp_path / "wide-resnet18.pth"
    _save_state_dict(wider, "resnet18", num_classes=10, channels=[16, 32, 64, 128])
    vit = tmp_path / "test-vit.safetensors"
    _save_state_dict(vit, "test_vit")
    overlay = "classifier.model_kwargs.pretrained_cfg_overlay.file"
    cases = {
        missing: "the file does not exist",
        tmp_path: "is a folder, not a weights file",
        text: r"cannot be read as a state dict \(\w+: .+\); save one with torch.save",
        wider: (r"\d+ of its tensors do not fit resnet18 with model_kwargs \{'channels': \[8, 16, 32, 64\]\} \(e.g. "
                r"layer1.0.conv1.weight: \(16, 64, 3, 3\) in the file, \(8, 64, 3, 3\) in the model\): weights of "
                "another model or of other model_kwargs\\?"),
        vit: r"none of its 80 tensors is a parameter of resnet18 \(e.g. \['blocks.0.attn.proj.bias', ",
    }
    for path, expected in cases.items():
        cfg = _with_weights(tmp_path, tiny_base, pretrained=True,
                            model_kwargs={**NARROW, "pretrained_cfg_overlay": {"file": str(path)}})
        t = time.perf_counter()
        with pytest.raises(PreflightError) as err:
            preflight(cfg, check_models=False)
        assert time.perf_counter() - t < 10
        assert len(err.value.problems) == 1
        assert re.match(re.escape(f"{overlay} = '{path}': ") + expected, err.value.problems[0]), err.value.problems
    # what preflight refuses, timm refuses too, only later
    cfg = _with_weights(tmp_path, tiny_base, pretrained=True,
                        model_kwargs={**NARROW, "pretrained_cfg_overlay": {"file": str(wider)}})
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_classifier(cfg.classifier, 2)
    # checkpoint_path is loaded whether or not pretrained is set
    cfg = _with_weights(tmp_path, tiny_base, model_kwargs={**NARROW, "checkpoint_path": str(missing)})
    with pytest.raises(PreflightError, match=r"classifier.model_kwargs.checkpoint_path = '.*weights.pth': the file "):
        preflight(cfg, check_models=False)


def test_pretrained_tag_must_be_in_the_hub_cache_when_offline(tmp_path, tiny_base, monkeypatch):
    import huggingface_hub.constants
    import timm
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # timm's download, read at import
    for model in ("test_resnet", "test_resnet.r160_in1k"):
        cfg = _with_weights(tmp_path, tiny_base, model=model, pretrained=True, model_kwargs={})
        with pytest.raises(PreflightError) as err:
            preflight(cfg, check_models=False)
        assert err.value.problems == [
            f"classifier.pretrained = True (classifier.model = '{model}'): its weights, hub repo "
            f"timm/test_resnet.r160_in1k: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: download "
            "it on a machine with network access (hf download timm/test_resnet.r160_in1k) or give a local weights "
            "file as classifier.model_kwargs.pretrained_cfg_overlay = {file: PATH}"
        ]
    # the layout `hf download` leaves: a snapshot with the weights and refs/main pointing at it
    repo = cache / "models--timm--test_resnet.r160_in1k"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    torch.manual_seed(2)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    cfg = _with_weights(tmp_path, tiny_base, model="test_resnet", pretrained=True, model_kwargs={})
    assert "classifier" in preflight(cfg, check_models=False)
    # and timm, offline, loads exactly that file
    loaded = timm.create_model("test_resnet", pretrained=True, cache_dir=str(cache)).state_dict()
    assert all((loaded[k] == v).all() for k, v in state.items())


def test_a_model_without_pretrained_weights_cannot_ask_for_them(tmp_path, tiny_base):
    cfg = _with_weights(tmp_path, tiny_base, model="resnet200", pretrained=True, model_kwargs={})
    with pytest.raises(PreflightError, match=r"classifier.pretrained = True \(classifier.model = 'resnet200'\): timm "
                                             r"has no pretrained weights for this model"):
        preflight(cfg, check_models=False)
    preflight(_with_weights(tmp_path, tiny_base, model="resnet200", pretrained=False, model_kwargs={}),
              check_models=False)


# --------------------------------------------------------------------------------------------------------
# Per stage, and object storage in one bounded request
# --------------------------------------------------------------------------------------------------------
def test_each_stage_checks_only_what_it_uses(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = mini_config(str(tmp_path / "out"), "org/no-base", _two_classes(tmp_path), device="gpu",
                      models={"base": "org/no-base", "clip": "org/no-clip", "captioner": "org/no-captioner"},
                      caption={"enabled": True}, classifier__model="resnet9000")

    def fields(stage: str) -> list[str]:
        with pytest.raises(PreflightError) as err:
            preflight(cfg, stage=stage)
        return [p.split(" = ")[0] for p in err.value.problems]

    assert fields("build") == ["device", "models.base", "models.clip", "models.captioner", "classifier.model"]
    assert fields("prepare") == ["device", "models.clip", "models.captioner"]
    assert fields("finetune") == fields("synthesize") == ["device", "models.base"]
    assert fields("train-eval") == ["device", "classifier.model"]
    assert preflight(cfg, stage="finalize") == ["root"]
    assert preflight(cfg, stage="synthesize", skip=("device",), check_models=False) == [
        "root", "source.uri", "synthesis.prompt_template", "guidance.slot"]
    with pytest.raises(ValueError, match="unknown stage 'deploy'"):
        preflight(cfg, stage="deploy")


@pytest.mark.s3
def test_an_object_store_is_probed_with_one_request_and_the_failure_names_root(tmp_path, tiny_base, moto):  # noqa: F811
    # Every request fails with 503 SlowDown, which s3fs and botocore would otherwise retry for a minute
    from support.s3 import BUCKET, FaultyProxy, s3_options

    from realfake.data.storage import resolve_storage_options

    with FaultyProxy(moto.port, failure_rate=1.0, after_share=0.0) as proxy:
        cfg = mini_config(f"s3://{BUCKET}/probe", tiny_base, _two_classes(tmp_path),
                          storage={"endpoint_url": proxy.endpoint_url})
        opts = {k: v for k, v in s3_options(proxy.endpoint_url).items() if k in ("key", "secret")}
        assert resolve_storage_options(cfg.storage, opts)["endpoint_url"] == proxy.endpoint_url
        with pytest.raises(PreflightError) as err:
            preflight(cfg, opts, stage="finalize")
        assert proxy.counts.requests == 1
    (problem,) = err.value.problems
    assert problem.startswith(f"root = 's3://{BUCKET}/probe': cannot be reached (") and "Service Unavailable" in problem
    # the same store behind no proxy: reached
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"endpoint_url": moto.endpoint_url})})
    assert preflight(cfg, opts, stage="finalize") == ["root"]
