"""The dataset card (``dataset.json``) and the end-to-end checks of a dataset version.

:func:`write_card` records what a version is (its configuration, the package versions that built it, the
per-class counts of real and synthetic images, every shard's checksum, the build statistics and how many
inputs were rejected). :func:`verify_version` re-reads a version from any fsspec URI and lists every way it
disagrees with itself: a shard that does not match its commit record, an index row without an image or an
image without one, duplicate keys, counts that differ from the card, uncommitted leftovers. An empty list
means the version is whole. :func:`inspect_version` renders the card for a person, with the per-class quality
table when the version was measured (``quality``).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from realfake.data.lease import LEASE_FILE
from realfake.data.shards import (
    COMMITS_DIR,
    INDEX_FILE,
    RECIPE_FILE,
    WDS_INFO_FILE,
    WDS_SPLIT,
    CommitRecord,
    ShardIntegrityError,
    committed_shards,
    iter_shard,
    partial_shards,
    read_recipe,
    write_index,
)
from realfake.data.storage import Store, io_retry, read_parquet
from realfake.recipe import recipe_diff

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "LATEST",
    "inspect_version",
    "promote_latest",
    "read_card",
    "read_latest",
    "verify_version",
    "write_card",
]

CARD_FILE = "dataset.json"
CARD_FORMAT = "realfake-dataset/1"
_PACKAGES = (
    "realfake",
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "timm",
    "pyarrow",
    "fsspec",
    "s3fs",
    "webdataset",
    "pillow",
)
_MANIFEST = ("real", "manifest.parquet")
_REJECTS = ("real", "rejects.parquet")


def _call(store: Store, method: str, *args: Any) -> Any:
    """``store.<method>(*args)`` with the storage layer's retries on transient errors."""
    parts = [a for a in args if isinstance(a, str)]
    return io_retry(lambda: getattr(store, method)(*args), f"{method} {store.uri(*parts)}")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _as_store(uri_or_store: str | Store, storage_options: dict[str, Any] | None) -> Store:
    return uri_or_store if isinstance(uri_or_store, Store) else Store(uri_or_store, storage_options)


def _real_counts(store: Store) -> dict[str, Any] | None:
    """The manifest's images per split and class, class names and folders: counted on its columns (its rows as
    Python dicts were ~1 GB of finalize's memory at ImageNet-1K's size, benchmarks/results/scale.md)."""
    if not _call(store, "exists", *_MANIFEST):
        return None
    table = _call(store, "read_table", *_MANIFEST)
    has_folder = "folder" in table.column_names  # manifests written before the column lack it
    splits: dict[str, Counter[int]] = {}
    counted = table.group_by(["split", "label"], use_threads=False).aggregate([([], "count_all")])
    for split, label, n in zip(*(counted.column(c).to_pylist() for c in ("split", "label", "count_all")),
                               strict=True):
        splits.setdefault(split, Counter())[int(label)] += n

    def last(column: str, t: Any) -> dict[int, str]:  # per label, the value of its last row (in manifest order)
        g = t.group_by("label", use_threads=False).aggregate([(column, "last")])
        return dict(zip((int(k) for k in g.column("label").to_pylist()), g.column(f"{column}_last").to_pylist(),
                        strict=True))

    names = last("class_name", table)
    folders: dict[int, str] = {}
    if has_folder:
        import pyarrow.compute as pc

        named = table.filter(pc.invert(pc.fill_null(pc.equal(table.column("folder"), ""), True)))
        folders = last("folder", named)
    out = {
        "num_images": table.num_rows,
        "class_names": {str(k): names[k] for k in sorted(names)},
        "splits": {s: {str(k): c[k] for k in sorted(c)} for s, c in sorted(splits.items())},
    }
    if folders:  # label -> class folder (for ImageNet the wnid), next to label -> class name
        out["class_folders"] = {str(k): folders[k] for k in sorted(folders)}
    return out


