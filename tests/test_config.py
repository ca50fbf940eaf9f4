"""Configuration: presets validate, defaults equal the paper's recipes, bad input names the field."""

from __future__ import annotations

import pytest

from realfake.config import NEGATIVE_PROMPT, BuildConfig, ConfigError, available_presets, load_config

PRODUCTION = ["imagenette", "in100", "in1k", "cub", "cars", "pets", "eurosat"]


def test_every_preset_ships_and_validates():
    assert set(PRODUCTION + ["demo"]) <= set(available_presets())
    load_config("demo")
    for name in PRODUCTION:
        cfg = load_config(name, overrides=[f"source.uri=/data/{name}"])
        assert cfg.models.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert cfg.models.clip == "openai/clip-vit-large-patch14"
        assert cfg.synthesis.steps == 30 and cfg.synthesis.scheduler == "unipc"
        assert cfg.synthesis.guidance_scale == 2.0 and cfg.synthesis.strength == 0.75
        assert cfg.synthesis.resolution == 512 and cfg.synthesis.lora_scale == 0.5
        assert cfg.finetune.learning_rate == 1e-4 and cfg.finetune.snr_gamma == 5.0
        assert cfg.finetune.checkpoint_every == 500
        assert cfg.classifier.model == "resnet50"


def test_preset_recipes_follow_table_8():
    def cls(name):
        return load_config(name, overrides=["source.uri=/d"]).classifier

    for name in ("imagenette", "in100", "pets"):
        assert cls(name).image_size == 224 and cls(name).opt == "sgd" and cls(name).lr == 0.1
    for name in ("cub", "cars", "eurosat"):
        assert cls(name).image_size == 448
    for name in ("cub", "cars", "pets"):
        assert cls(name).pretrained
    in1k = cls("in1k")
    assert (in1k.opt, in1k.lr, in1k.sched, in1k.warmup_epochs, in1k.epochs) == ("lamb", 5e-3, "cosine", 5, 300)
    assert in1k.label_smoothing == 0.1 and in1k.weight_decay == 0.02
    assert load_config("imagenette", overrides=["source.uri=/d"]).caption.enabled
    assert not load_config("cub", overrides=["source.uri=/d"]).caption.enabled


def test_defaults_are_the_papers():
    cfg = BuildConfig(dataset="x", source={"kind": "demo_digits"})
    assert cfg.finetune.mmd_weight == 0.003 and cfg.finetune.mmd_kernel == "linear"
    assert cfg.synthesis.negative_prompt == NEGATIVE_PROMPT
    assert cfg.synthesis.prompt_template == "photo of {class_name}, {caption}"
    assert cfg.guidance.slot == -1


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"finetune.learning_rat: unknown key"):
        load_config("demo", overrides=["finetune.learning_rat=0.1"])


def test_bad_value_names_field_value_and_range():
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides=["synthesis.strength=1.5", "finetune.rank=0"])
    msg = str(e.value)
    assert "synthesis.strength = 1.5" in msg and "less than or equal to 1" in msg
    assert "finetune.rank = 0" in msg and "greater than or equal to 1" in msg


def test_missing_source_uri_is_explained():
    with pytest.raises(ConfigError, match="source.uri is required"):
        load_config("imagenette")


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available: .*demo"):
        load_config("imagenet-9000")


def test_prompt_template_must_name_the_class():
    with pytest.raises(ConfigError, match="prompt_template must contain"):
        load_config("demo", overrides=["synthesis.prompt_template=a photo"])


def test_dataset_names_cannot_escape_the_root():
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(ConfigError, match="dataset"):
            load_config("demo", data={"dataset": bad})


def test_overrides_parse_values_and_keep_yaml11_words_as_strings():
    cfg = load_config("demo", overrides=["finetune.mixed_precision=no", "finetune.enabled=false",
                                          "synthesis.lora_scale=0.25", "classifier.decay_milestones=[1, 2]"])
    assert cfg.finetune.mixed_precision == "no" and cfg.finetune.enabled is False
    assert cfg.synthesis.lora_scale == 0.25 and cfg.classifier.decay_milestones == [1, 2]
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("demo", overrides=["finetune.rank"])
