"""Prepare flow: ingest the real images (manifest + rejects), then captions and guidance embeddings.

The task is cached by content (source listing, model fingerprints, stage config): a re-run with the same
inputs returns the recorded counts without recomputing. A cache entry whose files were deleted since is
detected and recomputed rather than trusted.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from flows.cli import flow_main
from flows.params import PrepareParams
from realfake.config import BuildConfig
from realfake.redact import redacting_errors
from tasks.stages import prepare_outputs_exist, prepare_task

__all__ = ["prepare_flow", "run_prepare"]


def run_prepare(cfg: BuildConfig) -> dict:
    """Run the cached prepare task; recompute when a cached result's files are gone. Call inside a flow."""
    counts = prepare_task(cfg)
    if not prepare_outputs_exist(cfg):
        get_run_logger().warning("cached prepare result of %s/%s has no files on storage: recomputing",
                                 cfg.dataset, cfg.version)
        counts = prepare_task.with_options(refresh_cache=True)(cfg)
    return counts


@flow(name="prepare", log_prints=True, persist_result=True)
@redacting_errors
def prepare_flow(params: PrepareParams = PrepareParams()) -> dict:
    """Ingest, caption and embed the real images of a dataset version."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg, stage="prepare")  # source, root, captioner and CLIP checked in seconds, naming the field
    return run_prepare(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.prepare --preset demo [--set a.b=c ...]``"""
    return flow_main(argv, "python -m flows.prepare", prepare_flow, PrepareParams)


if __name__ == "__main__":
    sys.exit(main())