def _rejects(store: Store) -> dict[str, Any]:
    if not _call(store, "exists", *_REJECTS):
        return {"total": 0, "by_reason": {}}
    # reasons are "category: detail"; the card counts categories (details are per file)
    texts = _call(store, "read_table", *_REJECTS).column("reason").to_pylist()
    reasons = Counter(r.partition(":")[0].strip() for r in texts)
    return {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))}


def _shard_entry(c: CommitRecord) -> dict[str, Any]:
    return {
        "name": c.name,
        "count": c.count,
        "bytes": c.bytes,
        "sha256": c.sha256,
        "files": [{"path": f.path, "count": f.count, "bytes": f.bytes, "sha256": f.sha256} for f in c.files],
    }


def read_card(uri_or_store: str | Store, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parsed ``dataset.json`` of a version."""
    store = _as_store(uri_or_store, storage_options)
    if not _call(store, "exists", CARD_FILE):
        raise FileNotFoundError(f"{store.uri(CARD_FILE)} does not exist: the build has not finished (write_card)")
    return _call(store, "read_json", CARD_FILE)


def write_card(
    store: Store, config: dict[str, Any], stats: dict[str, Any], folder: str = "synthetic",
    quality: dict[str, Any] | None = None, commits: list[CommitRecord] | None = None,
) -> dict[str, Any]:
    """Write ``dataset.json`` for the version in ``store`` and return it.

    The synthetic index is rewritten from the committed shards first, so the card, the index and the shards
    describe the same set of images.

    Args:
        store: The version store.
        config: The build configuration (``BuildConfig.model_dump(mode="json")``).
        stats: Build statistics worth keeping (timings, throughput, rejected generations, ...).
        folder: The shard folder.
        quality: The per-class quality section (:func:`realfake.quality.measure_quality`); absent from the card
            when None, so a version built without ``quality`` has the card it always had.
        commits: The version's commit records where the caller already read them (read here otherwise).
    """
    commits = committed_shards(store, folder) if commits is None else commits
    index = write_index(store, folder, commits)  # streamed: the index is never held whole
    names, per_class = index.class_names, index.class_counts
    fmt = commits[0].format if commits else config.get("shards", {}).get("format")
    card = {
        "format": CARD_FORMAT,
        "dataset": config.get("dataset"),
        "version": config.get("version"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "versions": _versions(),
        "synthetic": {
            "folder": folder,
            "format": fmt,
            "image_format": commits[0].image_format if commits else None,
            "num_images": index.rows,
            "num_shards": len(commits),
            "bytes": sum(c.bytes for c in commits),
            "classes": {str(k): {"class_name": names[k], "count": per_class[k]} for k in sorted(per_class)},
            "index": {
                "path": f"{folder}/{INDEX_FILE}",
                "rows": index.rows,
                "sha256": index.sha256,
            },
            "load_with": _load_hint(fmt, folder),
            # what every image was made from (class names, prompts, models, sampler, seeds): verify checks it
            "recipe": read_recipe(store, folder),
        },
        "shards": [_shard_entry(c) for c in commits],
        "real": _real_counts(store),
        "rejects": _rejects(store),
        "stats": stats,
    }
    if quality is not None:
        card["quality"] = quality
    _call(store, "write_json", card, CARD_FILE)
    return card


def _load_hint(fmt: str | None, folder: str) -> str:
    if fmt == "webdataset":
        return f"timm.data.create_dataset('wds/synthetic', root='<version>/{folder}', split='{WDS_SPLIT}')"
    if fmt == "parquet":
        return f"datasets.load_dataset('parquet', data_files='<version>/{folder}/shard-*.parquet')"
    return ""


VERIFY_MEMORY_BYTES = 2 << 30  # shard bytes verify_version may hold at once (a remote shard is read whole)
_VERIFY_MAX_WORKERS = 8


@dataclass
class _ShardCheck:
    """What checking one committed shard found: its samples as (key, label, image sha256, class name), in shard
    order, the class name taken from each sample's provenance record."""

    samples: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    part_problems: list[str] = field(default_factory=list)


def _check_shard(shard_store: Store, c: CommitRecord) -> _ShardCheck:
    """Read one committed shard in full (sizes, sha256, counts, provenance) and its index part."""
    out = _ShardCheck()
    names: dict[str, str] = {}  # one string object per class name, however many samples carry it
    try:
        for s in iter_shard(shard_store, c, check=True, checksum=True):
            name = s.meta.get("class_name")
            name = names.setdefault(name, name) if isinstance(name, str) else None
            out.samples.append((s.key, s.label, hashlib.sha256(s.image).hexdigest(), name))
            if s.meta.get("label") != s.label or s.meta.get("key") != s.key:
                out.problems.append(f"shard {c.name}, key {s.key}: provenance record disagrees with key/label")
    except FileNotFoundError as e:
        out.problems.append(f"shard {c.name}: file missing ({e})")
    except Exception as e:  # any unreadable shard is a finding, not a crash of the checker
        out.problems.append(f"shard {c.name}: unreadable ({type(e).__name__}: {e})")
    # Its index part: the next write_index and every resume read it.
    part_uri = shard_store.uri(c.index_part)
    try:
        part = _call(shard_store, "read_bytes", c.index_part)
    except FileNotFoundError:
        out.part_problems.append(
            f"shard {c.name}: index part {part_uri} missing; delete its commit record "
            f"{shard_store.uri(COMMITS_DIR, c.name + '.json')} and re-run the build to rewrite the shard"
        )
        return out
    if hashlib.sha256(part).hexdigest() != c.index_sha256:
        out.part_problems.append(f"shard {c.name}: index part {part_uri} checksum mismatch")
    elif read_parquet(part, columns=["key"]).num_rows != c.count:
        out.part_problems.append(f"shard {c.name}: index part {part_uri} has the wrong row count")
    return out


def _verify_workers(commits: list[CommitRecord], workers: int | None) -> int:
    """How many shards :func:`verify_version` checks at a time."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        return workers
    largest = max((f.bytes for c in commits for f in c.files), default=1)
    return max(1, min(_VERIFY_MAX_WORKERS, len(commits), VERIFY_MEMORY_BYTES // max(largest, 1)))


def _map_bounded(fn: Callable[[Any], Any], items: list, workers: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``workers`` threads, results in input order, at most ``workers`` in flight
    or finished-but-unconsumed at once (what a shard's check holds stays bounded)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="realfake-verify") as pool:
        pending: deque[Future] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result


def verify_version(
    uri_or_store: str | Store,
    storage_options: dict[str, Any] | None = None,
    folder: str = "synthetic",
    workers: int | None = None,
) -> list[str]:
    """Check a dataset version end to end; returns its problems (an empty list means it is whole).

    Every committed shard is read in full: size and sha256 against its commit record, every sample present
    with image, label and provenance, keys against the index part. Then the index against the shards
    (rows, keys, image checksums, labels), the card against both (counts per class, shard checksums, index
    checksum), the WebDataset ``_info.json`` against the commits, and the folder for uncommitted leftovers.

    ``workers`` shards are checked at a time (default: up to 8, fewer when the shards are so large that that
    many held at once would pass ``VERIFY_MEMORY_BYTES``); the report does not depend on it.
    """
    store = _as_store(uri_or_store, storage_options)
    problems: list[str] = []
    try:
        card = read_card(store)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        problems.append(f"card: {e}")
        card = None
    if _call(store, "exists", LEASE_FILE):
        problems.append(f"lease {store.uri(LEASE_FILE)} present: a build is running or died; resume it first")
    try:
        commits = committed_shards(store, folder)
    except ShardIntegrityError as e:
        return [*problems, str(e)]
    shard_store = store.child(folder)

    # Shards and their index parts, several at a time (object-store GETs overlap, hashing runs on every core);
    # findings are merged in commit order, so the report is the same whatever the concurrency.
    seen: dict[str, tuple[str, int, str, str | None]] = {}
    part_problems: list[str] = []
    for c, check in zip(commits, _map_bounded(lambda c: _check_shard(shard_store, c), commits,
                                             _verify_workers(commits, workers)), strict=True):
        problems += check.problems
        part_problems += check.part_problems
        for key, label, sha, name in check.samples:
            if key in seen:
                problems.append(f"key {key!r} appears in shard {seen[key][0]} and in shard {c.name}")
            seen[key] = (c.name, label, sha, name)
    problems += part_problems

    # Index against the shards.
    index_rows: list[dict[str, Any]] = []
    if not _call(shard_store, "exists", INDEX_FILE):
        problems.append(f"index {shard_store.uri(INDEX_FILE)} missing")
    else:
        index_bytes = _call(shard_store, "read_bytes", INDEX_FILE)
        columns = ["key", "shard", "label", "image_sha256", "class_name"]
        index_rows = read_parquet(index_bytes, columns=columns).to_pylist()
        keys = [r["key"] for r in index_rows]
        dup = [k for k, n in Counter(keys).items() if n > 1]
        if dup:
            problems.append(f"index: {len(dup)} duplicate key(s), e.g. {dup[:3]}")
        missing = sorted(set(seen) - set(keys))
        extra = sorted(set(keys) - set(seen))
        if missing:
            problems.append(f"index: {len(missing)} image(s) in shards have no index row, e.g. {missing[:3]}")
        if extra:
            problems.append(f"index: {len(extra)} row(s) point to no committed image, e.g. {extra[:3]}")
        bad = [
            r["key"]
            for r in index_rows
            if r["key"] in seen and seen[r["key"]] != (r["shard"], r["label"], r["image_sha256"], r["class_name"])
        ]
        if bad:
            problems.append(f"index: {len(bad)} row(s) disagree with their shard (shard/label/sha256/class name), "
                            f"e.g. {bad[:3]}")
        if card is not None:
            want = card.get("synthetic", {}).get("index", {}).get("sha256")
            if want != hashlib.sha256(index_bytes).hexdigest():
                problems.append("card: index sha256 differs from synthetic/index.parquet")

    # Card against shards and index.
    if card is not None:
        syn = card.get("synthetic", {})
        if syn.get("num_images") != len(seen):
            problems.append(f"card: num_images {syn.get('num_images')} but committed shards hold {len(seen)}")
        per_class = Counter(label for _, label, _, _ in seen.values())
        card_counts = {int(k): v.get("count") for k, v in syn.get("classes", {}).items()}
        if card_counts != dict(per_class):
            diff = {
                k: (card_counts.get(k), per_class.get(k))
                for k in set(card_counts) | set(per_class)
                if card_counts.get(k) != per_class.get(k)
            }
            problems.append(f"card: per-class counts differ from the shards (class: card, shards): {diff}")
        card_shards = {s["name"]: (s["sha256"], s["count"]) for s in card.get("shards", [])}
        actual = {c.name: (c.sha256, c.count) for c in commits}
        for name in sorted(set(card_shards) | set(actual)):
            if card_shards.get(name) != actual.get(name):
                problems.append(
                    f"card: shard {name} is {card_shards.get(name)} in the card, {actual.get(name)} "
                    "in its commit record"
                )

    # One class map and one recipe: the manifest, the recorded recipe, the card, the index and every image's
    # provenance must agree (a prepare re-run with new class names must not leave shards made with the old ones).
    try:
        recorded = read_recipe(store, folder)
    except ShardIntegrityError as e:
        problems.append(str(e))
        recorded = None
    if commits and card is not None and "recipe" in card.get("synthetic", {}):
        problems += _recipe_problems(shard_store, card["synthetic"]["recipe"], recorded)
    problems += _class_map_problems(store, card, recorded, seen, index_rows)

    # timm's split description against the commits.
    if commits and commits[0].format == "webdataset":
        if not _call(shard_store, "exists", WDS_INFO_FILE):
            problems.append(f"{shard_store.uri(WDS_INFO_FILE)} missing (timm's wds reader needs it)")
        else:
            split = _call(shard_store, "read_json", WDS_INFO_FILE).get("splits", {}).get(WDS_SPLIT, {})
            want = [(f.path, f.count) for c in commits for f in c.files]
            got = list(zip(split.get("filenames", []), split.get("shard_lengths", []), strict=False))
            if got != want or split.get("num_samples") != sum(n for _, n in want):
                problems.append(f"{WDS_INFO_FILE}: split '{WDS_SPLIT}' does not list the committed shards")

    leftovers = [p for p in partial_shards(store, folder) if not p.startswith(COMMITS_DIR)]
    if leftovers:
        problems.append(
            f"{len(leftovers)} uncommitted file(s) in {shard_store.uri()} (interrupted writes; resume "
            f"the build to finish or remove them): {leftovers[:5]}"
        )
    return problems


def _recipe_problems(shard_store: Store, in_card: dict | None, recorded: dict | None) -> list[str]:
    if in_card == recorded:
        return []
    where = shard_store.uri(RECIPE_FILE)
    if recorded is None:
        return [f"card: records the recipe of the shards, but {where} is missing"]
    if in_card is None:
        return [f"card: records no recipe, but {where} does (the card was written before the shards: finalize again)"]
    differ = recipe_diff(in_card, recorded)
    return [f"card: its recipe differs from {where} (card -> recorded): {'; '.join(differ) or 'in form'}"]


def _names_by_label(pairs: Iterator[tuple[int, str | None]], source: str, problems: list[str]) -> dict[str, str]:
    """Label -> class name of one source, in label order; a label given several names is a problem."""
    seen: dict[int, dict[str | None, None]] = {}
    for label, name in pairs:
        seen.setdefault(int(label), {})[name] = None
    for label in sorted(seen):
        if len(seen[label]) > 1:
            problems.append(f"class names: {source} gives label {label} {len(seen[label])} names "
                            f"({', '.join(repr(n) for n in list(seen[label])[:3])})")
    return {str(k): str(next(iter(seen[k]))) for k in sorted(seen)}


def _class_map_problems(store: Store, card: dict | None, recorded: dict | None,
                        seen: dict[str, tuple[str, int, str, str | None]], index_rows: list[dict]) -> list[str]:
    """Every class map of the version against the first complete one (the manifest's, else the recorded recipe's):
    maps of every class must equal it, maps of the classes with synthetic images must agree with it where they
    name a class."""
    problems: list[str] = []
    complete: list[tuple[str, dict[str, str]]] = []
    if _call(store, "exists", *_MANIFEST):
        t = _call(store, "read_table", *_MANIFEST).select(["label", "class_name"])
        complete.append(("real/manifest.parquet", _names_by_label(
            zip(t.column("label").to_pylist(), t.column("class_name").to_pylist(), strict=True),
            "real/manifest.parquet", problems)))
    if recorded is not None and isinstance(recorded.get("class names"), dict):
        complete.append((f"synthetic/{RECIPE_FILE}", recorded["class names"]))
    card = card or {}
    if isinstance((card.get("real") or {}).get("class_names"), dict):
        complete.append(("the card's real classes", card["real"]["class_names"]))
    partial = [
        ("the card's synthetic classes", {k: v.get("class_name") for k, v in card.get("synthetic", {}).get(
            "classes", {}).items()}),
        ("synthetic/index.parquet", _names_by_label(((r["label"], r["class_name"]) for r in index_rows),
                                                    "synthetic/index.parquet", problems)),
        ("the shards' provenance records", _names_by_label(((v[1], v[3]) for v in seen.values()),
                                                           "the shards' provenance records", problems)),
    ]
    if not complete:
        return problems
    (ref_name, ref), rest = complete[0], complete[1:]
    for name, names in rest:  # each reads "that map -> the reference", as for the partial ones below
        for d in recipe_diff({"class names": names}, {"class names": ref}):
            problems.append(f"class names differ between {name} and {ref_name}: {d.removeprefix('class names: ')}")
    for name, names in partial:
        for d in recipe_diff({"class names": names}, {"class names": ref}, may_grow=("class names",)):
            problems.append(f"class names differ between {name} and {ref_name}: {d.removeprefix('class names: ')}")
    return problems


def inspect_version(uri_or_store: str | Store, storage_options: dict[str, Any] | None = None) -> str:
    """A readable summary of the card: identity, versions, sizes and the per-class counts."""
    store = _as_store(uri_or_store, storage_options)
    card = read_card(store)
    syn = card.get("synthetic", {})
    real = card.get("real") or {}
    real_train = real.get("splits", {}).get("train", {})
    lines = [
        f"dataset {card.get('dataset')} version {card.get('version')}  ({store.uri()})",
        f"created {card.get('created_at')}  realfake {card.get('versions', {}).get('realfake')}  "
        f"torch {card.get('versions', {}).get('torch')}",
        f"synthetic: {syn.get('num_images')} images in {syn.get('num_shards')} {syn.get('format')} shard(s), "
        f"{syn.get('image_format')}, {syn.get('bytes', 0) / 1e6:.1f} MB",
        f"real: {real.get('num_images', 0)} images; rejected inputs: {card.get('rejects', {}).get('total', 0)}",
        f"load with: {syn.get('load_with', '')}",
        "",
        f"{'label':>5}  {'class':<24} {'synthetic':>9} {'real train':>10}",
    ]
    classes = syn.get("classes", {})
    for k in sorted({*classes, *real_train}, key=int):
        name = classes.get(k, {}).get("class_name") or real.get("class_names", {}).get(k, "")
        lines.append(f"{k:>5}  {name[:24]:<24} {classes.get(k, {}).get('count', 0):>9} {real_train.get(k, 0):>10}")
    if card.get("quality"):
        from realfake.quality import format_quality_table

        lines += ["", "quality per class (far from the real class first):", format_quality_table(card["quality"])]
    if card.get("stats"):
        lines += ["", "stats: " + json.dumps(card["stats"], sort_keys=True)[:400]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# The dataset's ``latest`` pointer
# --------------------------------------------------------------------------------------------------------
LATEST = "latest.json"


def read_latest(root: str, dataset: str, storage_options: dict | None = None) -> dict | None:
    """The pointer ``{root}/{dataset}/latest.json`` (``version``, ``previous``, ``updated``, ``card``), or None."""
    import json

    from realfake.data.storage import dataset_store

    store = dataset_store(root, dataset, storage_options)
    if not store.exists(LATEST):
        return None
    return json.loads(store.read_bytes(LATEST))


def promote_latest(root: str, dataset: str, version: str, storage_options: dict | None = None) -> dict:
    """Verify a version end to end, then point the dataset's ``latest`` at it (one whole-object write, so a reader
    sees the old pointer or the new one). Versions never change; regeneration writes a new one and moves this.

    Raises:
        RuntimeError: the version does not verify; the pointer is left where it was.
    """
    import datetime as dt
    import json

    from realfake.data.storage import dataset_store

    top = dataset_store(root, dataset, storage_options)
    store = top.child(version)
    problems = verify_version(store)
    if problems:
        raise RuntimeError(
            f"{store.uri()} does not verify, `latest` stays where it was:\n  " + "\n  ".join(map(str, problems[:20]))
        )
    previous = read_latest(root, dataset, storage_options)
    pointer = {
        "version": version,
        "previous": previous.get("version") if previous else None,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "card": store.uri("dataset.json"),
    }
    top.write_bytes(json.dumps(pointer, indent=2).encode(), LATEST)
    return pointer
