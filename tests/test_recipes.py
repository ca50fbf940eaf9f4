"""The paper's recipes as shipped: preset values carry their sources, the classifier's global batch is Tab. 8's
on any hardware (micro-batches x processes x accumulation, and accumulation gives the full batch's update), and
the baselines are selectable by name with the prompts the paper and the authors' scripts use.

Why accumulation can match the full batch closely here: GroupNorm normalises each image on its own (batch norm
would see the micro-batch), no mixup or stochastic depth draws per batch, and each image's augmentation is seeded
by (seed, epoch, index), so four micro-batches of 8 hold exactly the 32 images of the full batch, with the same
pixels. What differs is float32 summation order (about 1e-7 here); a wrong weighting (each micro-batch's mean
summed: 4x the gradient) or a step per micro-batch moves the weights by more than 1e-3.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from support.train_digits import GROUPNORM_RECIPE, digits

from realfake.classify import batch_schedule, train_classifier
from realfake.config import ClassifierConfig, available_presets, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
TOLERANCE = 1e-5
GROUPNORM = dict(GROUPNORM_RECIPE, epochs=2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module with one intra-op thread (conftest's ``one_thread``)."""


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# -- classifier global batch ------------------------------------------------------------------------------------------
def test_accumulated_micro_batches_make_the_full_batch_step(caplog):
    data = digits(256)
    full = ClassifierConfig(**GROUPNORM)
    accumulated = full.model_copy(update={"gradient_accumulation": 4})
    with caplog.at_level(logging.INFO, logger="realfake.classify"):
        one = train_classifier(data, 10, full)
        four = train_classifier(data, 10, accumulated)
    assert "global batch 32 = 8 per process x 1 process x 4 accumulation; 8 optimiser steps per epoch" in caplog.text
    assert "global batch 32 = 32 per process x 1 process x 1 accumulation" in caplog.text
    diff = _max_diff(one, four)
    assert diff < TOLERANCE, f"accumulating 4 micro-batches drifted {diff:.2e} from the full batch"
    assert [e["loss"] for e in four.train_log] == pytest.approx([e["loss"] for e in one.train_log], abs=1e-5)
    control = train_classifier(data, 10, full.model_copy(update={"seed": 1}))
    assert _max_diff(one, control) > 100 * TOLERANCE


def test_a_set_smaller_than_one_global_batch_is_one_step_of_all_its_images():
    # 20 images, global batch 32 in micro-batches of 8: 8 + 8 + 4 images in one step, the mean over the 20.
    data = digits(20)
    whole = ClassifierConfig(**{**GROUPNORM, "batch_size": 32})
    assert batch_schedule(whole, 20).steps_per_epoch == 1 and batch_schedule(whole, 20).micro_batch == 20
    split = whole.model_copy(update={"gradient_accumulation": 4})
    assert batch_schedule(split, 20)[:3] == (1, 8, 3)
    diff = _max_diff(train_classifier(data, 10, whole), train_classifier(data, 10, split))
    assert diff < TOLERANCE, f"a short group is not the mean over its images ({diff:.2e})"


