"""Visual guidance: a CLIP image embedding for every real training image.

``get_image_features`` of CLIP ViT-L/14 (768-d, the width of SD v1.5's cross-attention) for each image of
the train split, batched, written to ``features/guidance.parquet`` as float16 with the sha256 of the image it was
computed from, so a re-run embeds only images that are new or changed in place. The fine-tuning and synthesis
stages put each vector into the last text slot of its image's prompt.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from realfake.config import BuildConfig
from realfake.data.manifest import GUIDANCE, guidance_matrix, guidance_table, load_real_image, read_manifest
from realfake.data.storage import Store

__all__ = ["compute_guidance", "image_embeddings"]

log = logging.getLogger(__name__)


@torch.no_grad()
def image_embeddings(model, processor, images: list, device: torch.device | str) -> np.ndarray:
    """Projected CLIP image features (what ``CLIPModel.get_image_features`` returns), float32 ``[N, D]``."""
    pixels = processor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=model.dtype)
    return model(pixel_values=pixels).image_embeds.float().cpu().numpy()


def _reusable(store: Store, model: str) -> tuple[dict[str, tuple[str, np.ndarray]], int]:
    """sample_id -> (sha256, float16 vector) of the stored rows made by ``model`` with a known source sha256, and
    the stored row count.

    A file written before the ``sha256`` column existed yields nothing: its rows cannot be matched to the images'
    current contents, so they are recomputed."""
    if not store.exists(*GUIDANCE):
        return {}, 0
    t = store.read_table(*GUIDANCE)
    if "sha256" not in t.column_names:
        log.info("guidance table has no sha256 column (written by an older realfake): recomputing every row")
        return {}, t.num_rows
    emb = guidance_matrix(t, np.float16)
    return {i: (h, e) for i, e, m, h in zip(
        t.column("sample_id").to_pylist(), emb, t.column("model").to_pylist(), t.column("sha256").to_pylist(),
        strict=True) if m == model and h}, t.num_rows


def compute_guidance(cfg: BuildConfig, store: Store, model=None, processor=None, progress: bool = False,
                     storage_options: dict | None = None) -> dict:
    """Embed every training image that has no stored vector for its current content and this model.

    A stored row is reused only when its sample_id, source sha256 (the manifest's) and model all match, so an
    image edited in place is re-embedded while the others are kept. Returns ``images`` (train split size),
    ``embedded`` (computed in this call), ``reused``, ``skipped`` (nothing to compute or rewrite), ``seconds``.
    """
    from realfake.models.loading import load_clip_vision, resolve_device

    samples = read_manifest(store, "train")
    ids = [s.sample_id for s in samples]
    shas = [s.sha256 for s in samples]
    old, stored = _reusable(store, cfg.models.clip)
    keep = {s.sample_id: old[s.sample_id][1] for s in samples
            if s.sample_id in old and old[s.sample_id][0] == s.sha256}
    todo = [s for s in samples if s.sample_id not in keep]
    if not todo and stored == len(ids):  # the stored table is exactly this manifest's: nothing to rewrite
        return {"images": len(ids), "embedded": 0, "reused": len(ids), "skipped": True, "seconds": 0.0}
    t0 = time.time()
    new: dict[str, np.ndarray] = {}
    if todo:
        device = resolve_device(cfg.device)
        if model is None:
            model, processor = load_clip_vision(cfg.models.clip, cfg.models.clip_revision, device)
        size = processor.crop_size["height"] if isinstance(processor.crop_size, dict) else 224
        chunks = range(0, len(todo), cfg.guidance.batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="guidance", unit="batch")
        from realfake.progress import StageProgress

        shown = StageProgress("guidance", len(todo), "image", cfg.dataset, cfg.version, samples_per_unit=1)
        for i in chunks:
            batch = todo[i : i + cfg.guidance.batch_size]
            images = [load_real_image(s, max(size, s.width, s.height), storage_options) for s in batch]
            new.update(zip((s.sample_id for s in batch), image_embeddings(model, processor, images, device),
                           strict=True))
            shown.update(i + len(batch))
    rows = [new[i] if i in new else keep[i] for i in ids]
    dim = len(rows[0]) if rows else (model.config.projection_dim if model is not None else 0)
    emb = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    store.write_table(guidance_table(ids, emb, cfg.models.clip, shas), *GUIDANCE)
    return {"images": len(ids), "embedded": len(todo), "reused": len(keep), "skipped": False, "dim": int(dim),
            "seconds": round(time.time() - t0, 2)}
