"""Fine-tune flow: one LoRA adapter per scope (the whole dataset, or one per class), fanned out over GPUs.

Each scope is one cached task (key: manifest hash, model fingerprints, recipe, scope), so a re-run trains
only the adapters that are missing. With several GPUs on the node, scopes are dealt into one lane per GPU
and each adapter trains in a worker process pinned to its lane's device; every adapter holds one slot of
the GPU global concurrency limit. One adapter for the whole dataset on a multi-GPU node trains on all of its
GPUs at once instead (``torchrun``, DDP, holding one slot per GPU).

With ``fanout.mode == "deployment"`` (a build fanned out across nodes) no adapter trains in this process: the
scopes are dealt into lanes (``fanout.groups``, or one per visible GPU) and each lane is one child run of the
``finetune`` deployment on the GPU pool, which trains its scopes as above. A child lost with its node is marked
Crashed by the lost-run automation and re-submitted (:func:`tasks.child_runs.run_child_deployment`); the new run
resumes each adapter from its committed checkpoint. A lane Running past its deadline (from the plan's fine-tuning
rate) is treated as lost the same way.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task

from flows.cli import flow_main
from flows.params import FanoutParams, FinetuneParams
from realfake.build import store_of
from realfake.config import BuildConfig
from realfake.data.storage import resolve_storage_options
from realfake.redact import redacting_errors
from tasks.child_runs import finetune_deadlines, require_deployment, run_child_deployment
from tasks.gpu import ensure_gpu_limit, split_groups, visible_gpus
from tasks.stages import adapter_exists, finetune_scopes_task, finetune_task

__all__ = ["finetune_flow", "lane_parameters", "run_finetune", "select_scopes"]


def run_finetune(cfg: BuildConfig, fanout: FanoutParams, pinned: dict | None = None,
                 scopes: list[str] | None = None) -> dict[str, dict]:
    """Train every adapter scope of ``cfg`` (cached per scope), or only ``scopes``; returns scope -> result.

    Call inside a flow. ``pinned``: the parameters that reproduce ``cfg`` in a child run (needed when
    ``fanout.mode`` is ``deployment``).
    """
    log = get_run_logger()
    if not cfg.finetune.enabled:
        log.info("fine-tuning disabled for %s/%s: synthesis uses the base generator", cfg.dataset, cfg.version)
        return {}
    scopes = select_scopes(cfg, finetune_scopes_task(cfg), scopes)
    if fanout.mode == "deployment":
        if pinned is None:
            raise ValueError("fanout.mode=deployment: run_finetune needs the pinned parameters of the config")
        return _run_finetune_children(cfg, fanout, pinned, scopes)
    gpus = visible_gpus()
    ensure_gpu_limit(fanout.gpu_limit, len(gpus) or 1)

    def check(scope: str, result: dict, device: str | None) -> dict:
        if adapter_exists(result, resolve_storage_options(cfg.storage)):
            return result
        log.warning("cached adapter %r of %s/%s is gone from storage: retraining", scope, cfg.dataset, cfg.version)
        return finetune_task.with_options(refresh_cache=True)(cfg, scope, device, fanout.gpu_limit)

    if scopes == ["all"] and len(gpus) > 1 and fanout.data_parallel_finetune:
        # One adapter, several GPUs: all of them train it together (one process per GPU, gradients all-reduced)
        result = finetune_task(cfg, "all", None, fanout.gpu_limit, len(gpus))
        return {"all": check("all", result, None)}
    if len(gpus) <= 1:
        # One device: adapters train one after another in this process (the GPU limit would serialise them).
        return {s: check(s, finetune_task(cfg, s, None, fanout.gpu_limit), None) for s in scopes}
    # One lane per GPU: scopes of a lane run in order on its device (each waits for the previous one),
    # lanes run side by side, each adapter in a worker process pinned to the lane's GPU.
    futures = {}
    devices = {}
    for i, lane in enumerate(split_groups(scopes, len(gpus))):
        previous = None
        for scope in lane:
            devices[scope] = gpus[i]
            previous = finetune_task.submit(
                cfg, scope, gpus[i], fanout.gpu_limit, wait_for=[previous] if previous is not None else None
            )
            futures[scope] = previous
    return {s: check(s, f.result(), devices[s]) for s, f in futures.items()}


def select_scopes(cfg: BuildConfig, every: list[str], asked: list[str] | None) -> list[str]:
    """The scopes of ``every`` (the config's, in order) that ``asked`` names (None: all of them).

    Raises:
        ValueError: ``asked`` names a scope the config does not have (one line naming the field and the fix).
    """
    if asked is None:
        return list(every)
    unknown = [s for s in asked if s not in every]
    if unknown:
        raise ValueError(f"scopes: {unknown[0]!r} is not an adapter scope of {cfg.dataset}/{cfg.version} "
                         f"(finetune.scope={cfg.finetune.scope}: {', '.join(every) or 'none'}); name one of them "
                         "or leave scopes empty for all")
    return [s for s in every if s in set(asked)]


def lane_parameters(pinned: dict, fanout: FanoutParams, lane: list[str]) -> dict:
    """Parameters of the fine-tune child run of one lane: the pinned config, these scopes, local fan-out on its node."""
    local = fanout.model_copy(update={"mode": "local", "groups": None})
    return {"params": FinetuneParams(**pinned, fanout=local, scopes=lane).model_dump(mode="json", exclude_none=True)}


def _scope_images(cfg: BuildConfig, scopes: list[str]) -> dict[str, int]:
    """Training images of each adapter scope, from the version's manifest."""
    from collections import Counter

    from realfake.data.manifest import read_manifest

    labels = Counter(str(s.label) for s in read_manifest(store_of(cfg), "train"))
    return {s: sum(labels.values()) if s == "all" else labels.get(s, 0) for s in scopes}


def _stored_adapter(cfg: BuildConfig, scope: str, run_name: str) -> dict:
    """The result of an adapter a child run trained, read back from the version (its ``train_log.json``)."""
    from realfake.finetune import adapter_dir

    store = store_of(cfg)
    folder = adapter_dir(scope)
    logged = store.read_json(*folder, "train_log.json")
    history = logged.get("history") or []
    return {"scope": scope, "adapter": store.uri(*folder), "steps": logged["schedule"]["steps"],
            "seconds": logged.get("seconds"), "final_loss": float(history[-1]["loss"]) if history else float("nan"),
            "resumed_from": logged.get("resumed_from", 0), "flow_run": run_name}


@task(name="finetune-lane", task_run_name="finetune-lane-{lane}", tags=["realfake"])
def finetune_lane_deployment(deployment: str, parameters: dict, lane: int, scopes: list[str],
                             deadline_s: float | None) -> str:
    """One child run of the fine-tune deployment training ``scopes``, re-submitted while it is lost; returns the
    name of the run that completed."""
    run = run_child_deployment(deployment, parameters, f"finetune stage, lane {lane} (adapters {', '.join(scopes)})",
                               deadline_s=deadline_s)
    get_run_logger().info("child run %s (%s) of fine-tune lane %d completed", run.name, run.id, lane)
    return run.name


def _run_finetune_children(cfg: BuildConfig, fanout: FanoutParams, pinned: dict, scopes: list[str]) -> dict:
    """One child run of ``fanout.finetune_deployment`` per lane of ``scopes``; returns scope -> result."""
    log = get_run_logger()
    if not scopes:
        return {}
    require_deployment(fanout.finetune_deployment, "fanout.finetune_deployment")
    ensure_gpu_limit(fanout.gpu_limit, len(visible_gpus()) or 1)
    lanes = split_groups(scopes, fanout.groups or max(1, len(visible_gpus())))
    deadlines = finetune_deadlines(cfg, lanes, _scope_images(cfg, scopes), fanout.gpu_limit)
    log.info("fine-tuning %d adapter(s) of %s/%s in %d child run(s) of %s", len(scopes), cfg.dataset, cfg.version,
             len(lanes), fanout.finetune_deployment)
    # each child trains its lane with local fan-out on its own node (one process per GPU it sees)
    futures = [
        finetune_lane_deployment.submit(fanout.finetune_deployment, lane_parameters(pinned, fanout, lane), i, lane,
                                        deadlines[i])
        for i, lane in enumerate(lanes)
    ]
    runs, failed = [], []
    for f in futures:  # every lane ends before a failure is raised: the others' adapters are kept
        try:
            runs.append(f.result())
        except Exception as e:  # noqa: BLE001 - raised below
            failed.append(e)
    if failed:
        raise failed[0]
    return {s: _stored_adapter(cfg, s, run) for lane, run in zip(lanes, runs, strict=True) for s in lane}


@flow(name="finetune", log_prints=True, persist_result=True)
@redacting_errors
def finetune_flow(params: FinetuneParams = FinetuneParams()) -> dict:
    """Train (or reuse) the LoRA adapters of a prepared dataset version."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    # root, device and base model checked in seconds, naming the field (child runs on the GPU pool check their own
    # device)
    preflight(cfg, stage="finetune", skip=("device",) if params.fanout.mode == "deployment" else ())
    return run_finetune(cfg, params.fanout, params.pinned(cfg), params.scopes)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.finetune --preset demo [--set a.b=c ...]``"""
    return flow_main(argv, "python -m flows.finetune", finetune_flow, FinetuneParams)


if __name__ == "__main__":
    sys.exit(main())
