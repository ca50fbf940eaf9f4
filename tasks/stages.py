"""Prefect tasks over the library's stage functions: retries, content caching, GPU slots, logging.

Each task is a thin wrapper of one call in :mod:`realfake.build`; the logic lives there and runs without
Prefect. What the wrapper adds: retries for transient faults only (a bad config fails at once), content
cache keys for the expensive deterministic stages (prepare, fine-tune), a slot of the GPU global
concurrency limit around GPU work, and messages that name the stage, shard or scope at fault, with secrets masked
before Prefect keeps them (:func:`realfake.redact.redacting_errors`). The library is imported inside the tasks so
that deploying or serving a flow does not load torch.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from realfake.config import BuildConfig
from realfake.redact import redacting_errors
from tasks.cache import TRANSIENT_RETRY, finetune_cache_key, prepare_cache_key
from tasks.child_runs import run_child_deployment
from tasks.gpu import gpu_slot, run_group_process

__all__ = [
    "adapter_exists",
    "finalize_task",
    "verify_task",
    "measure_task",
    "report_task",
    "finetune_scopes_task",
    "finetune_task",
    "plan_task",
    "prepare_outputs_exist",
    "prepare_task",
    "run_shard_group_deployment",
    "synthesize_group_task",
    "train_eval_task",
]

def _build() -> Any:
    from realfake import build

    return build


def prepare_outputs_exist(cfg: BuildConfig) -> bool:
    """True when the version holds what prepare writes (so a cache hit is not a dangling one)."""
    store = _build().store_of(cfg)
    needed = [("real", "manifest.parquet")]
    if cfg.guidance.enabled:
        needed.append(("features", "guidance.parquet"))
    if cfg.caption.enabled:
        needed.append(("features", "captions.parquet"))
    return all(store.exists(*p) for p in needed)


def adapter_exists(result: dict, storage_options: dict | None = None) -> bool:
    """True when the adapter a (possibly cached) fine-tune result points at is still on storage."""
    import fsspec

    uri = result.get("adapter") if isinstance(result, dict) else None
    if not uri:
        return True  # fine-tuning disabled: nothing to check
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    return bool(fs.exists(path))


@task(name="prepare", cache_key_fn=prepare_cache_key, persist_result=True, tags=["realfake", "cpu"], **TRANSIENT_RETRY)
@redacting_errors
def prepare_task(cfg: BuildConfig) -> dict:
    """Ingest the real images, then captions and guidance embeddings; returns the counts."""
    log = get_run_logger()
    log.info("prepare %s/%s from %s source", cfg.dataset, cfg.version, cfg.source.kind)
    counts = _build().prepare(cfg)
    log.info("prepare done: %s", counts)
    return counts


@task(name="finetune-scopes", tags=["realfake"])
@redacting_errors
def finetune_scopes_task(cfg: BuildConfig) -> list[str]:
    """The adapter scopes of this config: ``["all"]`` or one per class id."""
    return list(_build().finetune_scopes(cfg))


@task(
    name="finetune",
    task_run_name="finetune-{scope}",
    cache_key_fn=finetune_cache_key,
    persist_result=True,
    tags=["realfake", "gpu"],
    **TRANSIENT_RETRY,
)
@redacting_errors
def finetune_task(
    cfg: BuildConfig, scope: str = "all", device: str | None = None, gpu_limit: str = "realfake-gpu",
    nproc: int = 1,
) -> dict:
    """Train (or load) the LoRA adapter of one scope while holding one GPU slot (``nproc`` slots data-parallel).

    Args:
        cfg: validated build config.
        scope: ``all`` or a class id.
        device: CUDA device to pin a worker process to; None trains in this process.
        gpu_limit: global concurrency limit to hold a slot of.
        nproc: >1: train on that many GPUs of this node at once (``torchrun``, one process per GPU, DDP).
    """
    log = get_run_logger()
    with gpu_slot(gpu_limit, nproc):
        log.info("fine-tuning adapter %r of %s/%s on device %s", scope, cfg.dataset, cfg.version,
                 device or "default")
        try:
            if nproc > 1:
                result = run_group_process(cfg, "finetune", [scope], None, nproc=nproc)["adapters"][scope]
            elif device is None:
                result = _build().finetune(cfg, scope)
            else:
                result = run_group_process(cfg, "finetune", [scope], device)["adapters"][scope]
        except Exception as e:
            _name_the_input(e, f"finetune stage, adapter scope {scope!r} of {cfg.dataset}/{cfg.version}")
            raise
    log.info("adapter %r ready: %s", scope, result.get("adapter"))
    return result


@task(name="plan-shards", tags=["realfake"])
@redacting_errors
def plan_task(cfg: BuildConfig) -> list[str]:
    """Deterministic shard names of the synthesis plan."""
    return list(_build().plan_synthesis(cfg))


@task(name="synthesize-group", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
@redacting_errors
def synthesize_group_task(
    cfg: BuildConfig, shard_names: list[str], device: str | None = None, gpu_limit: str = "realfake-gpu",
    lease_owner: str | None = None,
) -> dict:
    """Write and commit one group of shards, holding one GPU slot; committed shards are skipped.

    A retry after a crash resumes at shard granularity: the library skips shards whose commit record exists.
    ``lease_owner`` names the build holding the version's lease; each commit checks it still does.
    """
    log = get_run_logger()
    with gpu_slot(gpu_limit):
        t0 = time.perf_counter()
        log.info("synthesizing %d shard(s) %s..%s on device %s", len(shard_names), shard_names[0], shard_names[-1],
                 device or "default")
        try:
            if device is None:
                result = _build().synthesize(cfg, shard_names, lease_owner=lease_owner)
            else:
                result = run_group_process(cfg, "synthesize", shard_names, device, lease_owner)
        except Exception as e:
            _name_the_input(e, f"synthesize stage, shards {shard_names[0]}..{shard_names[-1]} of {cfg.dataset}/"
                               f"{cfg.version} on device {device or 'default'}")
            raise
    result = dict(result or {})
    result.setdefault("seconds", time.perf_counter() - t0)
    log.info("group done: %s", {k: v for k, v in result.items() if not isinstance(v, list | dict)})
    return result


@task(name="run-shard-group", task_run_name="child-{group_index}", tags=["realfake"], retries=1,
      retry_delay_seconds=30)
@redacting_errors
def run_shard_group_deployment(deployment: str, parameters: dict, group_index: int,
                               deadline_s: float | None = None) -> dict:
    """Start one child flow run of the shard-group deployment and wait for it; fail if it did not complete.

    The child flow run has its own retries; a child lost with its node (or Running past ``deadline_s``) is
    re-submitted by :func:`tasks.child_runs.run_child_deployment` and resumes at shard granularity.
    """
    run = run_child_deployment(deployment, parameters, f"synthesize stage, shard group {group_index}",
                               deadline_s=deadline_s)
    get_run_logger().info("child run %s (%s) of group %d completed", run.name, run.id, group_index)
    return {"flow_run_id": str(run.id), "flow_run_name": run.name, "group": group_index}


@task(name="finalize", tags=["realfake"], **TRANSIENT_RETRY)
@redacting_errors
def finalize_task(cfg: BuildConfig, stats: dict | None = None, verify: bool = True) -> dict:
    """Write the index and the dataset card (with the build's ``stats``), then verify; returns the card.

    A flow holding the version's lease passes ``verify=False`` and runs :func:`verify_task` once it released it.
    """
    card = _build().finalize(cfg, stats, verify=verify)
    get_run_logger().info("finalized%s %s/%s", " and verified" if verify else "", cfg.dataset, cfg.version)
    return card


@task(name="verify", tags=["realfake"], **TRANSIENT_RETRY)
@redacting_errors
def verify_task(cfg: BuildConfig) -> None:
    """Verify a version end to end (every commit record, checksum, index row and the card); raise listing problems."""
    _build().verify_or_raise(cfg)
    get_run_logger().info("verified %s/%s", cfg.dataset, cfg.version)


@task(name="train-eval", task_run_name="train-eval-{data}", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
@redacting_errors
def train_eval_task(
    cfg: BuildConfig, data: str = "synthetic", gpu_limit: str = "realfake-gpu", nproc_per_node: int = 1
) -> dict:
    """Train the classifier on ``data`` (real / synthetic / baseline) and test it on the real test split.

    ``nproc_per_node`` > 1 trains under torchrun (DDP) in that many processes on this worker, holding one GPU
    slot per process it can place on a GPU. A retry resumes from the run's checkpoint.
    """
    from tasks.gpu import visible_gpus

    with gpu_slot(gpu_limit, min(nproc_per_node, len(visible_gpus()))):
        if nproc_per_node > 1:
            from realfake.train_dist import launch

            metrics = launch(cfg, data, nproc_per_node, on_line=get_run_logger().info)
        else:
            metrics = _build().train_eval(cfg, data)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
    get_run_logger().info("train-eval on %s: %s", data, scalars)
    return metrics


@task(name="measure", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
@redacting_errors
def measure_task(configs: dict[str, BuildConfig], gpu_limit: str = "realfake-gpu") -> dict:
    """The three measures of each built version (accuracy on real test, label fidelity, feature distances),
    recorded in the first version (``runs/measure/{model}-s{seed}/measures.json``)."""
    from realfake.build import measure_versions, write_measures

    with gpu_slot(gpu_limit):
        measures = measure_versions(configs)
    uri = write_measures(next(iter(configs.values())), measures)
    get_run_logger().info("measured %s: %s", ", ".join(configs), uri)
    return measures


@task(name="report", tags=["realfake"], **TRANSIENT_RETRY)
@redacting_errors
def report_task(cfg: BuildConfig, report: dict, configs: dict[str, BuildConfig]) -> dict:
    """Write the report files (markdown, sample grid PNG) next to the version; returns their locations."""
    from realfake.report import write_report

    return write_report(cfg, report, configs)


def _name_the_input(e: Exception, where: str) -> None:
    # The library's message names the file or sample; this adds the stage and the work unit, in the run's
    # log (what the UI shows first) and as a note on the traceback, without changing the exception's type.
    get_run_logger().error("%s failed: %s: %s", where, type(e).__name__, e)
    e.add_note(where)
