"""Ingest: turn a source folder into ``real/manifest.parquet`` and ``real/rejects.parquet``.

The source is untrusted input. Every file is opened and decoded once, in a contained way: a declared size
above :data:`MAX_PIXELS` is refused from the header before any pixel is decoded (decompression bombs),
and any decoder failure becomes a reject instead of an exception. What can be used is normalised to 8-bit
sRGB RGB (EXIF orientation applied; alpha composited on white; 16-bit and float scaled; CMYK and embedded
colour profiles converted; the first frame of an animation) and what cannot (empty, truncated, not an
image, too small, exact duplicates, the same bytes under two classes, an empty class) is written to the
rejects table with a reason ``"<category>: <detail>"`` whose category comes from :data:`REJECT_CATEGORIES`,
so the card and report can count rejects per category. The run goes on with the rest. Labels are the
indices, in sorted folder order, of the classes left with at least one image; each row keeps its class folder
(for ImageNet the wnid) next to the readable class name. Without a ``val/`` or ``test/`` folder next to
``train/`` (or in a flat folder of classes), each class is split with a fixed seed so the split never depends
on file-system order.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa

from realfake.config import SourceConfig
from realfake.data.images import RejectedImage, decode, reject_category, stable_text
from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA, REJECTS, REJECTS_SCHEMA
from realfake.data.sources import ClassFolder, SourceLayout, demo_source_folder, scan_image_folder
from realfake.data.storage import Store

__all__ = [
    "IngestResult",
    "ingest",
    "scan_source",
    "source_uri",
]

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """Counts of one ingest: samples per split, rejects (total and per category), normalisations, warnings."""

    train: int = 0
    test: int = 0
    rejects: int = 0
    classes: list[str] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    normalised: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def source_uri(cfg: SourceConfig) -> str:
    """The image-folder URI of a source (demo sets are written to the cache first)."""
    if cfg.kind == "image_folder":
        assert cfg.uri is not None
        return cfg.uri
    return str(demo_source_folder(cfg.kind, cfg.image_size))


def scan_source(cfg: SourceConfig, storage_options: dict | None = None) -> SourceLayout:
    """The listing ingest works from: layout, class names and the ``source.classes`` subset, no image read."""
    return scan_image_folder(source_uri(cfg), storage_options, test_split=cfg.test_split,
                             class_names=cfg.class_names, classes=cfg.classes, keep_wnids=cfg.keep_wnids)


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


def _read_bytes(uri: str, storage_options: dict | None, remote: bool) -> bytes:
    def read() -> bytes:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()

    if not remote:
        return read()
    from realfake.data.storage import io_retry  # object stores drop single requests now and then

    return io_retry(read, f"read {uri}")


def _reject(uri: str, class_name: str, split: str | None, reason: str) -> dict:
    return {"uri": uri, "class_name": class_name, "split": split or "", "reason": reason}


def _deduplicate(rows: list[dict], rejects: list[dict], presplit: bool) -> tuple[list[dict], int]:
    """Drop exact byte duplicates; returns the rows kept and how many train/test pairs were left in place.

    The same bytes under two classes have no defined label: every copy is rejected as a label conflict.
    Within one class, one copy per split is kept (the first sample_id). A copy in both train and test leaks
    test images into training (and into the synthetic images made from them): when realfake made the split,
    the test copy is rejected; a split the user made (train/ and test/ folders) is their benchmark and is
    left as it is, with a warning.
    """
    by_sha: dict[str, list[dict]] = {}
    for r in rows:
        by_sha.setdefault(r["sha256"], []).append(r)
    dropped: set[str] = set()
    leaks = 0
    for copies in by_sha.values():
        if len(copies) == 1:
            continue
        folders = sorted({c["_folder"] for c in copies})
        if len(folders) > 1:
            others = ", ".join(repr(f) for f in folders)
            for c in copies:
                rejects.append(_reject(c["uri"], c["class_name"], c["split"],
                                       f"label conflict: the same bytes are in classes {others}"))
                dropped.add(c["sample_id"])
            continue
        ordered = sorted(copies, key=lambda c: (c["split"] != "train", c["sample_id"]))
        kept: dict[str, dict] = {}
        for c in ordered:
            first = kept.get(c["split"]) or (None if presplit else kept.get("train"))
            if first is None:
                kept[c["split"]] = c
                continue
            rejects.append(_reject(c["uri"], c["class_name"], c["split"],
                                   f"duplicate: same bytes as {first['sample_id']}"))
            dropped.add(c["sample_id"])
        leaks += int(len(kept) > 1)
    return [r for r in rows if r["sample_id"] not in dropped], leaks


def ingest(cfg: SourceConfig, store: Store, storage_options: dict | None = None, workers: int = 8,
           progress: bool = False) -> IngestResult:
    """Scan, decode and split the source; write the manifest and rejects tables of ``store``.

    Raises:
        FileNotFoundError: the source does not exist or has no usable image at all.
        ValueError: the source layout is inconsistent (see :func:`~realfake.data.sources.scan_image_folder`).
    """
    root = source_uri(cfg)
    layout = scan_source(cfg, storage_options)
    remote = "://" in layout.root
    rejects: list[dict] = [_reject(s.uri, "", s.split, s.reason) for s in layout.skipped]
    for c in layout.classes:
        if not c.files:
            rejects.append(_reject(c.uri, c.class_name, c.split,
                                   "empty class: no image files" + (" in this split" if c.split else "")))
    jobs: list[tuple[ClassFolder, str, str]] = []
    for c, split, files in _split([c for c in layout.classes if c.files], cfg.test_fraction, cfg.split_seed):
        if cfg.max_per_class:
            files = files[: cfg.max_per_class]
        jobs.extend((c, split, f) for f in files)

    def read(job: tuple[ClassFolder, str, str]) -> dict:
        c, split, uri = job
        try:
            data = _read_bytes(uri, storage_options, remote)
        except OSError as e:
            return {"reject": _reject(uri, c.class_name, split, f"unreadable: {type(e).__name__}: {stable_text(e)}")}
        try:
            decoded = decode(data)
        except RejectedImage as e:
            return {"reject": _reject(uri, c.class_name, split, str(e))}
        img = decoded.image
        return {
            "row": {
                "sample_id": _relative(layout.root, uri),
                "split": split,
                "class_name": c.class_name,
                "uri": uri,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": img.width,
                "height": img.height,
                "_folder": c.folder,
            },
            "notes": decoded.notes,
        }

    results: Iterable[dict]
    notes: Counter[str] = Counter()
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(read, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="ingest", unit="img")
        for r in results:
            if "row" in r:
                rows.append(r["row"])
                notes.update(r["notes"])
            else:
                rejects.append(r["reject"])
                log.warning("rejected %s: %s", r["reject"]["uri"], r["reject"]["reason"])
    rows.sort(key=lambda r: r["sample_id"])
    rows, leaks = _deduplicate(rows, rejects, layout.presplit)

    # Labels come last: a class whose every image was rejected must not leave a gap in the label range.
    folders = sorted({r["_folder"] for r in rows})
    label_of = {f: i for i, f in enumerate(folders)}
    for c in layout.classes:
        if c.files and c.folder not in label_of:
            rejects.append(_reject(c.uri, c.class_name, c.split, "empty class: every image was rejected"))
    for r in rows:
        r["folder"] = r.pop("_folder")
        r["label"] = label_of[r["folder"]]
    if not rows:
        store.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), *REJECTS)
        raise FileNotFoundError(
            f"source {root} has no usable image in any class folder ({len(rejects)} rejected; see "
            f"{store.uri(*REJECTS)})"
        )
    class_names = [next(c.class_name for c in layout.classes if c.folder == f) for f in folders]
    result_warnings = list(layout.warnings)
    if layout.train_folder and not layout.test_folder:
        carved = (f"the real test split is carved out of it ({cfg.test_fraction:g} of each class, "
                  "source.test_fraction)" if cfg.test_fraction else
                  "there is no real test split (source.test_fraction = 0)")
        result_warnings.append(f"{layout.train_folder}/ has no val/ or test/ next to it: {carved}; add "
                               "val/<class>/<image> for a fixed test split")
    result_warnings += _layout_warnings(rows, class_names)
    if leaks:
        result_warnings.append(f"{leaks} image(s) are in both train/ and {layout.test_folder}/ (same bytes): the test "
                               "accuracy will be optimistic; remove them from one of the folders")
    for w in result_warnings:
        log.warning("%s: %s", root, w)
    store.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), *MANIFEST)
    store.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), *REJECTS)
    reasons = Counter(reject_category(r["reason"]) for r in rejects)
    return IngestResult(
        train=sum(r["split"] == "train" for r in rows),
        test=sum(r["split"] == "test" for r in rows),
        rejects=len(rejects),
        classes=class_names,
        reject_reasons=dict(sorted(reasons.items())),
        normalised=dict(sorted(notes.items())),
        warnings=result_warnings,
    )


def _layout_warnings(rows: list[dict], class_names: list[str]) -> list[str]:
    out = []
    if len(class_names) < 2:
        out.append(
            f"only one class ({class_names[0]!r}): synthesis works, but a classifier needs at least two "
            "classes, so train_eval / measurement will refuse this dataset"
        )
    train_labels = {r["label"] for r in rows if r["split"] == "train"}
    missing = [class_names[i] for i in range(len(class_names)) if i not in train_labels]
    if missing:
        out.append(f"{len(missing)} class(es) have no training image, so no synthetic images: {missing[:10]}")
    return out
