"""Ingest: turn a source folder into ``real/manifest.parquet`` and ``real/rejects.parquet``.

Every file is opened and decoded once; what cannot be used (unreadable, not an image, an empty class
folder) is written to the rejects table with the reason, never silently dropped, and the run goes on with
the rest. Labels are the indices of the non-empty classes in sorted folder order. Without ``train/`` and
``test/`` folders, each class is split with a fixed seed so the split never depends on file-system order.
"""

from __future__ import annotations

import hashlib
import logging
import random
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
from PIL import Image

from realfake.config import SourceConfig
from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA, REJECTS, REJECTS_SCHEMA
from realfake.data.sources import ClassFolder, demo_source_folder, scan_image_folder
from realfake.data.storage import Store

__all__ = ["IngestResult", "decode_image", "ingest", "source_uri"]

log = logging.getLogger(__name__)
MAX_PIXELS = 40_000_000  # above this a file is treated as a decompression bomb and rejected


@dataclass
class IngestResult:
    train: int = 0
    test: int = 0
    rejects: int = 0
    classes: list[str] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an RGB image, or raise ValueError with a reason fit for the rejects table."""
    import io

    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"too large: {img.width}x{img.height} pixels (limit {MAX_PIXELS})")
            img.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"decompression bomb: {e}") from None
        except ValueError:
            raise
        except Exception as e:  # PIL raises many types for broken files
            raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def source_uri(cfg: SourceConfig) -> str:
    """The image-folder URI of a source (demo sets are written to the cache first)."""
    if cfg.kind == "image_folder":
        assert cfg.uri is not None
        return cfg.uri
    return str(demo_source_folder(cfg.kind, cfg.image_size))


def _split(classes: list[ClassFolder], test_fraction: float, seed: int) -> list[tuple[ClassFolder, str, list[str]]]:
    out = []
    for c in classes:
        if c.split is not None:
            out.append((c, c.split, c.files))
            continue
        files = list(c.files)
        random.Random(f"{seed}:{c.folder}").shuffle(files)
        n_test = round(len(files) * test_fraction)
        out.append((c, "test", sorted(files[:n_test])))
        out.append((c, "train", sorted(files[n_test:])))
    return out


def _relative(root: str, uri: str) -> str:
    return uri[len(root) :].lstrip("/") if uri.startswith(root) else uri


def ingest(cfg: SourceConfig, store: Store, storage_options: dict | None = None, workers: int = 8,
           progress: bool = False) -> IngestResult:
    """Scan, decode and split the source; write the manifest and rejects tables of ``store``."""
    root = source_uri(cfg)
    layout = scan_image_folder(root, storage_options)
    rejects: list[dict] = []
    non_empty = sorted({c.folder for c in layout.classes if c.files})
    for c in layout.classes:
        if not c.files:
            msg = "empty class folder: no image files" + (" in this split" if c.split else "")
            log.warning("%s/%s: %s", layout.root, c.folder, msg)
            rejects.append({"uri": f"{layout.root}/{c.folder}", "class_name": c.class_name, "split": c.split or "",
                            "reason": msg})
    if not non_empty:
        raise FileNotFoundError(f"source {root} has no images in any class folder")
    label_of = {folder: i for i, folder in enumerate(non_empty)}
    jobs: list[tuple[ClassFolder, str, str]] = []
    for c, split, files in _split([c for c in layout.classes if c.files], cfg.test_fraction, cfg.split_seed):
        if cfg.max_per_class:
            files = files[: cfg.max_per_class]
        jobs.extend((c, split, f) for f in files)

    def read(job: tuple[ClassFolder, str, str]) -> dict:
        c, split, uri = job
        try:
            with fsspec.open(uri, "rb", **(storage_options or {})) as f:
                data = f.read()
            img = decode_image(data)
        except (OSError, ValueError) as e:
            return {"reject": {"uri": uri, "class_name": c.class_name, "split": split, "reason": str(e)}}
        return {
            "row": {
                "sample_id": _relative(layout.root, uri),
                "split": split,
                "label": label_of[c.folder],
                "class_name": c.class_name,
                "uri": uri,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": img.width,
                "height": img.height,
            }
        }

    results: Iterable[dict]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(read, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="ingest", unit="img")
        rows = []
        for r in results:
            if "row" in r:
                rows.append(r["row"])
            else:
                rejects.append(r["reject"])
                log.warning("rejected %s: %s", r["reject"]["uri"], r["reject"]["reason"])
    rows.sort(key=lambda r: r["sample_id"])
    store.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), *MANIFEST)
    store.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), *REJECTS)
    reasons: dict[str, int] = {}
    for r in rejects:
        key = r["reason"].split(":")[0].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    class_names = [next(c.class_name for c in layout.classes if c.folder == f) for f in non_empty]
    return IngestResult(
        train=sum(r["split"] == "train" for r in rows),
        test=sum(r["split"] == "test" for r in rows),
        rejects=len(rejects),
        classes=class_names,
        reject_reasons=reasons,
    )
