"""Model construction and production loading: tiny models of the real architectures, saved and loaded back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realfake.models.loading import ModelLoadError, load_clip_vision, load_sd_components, model_fingerprint
from realfake.models.tiny import build_clip_tokenizer


def test_offline_clip_tokenizer_behaves_like_clips(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("Photo of digit 3, distorted", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.tokenize("photo of digit 3") == ["photo</w>", "of</w>", "digit</w>", "3</w>"]
    # words outside the merges still tokenize (byte-level), and lower-casing matches CLIP's
    assert "".join(t.replace("</w>", " ") for t in tok.tokenize("Zebra crossing")).strip() == "zebra crossing"


def test_tiny_pipeline_loads_through_the_production_loader(tiny_base):
    comps = load_sd_components(tiny_base)
    assert comps["unet"].config.cross_attention_dim == comps["text_encoder"].config.hidden_size
    assert comps["tokenizer"].model_max_length == 77
    assert not any(p.requires_grad for p in comps["unet"].parameters())
    vision, processor = load_clip_vision(tiny_base)  # the pipeline folder's clip/ sub-folder
    assert vision.config.projection_dim == comps["text_encoder"].config.hidden_size
    assert processor.crop_size["height"] == 32


def test_unloadable_model_fails_fast_naming_it(tmp_path):
    with pytest.raises(ModelLoadError, match=r"cannot load Stable Diffusion pipeline from '.*not-here'"):
        load_sd_components(str(tmp_path / "not-here"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete diffusers/transformers save"):
        load_sd_components(str(tmp_path / "half"))
    with pytest.raises(ModelLoadError, match="CLIP vision model"):
        load_clip_vision(str(tmp_path / "nothing"))


def test_fingerprint_changes_with_weights(tiny_base, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(tiny_base)
    f = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != model_fingerprint(tiny_base)
    assert model_fingerprint("org/model", "main") != model_fingerprint("org/model", "v2")


def test_font_digits_are_deterministic_and_class_dependent():
    from realfake.models.demo_base import render_font_digits

    a, la = render_font_digits(200, 32, seed=3)
    b, lb = render_font_digits(200, 32, seed=3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    ink = {d: a[la == d].mean() for d in range(10)}
    assert ink[1] < ink[8]  # a "1" has less ink than an "8": the glyph follows the label


def test_demo_base_pretraining_saves_a_loadable_pipeline(tmp_path):
    from realfake.models.demo_base import DemoBaseRecipe, pretrain_demo_base

    class Quick(DemoBaseRecipe):
        n_images, vae_steps, unet_steps, vae_batch, unet_batch = 64, 3, 3, 8, 8

    folder = pretrain_demo_base(tmp_path / "base", Quick, progress=False)
    comps = load_sd_components(str(folder))
    assert comps["vae"].config.scaling_factor != pytest.approx(0.18215)  # measured from its own latents
    assert comps["scheduler"].config.steps_offset == 1
    load_clip_vision(str(folder))
    assert not list(tmp_path.glob("base.tmp-*"))
    with torch.no_grad():
        x = torch.zeros(1, 3, 32, 32)
        assert comps["vae"].encode(x).latent_dist.mean.shape == (1, 4, 8, 8)


def test_shipped_demo_base_matches_its_recipe_and_loads(monkeypatch, tmp_path):
    from realfake.models.demo_base import SHIPPED, DemoBaseRecipe, ensure_demo_base, shipped_demo_base

    assert shipped_demo_base() == SHIPPED  # the shipped weights were trained with the current recipe
    monkeypatch.setenv("REALFAKE_CACHE", str(tmp_path))
    assert ensure_demo_base() == SHIPPED
    comps = load_sd_components("realfake-demo-base")  # the special id resolves through the production loader
    assert comps["unet"].config.cross_attention_dim == 64
    # a recipe change makes the shipped copy stale: it is not used for a different recipe
    monkeypatch.setattr(DemoBaseRecipe, "unet_steps", DemoBaseRecipe.unet_steps + 1)
    assert shipped_demo_base() is None
