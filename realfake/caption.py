"""Captions: a BLIP-2 caption for every real training image, written to ``features/captions.parquet``.

The paper adds a BLIP-2 caption to the prompt of the ImageNet-family datasets (``photo of {class},
{caption}``). Captioning a million images takes GPU hours, so the stage is resumable: each batch is written
as its own part file under ``features/captions.parts/`` as soon as it is decoded, a re-run captions only the
images no part covers yet, and the parts are merged into the final table (manifest order) and removed at the
end. Every part and the final table carry the caption settings (model, revision, prompt, decoding) in their
Parquet metadata and each row the sha256 of the image it describes; a row is reused only under the same
settings and while the manifest still gives its image that sha256, so a changed prompt re-captions everything
and an image edited in place is re-captioned alone (files without the column count as stale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import torch
from PIL import Image

from realfake.config import BuildConfig
from realfake.data.manifest import CAPTIONS, CAPTIONS_SCHEMA, RealSample, read_manifest
from realfake.data.storage import Store

__all__ = ["CAPTION_PARTS", "caption_settings", "captioner_name", "compute_captions"]

log = logging.getLogger(__name__)
CAPTION_PARTS = ("features", "captions.parts")
_META_KEY = b"realfake.caption"


def captioner_name(cfg: BuildConfig) -> str:
    """The value of the ``model`` column: the captioner id, with ``@revision`` when one is pinned."""
    m = cfg.models
    return f"{m.captioner}@{m.captioner_revision}" if m.captioner_revision else m.captioner


def caption_settings(cfg: BuildConfig) -> dict:
    """Everything that changes a caption: rows made under other settings are recomputed, never reused."""
    c = cfg.caption
    return {"model": cfg.models.captioner, "revision": cfg.models.captioner_revision, "prompt": c.prompt,
            "max_new_tokens": c.max_new_tokens, "num_beams": c.num_beams}


def _table(rows: list[tuple[str, str, str]], model: str, settings: dict) -> pa.Table:
    """(sample_id, caption, source image sha256) rows as a captions table stamped with ``settings``."""
    t = pa.table({"sample_id": [r[0] for r in rows], "caption": [r[1] for r in rows], "model": [model] * len(rows),
                  "sha256": [r[2] for r in rows]}, schema=CAPTIONS_SCHEMA)
    return t.replace_schema_metadata({_META_KEY: json.dumps(settings, sort_keys=True).encode()})


def _settings_of(table: pa.Table) -> dict | None:
    meta = table.schema.metadata or {}
    return json.loads(meta[_META_KEY]) if _META_KEY in meta else None


def _rows(t: pa.Table) -> dict[str, tuple[str | None, str]]:
    """sample_id -> (source sha256, caption); the sha256 is None in files written before the column existed."""
    ids = t.column("sample_id").to_pylist()
    shas = t.column("sha256").to_pylist() if "sha256" in t.column_names else [None] * len(ids)
    return {i: (h, c) for i, h, c in zip(ids, shas, t.column("caption").to_pylist(), strict=True)}


def _done_parts(store: Store, settings: dict) -> dict[str, tuple[str | None, str]]:
    """Rows (see :func:`_rows`) of the part files written under ``settings``; parts made under other settings are
    deleted."""
    done: dict[str, tuple[str | None, str]] = {}
    for name in store.listdir(*CAPTION_PARTS):
        if not name.endswith(".parquet"):
            continue  # e.g. a local temp file a killed writer left behind
        t = store.read_table(*CAPTION_PARTS, name)
        if _settings_of(t) != settings:
            log.info("discarding caption part %s: made under other caption settings", name)
            store.remove(*CAPTION_PARTS, name)
            continue
        done.update(_rows(t))
    return done


def _read_image(sample: RealSample, storage_options: dict | None) -> Image.Image:
    from realfake.data.images import decode_image

    try:
        with fsspec.open(sample.uri, "rb", **(storage_options or {})) as f:
            return decode_image(f.read())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read training image {sample.uri} (sample {sample.sample_id}) for captioning: "
                           f"{e}; restore the file or re-run the prepare stage") from e


def compute_captions(cfg: BuildConfig, store: Store, model=None, processor=None, progress: bool = False,
                     storage_options: dict | None = None) -> dict:
    """Caption every training image of the manifest that has no caption under the current settings.

    Args:
        cfg: the build configuration (``caption`` and ``models.captioner`` / ``captioner_revision`` are read).
        store: the dataset version store; its manifest must exist.
        model: an already-loaded ``Blip2ForConditionalGeneration`` (loaded from the config when omitted).
        processor: its ``Blip2Processor`` (required with ``model``).
        progress: show a progress bar.
        storage_options: fsspec options for reading the images.

    Returns:
        ``images`` (train split size), ``captioned`` (decoded in this call), ``reused`` (kept from earlier
        runs: same sample_id, same image sha256, same settings), ``skipped`` (nothing to do), ``seconds`` and
        ``images_per_s``.
    """
    from realfake.models.captioner import caption_images, load_captioner
    from realfake.models.loading import resolve_device

    if (model is None) != (processor is None):
        raise ValueError("compute_captions: pass both model and processor, or neither")
    t0 = time.time()
    samples = read_manifest(store, "train")
    ids = [s.sample_id for s in samples]
    sha = {s.sample_id: s.sha256 for s in samples}
    settings = caption_settings(cfg)
    name = captioner_name(cfg)

    def current(rows: dict[str, tuple[str | None, str]]) -> dict[str, str]:
        # only captions of the image the manifest holds now: an image edited in place keeps its id, not its sha256
        return {k: c for k, (h, c) in rows.items() if h is not None and sha.get(k) == h}

    final_rows: dict[str, tuple[str | None, str]] | None = None  # None: no final table under these settings
    if store.exists(*CAPTIONS):
        t = store.read_table(*CAPTIONS)
        final_rows = _rows(t) if _settings_of(t) == settings else None
    done = current(final_rows or {})
    if final_rows is not None and len(done) == len(final_rows) == len(ids) and not store.listdir(*CAPTION_PARTS):
        return {"images": len(ids), "captioned": 0, "reused": len(ids), "skipped": True, "seconds": 0.0,
                "images_per_s": 0.0}
    stale = sum(1 for k in final_rows or {} if k in sha and k not in done)
    if stale:
        log.info("re-captioning %d images whose contents changed (or were not recorded) since they were captioned",
                 stale)
    done.update(current(_done_parts(store, settings)))
    reused = len(done)
    todo = [s for s in samples if s.sample_id not in done]
    if todo and model is None:
        device = resolve_device(cfg.device)
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model, processor = load_captioner(cfg.models.captioner, cfg.models.captioner_revision, device, dtype)
    c = cfg.caption
    batches = [todo[i : i + c.batch_size] for i in range(0, len(todo), c.batch_size)]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="captions", unit="img")
    from realfake.progress import StageProgress

    shown, captioned = StageProgress("caption", len(todo), "image", cfg.dataset, cfg.version, samples_per_unit=1), 0
    # decode the next batch's images while the current one is captioned (I/O-bound on object storage)
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending = [pool.map(lambda s: _read_image(s, storage_options), b) for b in batches[:1]]
        for k, batch in enumerate(batches):
            images = list(pending.pop(0))
            if k + 1 < len(batches):
                pending.append(pool.map(lambda s: _read_image(s, storage_options), batches[k + 1]))
            texts = caption_images(model, processor, images, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                                   num_beams=c.num_beams)
            rows = [(s.sample_id, t, s.sha256) for s, t in zip(batch, texts, strict=True)]
            # a part is named by its content so a retried batch overwrites rather than duplicates
            digest = hashlib.sha256("\n".join(r[0] for r in rows).encode()).hexdigest()[:16]
            store.write_table(_table(rows, name, settings), *CAPTION_PARTS, f"part-{digest}.parquet")
            done.update((r[0], r[1]) for r in rows)
            if bar is not None:
                bar.update(len(batch))
            captioned += len(batch)
            shown.update(captioned)
    if bar is not None:
        bar.close()
    store.write_table(_table([(i, done[i], sha[i]) for i in ids], name, settings), *CAPTIONS)
    store.remove(*CAPTION_PARTS, recursive=True)  # after the merged table exists: a crash here loses nothing
    seconds = time.time() - t0
    return {"images": len(ids), "captioned": len(todo), "reused": reused, "skipped": False,
            "seconds": round(seconds, 2), "images_per_s": round(len(todo) / seconds, 3) if todo else 0.0}
