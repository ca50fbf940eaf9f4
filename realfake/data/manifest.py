"""The tables of the data contract (DESIGN.md), their schemas and their readers.

Every stage exchanges data through these Parquet tables inside a dataset version; the schemas live here
once so writers and readers cannot drift apart. The readers of the real images a manifest names
(:func:`read_image`, :func:`load_real_image`) are here too: fine-tuning, guidance, synthesis and the report read
them alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from realfake.data.storage import Store

__all__ = [
    "CAPTIONS",
    "CAPTIONS_SCHEMA",
    "GUIDANCE",
    "GUIDANCE_SCHEMA",
    "MANIFEST",
    "MANIFEST_SCHEMA",
    "REJECTS",
    "REJECTS_SCHEMA",
    "RealSample",
    "guidance_matrix",
    "guidance_table",
    "load_real_image",
    "manifest_hash",
    "read_captions",
    "read_guidance",
    "read_image",
    "read_manifest",
]

MANIFEST = ("real", "manifest.parquet")
REJECTS = ("real", "rejects.parquet")
CAPTIONS = ("features", "captions.parquet")
GUIDANCE = ("features", "guidance.parquet")

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        # the class folder (for ImageNet the wnid) next to the readable class_name; absent from manifests
        # written before it was added, where readers see ""
        ("folder", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [("uri", pa.string()), ("class_name", pa.string()), ("split", pa.string()), ("reason", pa.string())]
)
# sha256: the manifest's sha256 of the image the row was computed from. A row is reused only while the
# manifest still holds that sample_id with that sha256, so an image edited in place is recomputed; files written
# before the column existed (or rows where it is null) count as stale.
CAPTIONS_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("caption", pa.string()), ("model", pa.string()), ("sha256", pa.string())]
)
GUIDANCE_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("embedding", pa.list_(pa.float16())), ("model", pa.string()),
     ("sha256", pa.string())]
)


@dataclass(frozen=True)
class RealSample:
    """One row of the manifest (``folder`` is "" in manifests written before the column existed)."""

    sample_id: str
    split: str
    label: int
    class_name: str
    uri: str
    sha256: str
    width: int
    height: int
    folder: str = ""


def read_manifest(store: Store, split: str | None = None) -> list[RealSample]:
    """Rows of ``real/manifest.parquet`` (optionally one split), sorted by sample_id for determinism."""
    if not store.exists(*MANIFEST):
        raise FileNotFoundError(f"{store.uri(*MANIFEST)} does not exist: run the prepare stage first")
    rows = store.read_table(*MANIFEST).to_pylist()
    out = [RealSample(**{**r, "folder": r.get("folder") or ""}) for r in rows if split is None or r["split"] == split]
    return sorted(out, key=lambda s: s.sample_id)


def manifest_hash(store: Store) -> str:
    """Content hash of the manifest rows (class names included: they are in every prompt): the cache key of every
    stage derived from the real data."""
    h = hashlib.sha256()
    for s in read_manifest(store):
        h.update(f"{s.sample_id}\t{s.split}\t{s.label}\t{s.class_name}\t{s.sha256}\n".encode())
    return h.hexdigest()


def guidance_table(sample_ids: list[str], embeddings: np.ndarray, model: str,
                   sha256s: list[str | None] | None = None) -> pa.Table:
    """The guidance table; ``sha256s`` are the source images' (null when unknown: such rows are never reused)."""
    emb = pa.array([row.astype(np.float16) for row in embeddings], type=pa.list_(pa.float16()))
    shas = list(sha256s) if sha256s is not None else [None] * len(sample_ids)
    return pa.table(
        {"sample_id": sample_ids, "embedding": emb, "model": [model] * len(sample_ids), "sha256": shas},
        schema=GUIDANCE_SCHEMA,
    )


def guidance_matrix(t: pa.Table, dtype: type = np.float32) -> np.ndarray:
    """The ``embedding`` column of a guidance table as one ``(rows, dim)`` array, from a numpy view of the flat
    values: a list of Python floats per row would not fit for ImageNet-1k."""
    flat = t.column("embedding").combine_chunks()
    values = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
    return values.reshape(t.num_rows, len(values) // max(t.num_rows, 1))


def read_guidance(store: Store) -> dict[str, np.ndarray]:
    """sample_id -> float32 guidance vector."""
    t = store.read_table(*GUIDANCE)
    return dict(zip(t.column("sample_id").to_pylist(), guidance_matrix(t), strict=True))


def read_captions(store: Store) -> dict[str, str]:
    """sample_id -> caption; empty when the version has no captions."""
    if not store.exists(*CAPTIONS):
        return {}
    t = store.read_table(*CAPTIONS)
    return dict(zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist(), strict=True))


def read_image(sample: RealSample, storage_options: dict | None = None) -> Image.Image:
    """A manifest image as it is, read through fsspec and decoded to RGB."""
    import fsspec

    from realfake.data.images import decode_image

    with fsspec.open(sample.uri, "rb", **(storage_options or {})) as f:
        return decode_image(f.read())


def load_real_image(sample: RealSample, resolution: int, storage_options: dict | None = None,
                    fit: Literal["center_crop", "stretch"] = "center_crop") -> Image.Image:
    """Read a manifest image through fsspec, RGB, as a ``resolution`` square.

    ``fit``: ``center_crop`` takes the largest centred square, then resizes it (bicubic); ``stretch`` resizes the
    whole image to the square ignoring its aspect, with PIL's default (bicubic) filter, as the authors'
    ``generate.py`` prepares its img2img sources (``Image.open(p).convert("RGB").resize(img_size)``, line 328).
    """
    img = read_image(sample, storage_options)
    if img.size == (resolution, resolution):
        return img
    if fit == "stretch":
        return img.resize((resolution, resolution), Image.BICUBIC)
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
