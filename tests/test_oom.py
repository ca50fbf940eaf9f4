"""GPU out-of-memory during synthesis: the batch is retried in halves instead of failing the run. During
fine-tuning: a clear error naming the fix, with the last checkpoint kept for the re-run.

The error is raised by a real forward pre-hook on the UNet whenever the UNet is called with more latents than
a set limit, exactly where a real CUDA allocation would fail; the engine's real retry path handles it on CPU.
Images are the same whatever the batch size, because every image has its own seeded generator.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import mini_config

from realfake.build import store_of
from realfake.data.ingest import ingest
from realfake.models.loading import load_sd_components
from realfake.synthesize import SynthesisEngine, plan_work, synthesize


def _oom_above(unet: torch.nn.Module, max_latents: int):
    """Make ``unet`` raise CUDA's out-of-memory error for calls with more than ``max_latents`` latents."""
    calls: list[int] = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        calls.append(sample.shape[0])
        if sample.shape[0] > max_latents:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {sample.shape[0]} latents)"
            )

    return unet.register_forward_pre_hook(hook, with_kwargs=True), calls


@pytest.fixture(scope="module")
def engine_and_store(tmp_path_factory, tiny_base, digits_folder):
    root = tmp_path_factory.mktemp("oom")
    cfg = mini_config(str(root), tiny_base, digits_folder, finetune__enabled=False, guidance__enabled=False,
                      source__max_per_class=8, source__test_fraction=0.0, synthesis__batch_size=6,
                      synthesis__steps=4)
    store = store_of(cfg)
    ingest(cfg.source, store)
    return cfg, store, SynthesisEngine(cfg, store)


def test_oom_batch_is_split_in_halves_and_images_are_unchanged(engine_and_store, caplog):
    cfg, store, engine = engine_and_store
    items = plan_work(cfg, store)[:6]
    assert len({w.label for w in items}) == 1  # one class: a single batch of 6
    engine.max_batch = 6
    reference = list(engine.generate(items))

    # classifier-free guidance doubles the UNet batch: 4 latents = at most 2 images fit
    handle, calls = _oom_above(engine.pipe.unet, max_latents=4)
    try:
        with caplog.at_level(logging.WARNING, logger="realfake.synthesize"):
            records = list(engine.generate(items))
    finally:
        handle.remove()
    assert [r.key for r in records] == [w.key for w in items]
    for got, want in zip(records, reference, strict=True):
        assert got.meta["seed"] == want.meta["seed"]
        diff = np.abs(np.asarray(got.image, np.int16) - np.asarray(want.image, np.int16))
        assert diff.max() <= 2, "an image must not depend on the batch it was generated in"
    # 6 -> 3 + 3 -> (2 + 1) + (2 + 1): three out-of-memory errors, later batches capped at 2
    assert engine.oom_retries == 3 and engine.max_batch == 2
    assert max(calls) == 12 and sorted(set(calls)) == [2, 4, 6, 12]
    assert caplog.text.count("GPU out of memory on a batch of") == 3
    assert "retrying as 3 + 3" in caplog.text and "retrying as 2 + 1" in caplog.text

    # the next batches start at the size that worked: no new out-of-memory error
    handle, calls = _oom_above(engine.pipe.unet, max_latents=4)
    try:
        again = list(engine.generate(items))
    finally:
        handle.remove()
    assert len(again) == 6 and engine.oom_retries == 3 and max(calls) == 4


def test_oom_on_a_single_image_fails_clearly(engine_and_store):
    cfg, store, engine = engine_and_store
    items = plan_work(cfg, store)[:2]
    engine.max_batch, engine.oom_retries = 6, 0
    handle, _ = _oom_above(engine.pipe.unet, max_latents=0)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match=r"single image .* synthesis.resolution=32"):
            list(engine.generate(items))
    finally:
        handle.remove()


@pytest.mark.slow
def test_synthesize_run_survives_oom_and_commits_every_shard(engine_and_store, caplog):
    cfg, store, engine = engine_and_store
    engine.max_batch, engine.oom_retries = 6, 0
    handle, _ = _oom_above(engine.pipe.unet, max_latents=6)
    try:
        with caplog.at_level(logging.WARNING, logger="realfake.synthesize"):
            out = synthesize(cfg, store, shard_names=["shard-000000"], engine=engine)
    finally:
        handle.remove()
    assert out["images"] == cfg.shards.max_count and out["shards_written"] == ["shard-000000"]
    assert out["oom_retries"] >= 1 and "GPU out of memory on a batch of 6" in caplog.text
    from realfake.data.shards import committed_shards

    assert [(c.name, c.count) for c in committed_shards(store, "synthetic")] == [("shard-000000", 16)]


def test_oom_while_fine_tuning_names_the_fix_and_keeps_the_last_checkpoint(tmp_path, tiny_base, digits_folder):
    from realfake import build
    from realfake.finetune import adapter_dir

    cfg = mini_config(str(tmp_path), tiny_base, digits_folder, finetune__max_steps=4, finetune__checkpoint_every=2)
    build.prepare(cfg)
    comps = load_sd_components(cfg.models.base, None, torch.device("cpu"))
    calls: list[int] = []

    def third_step_fails(module, args, kwargs):  # one UNet call per step here (no gradient accumulation)
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    handle = comps["unet"].register_forward_pre_hook(third_step_fails, with_kwargs=True)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match=r"adapter 'all' at step 3 with finetune.batch_size=8 "
                           r".*raise finetune.gradient_accumulation.*checkpoint of step 2 is kept"):
            build.finetune(cfg, "all", components=comps)
    finally:
        handle.remove()
    store = store_of(cfg)
    assert store.read_json(*adapter_dir("all"), "checkpoint", "state.json")["step"] == 2
    assert not getattr(comps["unet"], "peft_config", None)  # the failed run took its adapter layers off again
    result = build.finetune(cfg, "all", components=comps)
    assert result["steps"] == 4 and result["resumed_from"] == 2
