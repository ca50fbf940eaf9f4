"""Full-size check: Stable Diffusion v1.5's exact architecture through realfake's fine-tune and synthesis code.

The tiny models of the other tests share SD v1.5's classes but not its sizes, so a size-dependent mistake
(a 768-wide guidance slot against another text width, attention head counts, VAE scaling, the 77-token
context, memory layouts) could hide behind them. This test builds the real component configs with random
weights (UNet 859.5M parameters, the SD VAE, the CLIP ViT-L/14 text encoder), saves them in the diffusers
layout that ``stable-diffusion-v1-5/stable-diffusion-v1-5`` has on the hub (PNDM scheduler config
included), and runs one LoRA fine-tuning step and one img2img generation on CPU at 64 px. A small CLIP
vision tower whose projection is 768 wide stands in for ViT-L/14's image features.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from realfake.models.sd15 import CLIP_L14_TEXT, SD15_PARAMS, SD15_SCHEDULER, SD15_UNET, SD15_VAE

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def save_sd15_random(folder: Path) -> Path:
    """Random-weight SD v1.5 in the diffusers layout, plus a 768-d CLIP vision stand-in in ``clip/``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from realfake.models.tiny import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(folder.parent / "tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), unet=UNet2DConditionModel(**SD15_UNET), text_encoder=text,
        tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    del pipe
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, projection_dim=768,
    ))
    vision.save_pretrained(folder / "clip")
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "clip")
    return folder


def _base_weights(unet) -> dict[str, torch.Tensor]:
    """The attention query weights by their plain names, whether or not peft has wrapped the layers."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
            if k.endswith("to_q.weight") or k.endswith("to_q.base_layer.weight")}


def test_sd15_sized_finetune_step_and_generation(tmp_path, digits_folder):
    from realfake.config import load_config
    from realfake.data.ingest import ingest
    from realfake.data.storage import version_store
    from realfake.finetune import finetune
    from realfake.guidance import compute_guidance
    from realfake.models.loading import load_sd_components
    from realfake.synthesize import SynthesisEngine, plan_work

    torch.set_num_threads(2)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    base = save_sd15_random(tmp_path / "sd15")
    timings["build+save"] = time.perf_counter() - t

    cfg = load_config(data={
        "dataset": "full", "root": str(tmp_path / "out"), "device": "cpu",
        "source": {"kind": "image_folder", "uri": digits_folder, "max_per_class": 1, "test_fraction": 0.2},
        "models": {"base": str(base), "clip": str(base)},
        "finetune": {"max_steps": 1, "batch_size": 1, "resolution": 64, "mixed_precision": "no",
                     "random_flip": False, "rank": 4, "mmd_weight": 0.0},  # one image: no batch for an MMD
        "synthesis": {"steps": 4, "resolution": 64, "batch_size": 1},
    })
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    ingest(cfg.source, store, workers=2)
    compute_guidance(cfg, store)

    t = time.perf_counter()
    comps = load_sd_components(cfg.models.base)
    timings["load"] = time.perf_counter() - t
    counts = {k: sum(p.numel() for p in comps[k].parameters()) for k in SD15_PARAMS}
    assert counts == SD15_PARAMS
    assert type(comps["scheduler"]).__name__ == "UniPCMultistepScheduler"  # loaded from SD's PNDM config

    t = time.perf_counter()
    before = {k: v.clone() for k, v in comps["unet"].state_dict().items() if k.endswith("to_q.weight")}
    result = finetune(cfg, store, components=comps)
    timings["finetune_step"] = time.perf_counter() - t
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_loss))
    # the adapter is saved in the diffusers LoRA format and the shared UNet is left as it came
    assert store.exists("adapters", "all", "pytorch_lora_weights.safetensors")
    assert all(torch.equal(before[k], v) for k, v in _base_weights(comps["unet"]).items())

    t = time.perf_counter()
    engine = SynthesisEngine(cfg, store, components=comps)
    item = plan_work(cfg, store)[0]
    (record,) = list(engine.generate([item]))
    timings["generate"] = time.perf_counter() - t
    assert record.image.size == (64, 64)
    assert record.meta["adapter_hash"] and record.meta["source_sample_id"] == item.sample_id
    # the fused LoRA changed the UNet: generation really ran the fine-tuned weights
    assert any(not torch.equal(before[k], v) for k, v in _base_weights(comps["unet"]).items())
    summary = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    log.warning("full-size SD v1.5 on CPU: %s", summary)
    print(f"\nfull-size SD v1.5 on CPU ({torch.get_num_threads()} threads): {summary}")
