"""Scheduled regeneration: rebuild a dataset as a new immutable version, then move `latest` if it verifies.

The ``regenerate`` deployment ships with an inactive cron schedule; an operator activates it. Each run reads
the config recorded in the card of the dataset's current ``latest`` version (or this run's form when there is
none), builds it under a new version name ``{prefix}{UTC time}``, and points ``latest`` at it only after the
new version verifies on storage. A failed build leaves ``latest`` where it was.
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from flows.build import run_build_stages
from flows.params import RegenerateParams
from realfake.config import BuildConfig, load_config
from realfake.data.storage import resolve_storage_options, version_store
from realfake.redact import redacting_errors
from tasks.versions import promote_latest_task, read_latest

__all__ = ["regenerate_flow", "regeneration_config"]


def regeneration_config(params: RegenerateParams, now: dt.datetime | None = None) -> BuildConfig:
    """The config of the next version: the latest card's config (or the form), under a new version name."""
    now = now or dt.datetime.now(dt.UTC)
    version = f"{params.version_prefix}{now:%Y%m%d-%H%M%S}"
    form = params.to_config()
    options = resolve_storage_options(form.storage)
    pointer = read_latest(form.root, form.dataset, options) if params.from_latest else None
    if pointer is None:
        return form.model_copy(update={"version": version})
    card = version_store(form.root, form.dataset, pointer["version"], options).read_json("dataset.json")
    recorded = card.get("config")
    if not isinstance(recorded, dict):
        raise RuntimeError(f"card of {form.dataset}/{pointer['version']} records no config; cannot regenerate it")
    data = {**recorded, "dataset": form.dataset, "root": form.root, "version": version}
    return load_config(data=data, overrides=list(params.overrides))


@flow(name="regenerate", log_prints=True, persist_result=False)  # as build: no unkeyed result-record artifact
@redacting_errors
def regenerate_flow(params: RegenerateParams = RegenerateParams()) -> dict:
    """Rebuild a dataset as a new version and move its `latest` pointer once the new version verifies."""
    from realfake.preflight import preflight

    cfg = regeneration_config(params)
    preflight(cfg, measure=params.measure)  # the whole build is checked before its first stage
    get_run_logger().info("regenerating %s as version %s", cfg.dataset, cfg.version)
    report = run_build_stages(cfg, params)
    pointer = promote_latest_task(cfg)
    return {"version": cfg.version, "latest": pointer, "report": report}