def test_batch_schedule_is_tab8_arithmetic_for_the_presets():
    in1k = load_config("in1k", overrides=["source.uri=/data/in1k"])
    assert in1k.classifier.batch_size == 4096  # Tab. 8: 512 x 8
    s = batch_schedule(in1k, 1_281_167, processes=8)
    assert (s.steps_per_epoch, s.micro_batch, s.accumulation) == (1_281_167 // 4096, 512, 1)
    assert s.images_per_epoch == 312 * 4096
    # The same global batch on 4 GPUs with 2 accumulation steps: the same steps, half the micro-batch memory x 2.
    four = load_config("in1k", overrides=["source.uri=/data/in1k", "classifier.gradient_accumulation=2"])
    assert batch_schedule(four, 1_281_167, processes=4)[:3] == (312, 512, 2)
    assert four.classifier.batch_arithmetic(4) == "global batch 4096 = 512 per process x 4 processes x 2 accumulation"
    for preset in ("imagenette", "in100", "cub", "cars", "pets", "eurosat"):
        cfg = load_config(preset, overrides=[f"source.uri=/data/{preset}"]).classifier
        assert (cfg.batch_size, cfg.opt, cfg.lr) == (1024, "sgd", 0.1), preset  # Tab. 8: 128 x 8, SGD, 0.1
        assert cfg.batch_arithmetic(8) == "global batch 1024 = 128 per process x 8 processes x 1 accumulation"
    # IN-10's 12,811 training images (Tab. 5) make 12 steps of 1024 per epoch, on 1 or 8 GPUs (811 left out).
    cfg = load_config("imagenette", overrides=["source.uri=/d"])
    assert batch_schedule(cfg, 12_811, 1)[:2] == (12, 1024) and batch_schedule(cfg, 12_811, 8)[:2] == (12, 128)
    assert batch_schedule(cfg, 12_811, 8).images_per_epoch == 12 * 1024
    # A stream keeps its short batches: the last step of an epoch is partial (1,602 per process = 12.5 x 128).
    assert batch_schedule(cfg, 12_811, 8, streamed=True).steps_per_epoch == 13


def test_a_batch_that_does_not_split_is_one_line_naming_the_fields():
    cfg = ClassifierConfig(batch_size=1024, gradient_accumulation=4)
    with pytest.raises(ValueError) as err:
        batch_schedule(cfg, 10_000, processes=3)
    message = str(err.value)
    assert "\n" not in message
    assert "classifier.batch_size (1024)" in message and "classifier.gradient_accumulation" in message
    assert "3 processes x 4 accumulation steps" in message and "multiple of 12" in message
    with pytest.raises(Exception, match=r"classifier.gradient_accumulation=3 equal micro-batches"):
        load_config("imagenette", overrides=["source.uri=/d", "classifier.gradient_accumulation=3"])


# -- prompts: the authors' suffix at generation, baselines by name ---------------------------------------------------
def test_generation_prompts_end_with_the_authors_suffix_and_fine_tuning_prompts_do_not(tmp_path, digits_folder):
    from conftest import mini_config

    from realfake.build import prepare, store_of
    from realfake.conditioning import generation_prompt
    from realfake.finetune import _training_data

    in1k = load_config("in1k", overrides=["source.uri=/d"])
    assert generation_prompt(in1k.synthesis, "tench", "a man holding a fish") == (
        "photo of tench, a man holding a fish, best quality")  # generate.py l.283
    assert in1k.synthesis.negative_prompt == "distorted, unrealistic, blurry, out of frame, cropped, deformed"
    demo = load_config("demo")  # its base learnt plain 'photo of digit N' prompts: no suffix, the paper's negative
    assert generation_prompt(demo.synthesis, "digit 3") == "photo of digit 3"
    assert demo.synthesis.negative_prompt == "distorted, unrealistic, blurry, out of frame"

    cfg = mini_config(str(tmp_path), "unused-no-model-is-loaded", digits_folder, guidance__enabled=False)
    prepare(cfg)
    samples, prompts, _ = _training_data(cfg, store_of(cfg), "all")
    # the authors' fine-tuning metadata: 'photo of {class}, {caption}' without the suffix
    assert prompts[0] == f"photo of {samples[0].class_name}" and not any("best quality" in p for p in prompts)


def test_baselines_by_name_keep_or_drop_the_caption():
    from realfake.build import BASELINE_PROMPTS, baseline_config
    from realfake.conditioning import generation_prompt

    cfg = load_config("imagenette", overrides=["source.uri=/d"])
    authors = baseline_config(cfg)  # the default: the authors' text-to-image baseline (paper G.5)
    assert authors.version == "v1-baseline" and authors.caption.enabled
    assert not (authors.synthesis.latent_prior or authors.finetune.enabled or authors.guidance.enabled)
    assert authors.finetune.mmd_weight == 0
    prompts = {kind: generation_prompt(baseline_config(cfg, kind).synthesis, "tench", "a man holding a fish")
               for kind in BASELINE_PROMPTS}
    assert prompts == {"caption": "photo of tench, a man holding a fish, best quality",
                       "class_name": "tench, best quality",
                       "a_photo_of": "a photo of tench, best quality"}
    for kind, version in (("class_name", "v1-baseline-class-name"), ("a_photo_of", "v1-baseline-a-photo-of")):
        other = baseline_config(cfg, kind)
        assert other.version == version and not other.caption.enabled  # no caption is computed for them
    # Without captions (the fine-grained presets) the authors' baseline is the class prompt alone.
    cub = baseline_config(load_config("cub", overrides=["source.uri=/d"]))
    assert generation_prompt(cub.synthesis, "Black footed Albatross") == "photo of Black footed Albatross, best quality"
    with pytest.raises(ValueError, match="baseline 'plain' is unknown: use one of caption, class_name, a_photo_of"):
        baseline_config(cfg, "plain")  # type: ignore[arg-type]


# -- every preset value names its source ----------------------------------------------------------------------------
_SOURCE = re.compile(r"Tab\. ?\d|paper|authors'|realfake, because|METHOD\.md|generate\.py|train_lora\.sh|"
                     r"train_text_to_image_lora\.py|train\.sh|train\.py")
# The sections these tests hold to it; source: and finetune: carry their sources too, checked with their stages.
SECTIONS = (None, "models", "caption", "guidance", "synthesis", "shards", "classifier")


def _unsourced(path: Path) -> list[str]:
    """Value lines of the checked sections whose comment (on the line, or the comment line just above a long one)
    names no source."""
    out, section, above = [], None, ""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(r"^[A-Za-z_]+:", line):
            section = line.split(":", 1)[0] if not re.match(r"^[A-Za-z_]+:\s*[^\s#]", line) else None
        body, _, comment = line.partition("#")
        if re.match(r"^\s*#", line):
            above = comment
            continue
        if section in SECTIONS and re.match(r"^\s*[A-Za-z_]+:\s*[^\s#]", body):
            if not _SOURCE.search(comment or above):
                out.append(f"{path.name}:{i}: {line.strip()}")
        above = ""
    return out


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_value_names_its_source(preset):
    path = CONFIGS / f"{preset}.yaml"
    assert load_config(preset, overrides=[] if preset == "demo" else ["source.uri=/data"])  # still a valid preset
    missing = _unsourced(path)
    assert not missing, "preset values without a source comment:\n" + "\n".join(missing)


def test_the_source_check_sees_a_value_without_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: x  # realfake, because a name\nsynthesis:\n  steps: 30  # Tab. 6\n  strength: 0.5\n"
                   "  # realfake, because a long reason\n  seed: 0\nsource:\n  kind: image_folder\n")
    assert _unsourced(bad) == ["bad.yaml:4: strength: 0.5"]


def _field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg


def test_the_recipes_page_shows_each_presets_values():
    """docs/recipes.md: per preset, every row's realfake column is the preset's value (a preset edit without the
    page, or the page without the preset, fails here)."""
    sections = re.split(r"^## ", RECIPES.read_text(), flags=re.MULTILINE)
    seen = set()
    for section in sections[1:]:
        name = section.split("\n", 1)[0].strip()
        if name not in available_presets():
            continue
        seen.add(name)
        cfg = load_config(name, overrides=[] if name == "demo" else ["source.uri=/data"])
        rows = re.findall(r"^\| `([a-z_.]+)` \|.*\| `([^`]*)` \|$", section, flags=re.MULTILINE)
        assert len(rows) >= 40, f"{name}: {len(rows)} rows"
        for field, shown in rows:
            try:
                value = json.loads(shown)
            except json.JSONDecodeError:
                value = shown
            assert value == _field(cfg, field), f"docs/recipes.md, {name}: {field} shows {shown!r}"
    assert seen == set(available_presets())
