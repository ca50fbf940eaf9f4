"""The fine-tuning recipe as the authors' (finetune/train_lora.sh, train_text_to_image_lora.py): its schedule
arithmetic, the MMD batch rule, gradient clipping, sampled latents, resize + random crop, and how synthesis sizes
its source images.

The schedule is a pure function checked against figures worked out by hand. The training behaviours run the real
loop on a tiny base over planted images whose three colour bands (red | green | blue, 96 x 32) show which window a
crop took: a centre crop is all green, a random crop is some 32-pixel slice of the whole image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import mini_config
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors

from realfake import build
from realfake.build import store_of
from realfake.config import MMD_MIN_BATCH, ConfigError, FinetuneConfig, SynthesisConfig, load_config
from realfake.data.manifest import RealSample, load_real_image, read_manifest
from realfake.finetune import (
    WEIGHTS_NAME,
    _canvas_size,
    _epoch_order,
    _latent_window,
    _pixels,
    adapter_dir,
    finetune,
    training_schedule,
)
from realfake.models.loading import load_sd_components

BANDS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]  # red | green | blue, 32 px each


def _bands(width: int = 96, height: int = 32, marker: int = 0) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate(BANDS):
        a[:, i * width // 3 : (i + 1) * width // 3] = colour
    a[0, 0, 0] = marker  # makes every file distinct (no duplicate removal), in the red band only
    return Image.fromarray(a)


# ---------------------------------------------------------------------------------------------------------------
# The schedule: pure arithmetic
# ---------------------------------------------------------------------------------------------------------------
def test_defaults_are_the_authors():
    ft = FinetuneConfig()
    assert (ft.epochs, ft.max_steps, ft.batch_size, ft.gradient_accumulation) == (100, None, 64, 1)
    assert (ft.max_grad_norm, ft.latents, ft.crop, ft.mmd_weight) == (1.0, "sample", "random", 0.003)
    assert SynthesisConfig().source_resize == "stretch"
    assert MMD_MIN_BATCH == 8


def test_schedule_of_imagenette_on_8_gpus_by_hand():
    # 9,469 images at 64 a step: ceil(9469 / 64) = 148 steps an epoch (147 full batches hold 9,408 images);
    # 100 epochs = 14,800 steps drawing 947,200 images; 64 = 8 per GPU x 8 GPUs
    plan = training_schedule(FinetuneConfig(), 9469, processes=8)
    assert (plan.micro_batch, plan.steps_per_epoch, plan.steps, plan.samples) == (8, 148, 14800, 947200)
    assert plan.describe().startswith("global batch 64 = 8 per process x 8 processes x 1 accumulation; 14800 steps")
    one_gpu = training_schedule(FinetuneConfig(gradient_accumulation=8), 9469, processes=1)
    assert (one_gpu.micro_batch, one_gpu.steps) == (8, 14800)  # the same steps, accumulated on one GPU


def test_max_steps_caps_the_epochs_or_sets_the_length_alone():
    assert training_schedule(FinetuneConfig(max_steps=1000), 9469, 8).steps == 1000
    assert training_schedule(FinetuneConfig(max_steps=20000), 9469, 8).steps == 14800  # the epochs end first
    alone = training_schedule(FinetuneConfig(epochs=None, max_steps=50), 10, 1)
    assert (alone.steps, alone.samples, alone.steps_per_epoch) == (50, 3200, 1)


def test_a_batch_that_does_not_split_over_the_processes_names_the_fix():
    with pytest.raises(ValueError) as err:
        training_schedule(FinetuneConfig(), 9469, processes=3)
    assert str(err.value) == (
        "finetune.batch_size=64 does not split over 3 process(es) x finetune.gradient_accumulation=1: set "
        "finetune.batch_size to a multiple of 3 (e.g. 63 or 66) or change finetune.gradient_accumulation or the "
        "number of processes")


def test_fewer_than_8_images_per_mmd_term_fails_once_the_processes_are_known():
    with pytest.raises(ValueError, match=r"^finetune.batch_size=64 over 16 process\(es\) x finetune.gradient_"
                                         r"accumulation=1 leaves 4 images per process for the MMD term, which needs "
                                         r"at least 8 \(the authors' per-GPU batch\): set finetune.batch_size=128"):
        training_schedule(FinetuneConfig(), 9469, processes=16)
    # without the MMD term any split is allowed
    assert training_schedule(FinetuneConfig(mmd_weight=0.0), 9469, processes=16).micro_batch == 4


def test_config_validation_refuses_what_no_process_count_can_fix():
    with pytest.raises(ValidationError, match=r"finetune.batch_size=64 / finetune.gradient_accumulation=16 leaves 4 "
                                              r"images per micro-batch for the MMD term, which needs at least 8"):
        FinetuneConfig(gradient_accumulation=16)
    FinetuneConfig(gradient_accumulation=16, mmd_weight=0.0)  # fine without the MMD term
    with pytest.raises(ValidationError, match="does not split into finetune.gradient_accumulation=3"):
        FinetuneConfig(gradient_accumulation=3)
    with pytest.raises(ValidationError, match="finetune.epochs and finetune.max_steps are both None"):
        FinetuneConfig(epochs=None)
    with pytest.raises(ConfigError, match="finetune.batch_size=16 / finetune.gradient_accumulation=4 leaves 4"):
        load_config("demo", overrides=["finetune.batch_size=16", "finetune.gradient_accumulation=4"])


def test_every_epoch_draws_every_image_and_a_resume_recomputes_it():
    first, again = _epoch_order(0, 3, 30, 32), _epoch_order(0, 3, 30, 32)
    assert torch.equal(first, again)  # from the seed and the epoch alone
    assert sorted(first[:30].tolist()) == list(range(30)) and first[30:].tolist() == first[:2].tolist()
    assert not torch.equal(first, _epoch_order(0, 4, 30, 32)) and not torch.equal(first, _epoch_order(1, 3, 30, 32))
    tiny = _epoch_order(0, 0, 3, 8)  # fewer images than a batch: the permutation wraps around
    assert tiny.tolist() == (tiny[:3].tolist() * 3)[:8] and sorted(tiny[:3].tolist()) == [0, 1, 2]


def test_canvas_keeps_the_aspect_on_the_latent_grid():
    assert _canvas_size(96, 32, 32, 8) == (96, 32)
    assert _canvas_size(500, 375, 512, 8) == (512 + 8 * 21, 512)  # 682.7 px: 170.7 over = 21.3 cells -> 21
    assert _canvas_size(32, 100, 32, 8) == (32, 96)  # 100 px -> 68 over = 8.5 cells, rounded to even (8)
    assert _canvas_size(40, 40, 32, 8) == (32, 32)


def test_source_images_are_stretched_as_the_authors_or_centre_cropped(tmp_path):
    path = tmp_path / "bands.png"
    _bands().save(path)
    sample = RealSample("s", "train", 0, "bands", str(path), "", 96, 32)
    stretched = np.asarray(load_real_image(sample, 30, fit="stretch"))
    cropped = np.asarray(load_real_image(sample, 30, fit="center_crop"))
    assert stretched.shape == cropped.shape == (30, 30, 3)
    # stretched: all three bands, squeezed side by side; centre-cropped: the green band alone
    assert [int(np.argmax(stretched[15, x])) for x in (3, 15, 27)] == [0, 1, 2]
    assert {int(np.argmax(px)) for px in cropped.reshape(-1, 3)} == {1}


# ---------------------------------------------------------------------------------------------------------------
# The training loop on planted band images
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def banded(tmp_path_factory, tiny_base):
    """A prepared version of 2 classes x 10 band images (8 train each), 96 x 32 px, fine-tuned at 32 px."""
    src = tmp_path_factory.mktemp("bands")
    for c in ("left", "right"):
        (src / c).mkdir()
        for i in range(10):
            _bands(marker=i + (0 if c == "left" else 100)).save(src / c / f"{i}.png")
    cfg = mini_config(str(tmp_path_factory.mktemp("banded")), tiny_base, str(src), finetune__max_steps=2,
                      finetune__cache_latents=False, source__max_per_class=None, source__test_fraction=0.2)
    build.prepare(cfg)
    return cfg


def _run(cfg, version: str, **finetune_over):
    """Train an adapter in a fresh version sharing the prepared data; (weights, train log, encoder inputs)."""
    from realfake.data.manifest import GUIDANCE, MANIFEST

    new = cfg.model_copy(update={"version": version, "finetune": cfg.finetune.model_copy(update=finetune_over)})
    src, dst = store_of(cfg), store_of(new)
    for rel in (MANIFEST, GUIDANCE):
        dst.write_bytes(src.read_bytes(*rel), *rel)
    comps = load_sd_components(new.models.base)
    seen: list[torch.Tensor] = []
    comps["vae"].encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    finetune(new, dst, "all", components=comps)
    weights = load_safetensors(dst.read_bytes(*adapter_dir("all"), WEIGHTS_NAME))
    return weights, dst.read_json(*adapter_dir("all"), "train_log.json"), seen


def _windows(seen: list[torch.Tensor]) -> list[torch.Tensor]:
    return [img for batch in seen for img in batch]


def test_a_random_crop_takes_a_window_of_the_whole_image_a_centre_crop_the_middle(banded):
    store = store_of(banded)
    canvas = _pixels(_bands())  # the band image is already its own 96 x 32 canvas at 32 px
    cell = 2 ** (len(load_sd_components(banded.models.base)["vae"].config.block_out_channels) - 1)
    allowed = {x: canvas[:, :, x : x + 32] for x in range(0, 65, cell)}

    _, log, seen = _run(banded, "center", crop="center")
    windows = _windows(seen)
    assert len(windows) == 2 * 8 and log["schedule"]["micro_batch"] == 8  # 2 steps of 8, encoded every step
    for w in windows:
        torch.testing.assert_close(w, allowed[32])  # the green band only

    _, _, seen = _run(banded, "random", crop="random")
    offsets = []
    for w in _windows(seen):
        found = [x for x, a in allowed.items() if torch.allclose(w[:, 1:], a[:, 1:])]  # row 0 holds the marker
        assert found, "every crop is a 32 px window of the image on the latent grid"
        offsets.append(found[0])
    assert len(set(offsets)) >= 3, offsets  # the windows move across the image
    assert len(read_manifest(store, "train")) == 16


def test_cached_random_crops_are_windows_of_the_encoded_image(banded, monkeypatch):
    """With the cache, the whole image is encoded once; each step's clean latent (recorded where the scheduler noises
    it) is a drawn window of that encoded canvas, and the windows move across it."""
    from diffusers import DDPMScheduler

    clean: list[torch.Tensor] = []
    add_noise = DDPMScheduler.add_noise

    def recording(self, original_samples, noise, timesteps):
        clean.extend(original_samples.detach().clone())
        return add_noise(self, original_samples, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    _, _, seen = _run(banded, "cached-random", crop="random", latents="mean", cache_latents=True)
    assert {tuple(b.shape[2:]) for b in seen} == {(32, 96)}  # the whole image is encoded once, then cropped
    vae = load_sd_components(banded.models.base)["vae"]
    images = [Image.open(s.uri).convert("RGB") for s in read_manifest(store_of(banded), "train")]
    with torch.no_grad():  # every training image's encoded canvas, as the cache holds it
        canvases = vae.encode(torch.stack([_pixels(i) for i in images])).latent_dist.mean * vae.config.scaling_factor
    side = clean[0].shape[-1]
    assert len(clean) == 2 * 8 and canvases.shape[-1] == 3 * side
    offsets = []
    for z in clean:
        found = [x for canvas in canvases for x in range(canvas.shape[-1] - side + 1)
                 if torch.allclose(z, canvas[:, :, x : x + side], atol=1e-5)]
        assert found, "every cached crop is a window of an encoded training image"
        offsets.append(found[0])
    assert len(set(offsets)) >= 3, offsets


def test_sampled_latents_are_drawn_each_step_and_the_cache_keeps_the_draws(banded):
    sampled, _, _ = _run(banded, "sample-uncached", latents="sample", crop="center")
    cached, _, _ = _run(banded, "sample-cached", latents="sample", crop="center", cache_latents=True)
    mean, _, _ = _run(banded, "mean-uncached", latents="mean", crop="center")
    for k in sampled:  # the cache holds mean and std and draws from the run's generator: the same steps
        torch.testing.assert_close(cached[k], sampled[k], rtol=1e-3, atol=1e-6)  # batch-size float rounding
    assert any(not torch.allclose(sampled[k], mean[k], rtol=1e-3, atol=1e-6) for k in sampled), \
        "a posterior sample is not its mean"


def test_gradients_are_clipped_to_max_grad_norm(banded):
    free, free_log, _ = _run(banded, "unclipped", max_grad_norm=None, crop="center")
    clipped, clipped_log, _ = _run(banded, "clipped", max_grad_norm=1e-12, crop="center")
    # the logged norm is taken before clipping: the first step's is the same in both runs
    first = free_log["history"][0]["grad_norm"]
    assert first > 1e-6 and clipped_log["history"][0]["grad_norm"] == pytest.approx(first, rel=1e-5)
    # clipped to 1e-12 the gradients fall far below AdamW's eps: the adapter barely moves
    moved = max(float(v.abs().max()) for k, v in free.items() if "lora_B" in k)
    barely = max(float(v.abs().max()) for k, v in clipped.items() if "lora_B" in k)
    assert moved > 0 and barely < moved * 1e-3


def test_synthesis_uses_source_resize(banded):
    from realfake.synthesize import SynthesisEngine, plan_work

    store = store_of(banded)
    for fit in ("stretch", "center_crop"):
        cfg = banded.model_copy(update={
            "finetune": banded.finetune.model_copy(update={"enabled": False}),
            "synthesis": banded.synthesis.model_copy(update={"source_resize": fit})})
        items = plan_work(cfg, store)[:2]
        sources = SynthesisEngine(cfg, store)._load_sources(items)
        for w, img in zip(items, sources, strict=True):
            sample = next(s for s in read_manifest(store, "train") if s.sample_id == w.sample_id)
            want = load_real_image(sample, cfg.synthesis.resolution, fit=fit)
            assert np.array_equal(np.asarray(img), np.asarray(want))
        greens = {int(np.argmax(px)) for px in np.asarray(sources[0]).reshape(-1, 3)[1:]}
        assert greens == ({1} if fit == "center_crop" else {0, 1, 2})


def test_train_log_records_the_schedule(banded):
    _, log, _ = _run(banded, "logged", crop="center")
    assert log["schedule"] == {"images": 16, "processes": 1, "batch_size": 8, "gradient_accumulation": 1,
                               "micro_batch": 8, "steps_per_epoch": 2, "steps": 2, "samples": 16}
    assert [h["mmd_batch_per_rank"] for h in log["history"]] == [[8], [8]]


def test_a_cached_crop_is_the_drawn_window_and_its_mirror_the_flipped_window():
    """The latent window of a cached canvas: the offset the uniforms draw over the whole free width, and on the
    encoded mirror image the mirror of the same window (crop, then flip, as the authors' transform)."""
    canvas = torch.arange(4 * 12, dtype=torch.float32).reshape(1, 4, 12)  # 4 rows x 12 columns of latent cells
    mirror = torch.flip(canvas, dims=[2])
    for u, x in [((0.0, 0.0), 0), ((0.5, 0.0), 4), ((0.999, 0.0), 8)]:  # 9 offsets: 0.5 -> 4, the last -> 8
        window = _latent_window(canvas, torch.tensor(u), 4, mirrored=False)
        assert torch.equal(window, canvas[:, :, x : x + 4])
        assert torch.equal(_latent_window(mirror, torch.tensor(u), 4, mirrored=True), torch.flip(window, dims=[2]))
    tall = canvas.transpose(1, 2)  # 12 rows x 4 columns: the window moves down instead
    assert torch.equal(_latent_window(tall, torch.tensor((0.3, 0.5)), 4, mirrored=False), tall[:, 4:8, :])
