"""The ``latest`` pointer of a dataset as a Prefect task (the logic: :mod:`realfake.data.card`).

Versions never change once written; regeneration writes a new one and then moves the pointer, only after the new
version verifies. ``{root}/{dataset}/latest.json`` is written whole, so a reader sees the old or the new pointer.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from realfake.config import BuildConfig
from realfake.data.card import LATEST, promote_latest, read_latest
from realfake.data.storage import dataset_store
from realfake.redact import redacting_errors

__all__ = ["LATEST", "dataset_store", "promote_latest_task", "read_latest"]


@task(name="promote-latest", tags=["realfake"], retries=2, retry_delay_seconds=10)
@redacting_errors
def promote_latest_task(cfg: BuildConfig) -> dict:
    """Verify ``cfg``'s version on storage, then point ``latest`` at it.

    Raises:
        RuntimeError: the version does not verify; the pointer is left where it was.
    """
    from realfake.data.storage import resolve_storage_options

    pointer = promote_latest(cfg.root, cfg.dataset, cfg.version, resolve_storage_options(cfg.storage))
    get_run_logger().info("latest of %s: %s -> %s", cfg.dataset, pointer["previous"], cfg.version)
    return pointer
