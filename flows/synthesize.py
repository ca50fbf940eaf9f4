"""Synthesis flows: plan shards, run shard groups in parallel on GPUs, report progress, finalize.

Two flows live here. ``synthesize`` plans the shards of a version and spreads them over groups: on one node
one group per visible GPU, each in its own worker process pinned with ``CUDA_VISIBLE_DEVICES`` (in-process on
a CPU-only or single-GPU node); across nodes one child flow run per group of the ``synthesize-shards``
deployment, which Prefect places on the GPU pool (one pod per group). ``synthesize-shards`` is that child:
it writes and commits its shards and skips the committed ones, so a retried or preempted child resumes at
shard granularity. Every group holds one slot of the GPU global concurrency limit.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from flows.cli import flow_main
from flows.params import FanoutParams, ShardGroupParams, SynthesizeParams
from realfake.build import store_of
from realfake.config import BuildConfig
from realfake.redact import redacting_errors
from tasks.artifacts import ProgressReporter, artifact_key
from tasks.child_runs import group_deadlines
from tasks.gpu import ensure_gpu_limit, split_groups, visible_gpus
from tasks.lease import build_lease
from tasks.stages import finalize_task, plan_task, run_shard_group_deployment, synthesize_group_task, verify_task

__all__ = ["run_synthesis", "synthesize_flow", "synthesize_shards_flow"]


def _progress_counter(cfg: BuildConfig, names: list[str]):
    """(shards committed, images in them) of the planned ``names``, for the progress artifact.

    A commit record never changes once written, so each poll lists the commit folder and reads only the records
    it has not read before: one listing per poll however far the build is (re-reading every record, as
    ``committed_shards`` does, made a poll cost one request per committed shard, benchmarks/results/scale.md).
    """
    from realfake.data.shards.reader import commit_records

    wanted = set(names)
    store = store_of(cfg)
    counts: dict[str, int] = {}

    def count() -> tuple[int, int]:
        # one listing; then one batched read of the records not read yet (s3fs fetches them concurrently)
        for record in commit_records(store, wanted - counts.keys()):
            counts[record.name] = record.count
        return len(counts), sum(counts.values())

    return count


def run_synthesis(cfg: BuildConfig, fanout: FanoutParams, pinned: dict, lease_owner: str | None = None) -> dict:
    """Plan the shards of ``cfg`` and run them in parallel groups; returns a summary for the report.

    Must be called inside a flow run. ``pinned`` are the parameters that reproduce ``cfg`` in a child run;
    ``lease_owner`` the build holding the version's lease (every group's commits check it).
    """
    log = get_run_logger()
    names = plan_task(cfg)
    if not names:
        log.warning("synthesis plan of %s/%s is empty: no real training images", cfg.dataset, cfg.version)
        return {"shards": 0, "groups": 0, "mode": fanout.mode}
    gpus = visible_gpus()
    ensure_gpu_limit(fanout.gpu_limit, len(gpus) or 1)
    n_groups = fanout.groups or max(1, len(gpus))
    groups = split_groups(names, n_groups)
    log.info("synthesis of %s/%s: %d shard(s) in %d group(s), mode %s, GPUs here: %s",
             cfg.dataset, cfg.version, len(names), len(groups), fanout.mode, gpus or "none")
    reporter = ProgressReporter(
        len(names), _progress_counter(cfg, names), artifact_key(cfg.dataset, cfg.version, "synthesis-progress"),
        fanout.poll_seconds,
    )
    with reporter:
        if fanout.mode == "deployment":
            deadlines = group_deadlines(cfg, groups, fanout.gpu_limit)  # after which a Running group counts as lost
            futures = [
                run_shard_group_deployment.submit(
                    fanout.shard_deployment,
                    {"params": ShardGroupParams(**pinned, shard_names=g, gpu_limit=fanout.gpu_limit,
                                                lease_owner=lease_owner).model_dump(mode="json", exclude_none=True)},
                    i, deadlines[i],
                )
                for i, g in enumerate(groups)
            ]
        elif len(groups) == 1 or not gpus:
            # Groups share this process's device; they still run concurrently, bounded by the GPU limit.
            futures = [synthesize_group_task.submit(cfg, g, None, fanout.gpu_limit, lease_owner) for g in groups]
        else:
            futures = [
                synthesize_group_task.submit(cfg, g, gpus[i % len(gpus)], fanout.gpu_limit, lease_owner)
                for i, g in enumerate(groups)
            ]
        results = _wait_for_every_group(futures, cfg)
    shards, images = reporter.refresh()
    if shards < len(names):
        raise RuntimeError(
            f"synthesize stage: only {shards}/{len(names)} shards of {cfg.dataset}/{cfg.version} are committed "
            "after all groups finished; re-run to resume the missing ones"
        )
    seconds = max((r.get("seconds", 0.0) for r in results), default=0.0)
    return {"shards": shards, "images": images, "groups": len(groups), "mode": fanout.mode, "results": results,
            "images_per_s": images / seconds if seconds else None}


def _wait_for_every_group(futures: list, cfg: BuildConfig) -> list[dict]:
    """Every group's result, after all of them ended: a failed group does not end the build (and release its
    lease) while the others still write. Raises the one failure, or one error listing each failed group."""
    results, failed = [], []
    for i, f in enumerate(futures):
        try:
            results.append(f.result())
        except Exception as e:  # noqa: BLE001 - collected, then raised below
            failed.append((i, e))
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        lines = "\n  ".join(f"group {i}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            for i, e in failed)
        raise RuntimeError(f"synthesize stage of {cfg.dataset}/{cfg.version}: {len(failed)} of {len(futures)} shard "
                           f"groups failed; committed shards are kept and a re-run resumes:\n  {lines}")
    return results


@flow(name="synthesize-shards", log_prints=True, retries=2, retry_delay_seconds=30, persist_result=True)
@redacting_errors
def synthesize_shards_flow(params: ShardGroupParams = ShardGroupParams()) -> dict:
    """Child run: write and commit one group of shards (committed ones are skipped, so retries resume)."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg, stage="synthesize")  # on the node that generates: its device, the base model, the root
    names = list(params.shard_names) or plan_task(cfg)
    ensure_gpu_limit(params.gpu_limit, len(visible_gpus()) or 1)
    gpus = visible_gpus()
    # A pod / container sees its own GPU(s); the process runs in place and keeps the model warm across shards.
    return synthesize_group_task(cfg, names, None, params.gpu_limit, params.lease_owner) | {"devices": gpus}


@flow(name="synthesize", log_prints=True, persist_result=True)
@redacting_errors
def synthesize_flow(params: SynthesizeParams = SynthesizeParams()) -> dict:
    """Plan the shards of a prepared (and fine-tuned) version, synthesize them in parallel, then finalize."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    # child runs on the GPU pool check their own device
    preflight(cfg, stage="synthesize", skip=("device",) if params.fanout.mode == "deployment" else ())
    with build_lease(cfg) as lease:  # a concurrent build or synthesis of this version fails here, naming it
        summary = run_synthesis(cfg, params.fanout, params.pinned(cfg), lease.owner)
        if params.finalize:
            summary["card"] = finalize_task(cfg, None, False)
    if params.finalize:
        verify_task(cfg)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.synthesize --preset demo [--set a.b=c ...]``"""
    return flow_main(argv, "python -m flows.synthesize", synthesize_flow, SynthesizeParams, show=None)


if __name__ == "__main__":
    sys.exit(main())
