"""The ``latest`` pointer of a dataset: which immutable version readers should take.

Versions never change once written; regeneration writes a new one and then moves the pointer. The pointer is
one small JSON object (``{root}/{dataset}/latest.json``) written whole, so a reader sees the old pointer or
the new one, never half of either. It moves only after the new version verifies.
"""

from __future__ import annotations

import datetime as dt
import json

from prefect import get_run_logger, task

from realfake.config import BuildConfig
from realfake.data.storage import Store, version_store

__all__ = ["LATEST", "dataset_store", "promote_latest_task", "read_latest"]

LATEST = "latest.json"


def dataset_store(root: str, dataset: str) -> Store:
    """The store of a dataset (the parent of its versions)."""
    # Same root normalisation as the versions themselves (relative paths become absolute).
    vs = version_store(root, dataset, "latest")
    return Store(vs.uri().rsplit("/", 1)[0], vs.storage_options)


def read_latest(root: str, dataset: str) -> dict | None:
    """The current pointer ``{"version", "updated", "card"}``, or None when the dataset has none yet."""
    store = dataset_store(root, dataset)
    if not store.exists(LATEST):
        return None
    return json.loads(store.read_bytes(LATEST))


@task(name="promote-latest", tags=["realfake"], retries=2, retry_delay_seconds=10)
def promote_latest_task(cfg: BuildConfig) -> dict:
    """Verify ``cfg``'s version on storage, then point ``latest`` at it.

    Raises:
        RuntimeError: the version does not verify; the pointer is left where it was.
    """
    from realfake.data.card import verify_version

    store = version_store(cfg.root, cfg.dataset, cfg.version)
    problems = verify_version(store)
    if problems:
        raise RuntimeError(
            f"{store.uri()} does not verify, `latest` stays where it was:\n  " + "\n  ".join(map(str, problems[:20]))
        )
    previous = read_latest(cfg.root, cfg.dataset)
    pointer = {
        "version": cfg.version,
        "previous": previous.get("version") if previous else None,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "card": store.uri("dataset.json"),
    }
    dataset_store(cfg.root, cfg.dataset).write_bytes(json.dumps(pointer, indent=2).encode(), LATEST)
    get_run_logger().info("latest of %s: %s -> %s", cfg.dataset, pointer["previous"], cfg.version)
    return pointer
