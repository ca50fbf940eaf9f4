"""Visual guidance: a CLIP image embedding for every real training image.

``get_image_features`` of CLIP ViT-L/14 (768-d, the width of SD v1.5's cross-attention) for each image of
the train split, batched, written to ``features/guidance.parquet`` as float16. The fine-tuning and synthesis
stages put each vector into the last text slot of its image's prompt.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from realfake.config import BuildConfig
from realfake.data.manifest import GUIDANCE, guidance_table, read_manifest
from realfake.data.storage import Store

__all__ = ["compute_guidance", "image_embeddings"]

log = logging.getLogger(__name__)


@torch.no_grad()
def image_embeddings(model, processor, images: list, device: torch.device | str) -> np.ndarray:
    """Projected CLIP image features (what ``CLIPModel.get_image_features`` returns), float32 ``[N, D]``."""
    pixels = processor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=model.dtype)
    return model(pixel_values=pixels).image_embeds.float().cpu().numpy()


def compute_guidance(cfg: BuildConfig, store: Store, model=None, processor=None, progress: bool = False,
                     storage_options: dict | None = None) -> dict:
    """Embed every training image (skipped when already done for this manifest and model)."""
    from realfake.finetune import load_real_image
    from realfake.models.loading import load_clip_vision, resolve_device

    samples = read_manifest(store, "train")
    ids = [s.sample_id for s in samples]
    if store.exists(*GUIDANCE):
        done = store.read_table(*GUIDANCE)
        if done.column("sample_id").to_pylist() == ids and set(done.column("model").to_pylist()) == {cfg.models.clip}:
            return {"images": len(ids), "skipped": True, "seconds": 0.0}
    t0 = time.time()
    device = resolve_device(cfg.device)
    if model is None:
        model, processor = load_clip_vision(cfg.models.clip, cfg.models.clip_revision, device)
    size = processor.crop_size["height"] if isinstance(processor.crop_size, dict) else 224
    chunks = range(0, len(samples), cfg.guidance.batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="guidance", unit="batch")
    out = []
    for i in chunks:
        batch = samples[i : i + cfg.guidance.batch_size]
        images = [load_real_image(s, max(size, s.width, s.height), storage_options) for s in batch]
        out.append(image_embeddings(model, processor, images, device))
    emb = np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)
    store.write_table(guidance_table(ids, emb, cfg.models.clip), *GUIDANCE)
    return {"images": len(ids), "skipped": False, "dim": int(emb.shape[1]), "seconds": round(time.time() - t0, 2)}
