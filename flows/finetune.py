"""Fine-tune flow: one LoRA adapter per scope (the whole dataset, or one per class), fanned out over GPUs.

Each scope is one cached task (key: manifest hash, model fingerprints, recipe, scope), so a re-run trains
only the adapters that are missing. With several GPUs on the node, scopes are dealt into one lane per GPU
and each adapter trains in a worker process pinned to its lane's device; every adapter holds one slot of
the GPU global concurrency limit. One adapter for the whole dataset on a multi-GPU node trains on all of its
GPUs at once instead (``torchrun``, DDP, holding one slot per GPU).
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from flows.cli import flow_main
from flows.params import FanoutParams, FinetuneParams
from realfake.config import BuildConfig
from realfake.data.storage import resolve_storage_options
from realfake.redact import redacting_errors
from tasks.gpu import ensure_gpu_limit, split_groups, visible_gpus
from tasks.stages import adapter_exists, finetune_scopes_task, finetune_task

__all__ = ["finetune_flow", "run_finetune"]


def run_finetune(cfg: BuildConfig, fanout: FanoutParams) -> dict[str, dict]:
    """Train every adapter scope of ``cfg`` (cached per scope); returns scope -> result. Call inside a flow."""
    log = get_run_logger()
    if not cfg.finetune.enabled:
        log.info("fine-tuning disabled for %s/%s: synthesis uses the base generator", cfg.dataset, cfg.version)
        return {}
    scopes = finetune_scopes_task(cfg)
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


@flow(name="finetune", log_prints=True, persist_result=True)
@redacting_errors
def finetune_flow(params: FinetuneParams = FinetuneParams()) -> dict:
    """Train (or reuse) the LoRA adapters of a prepared dataset version."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg, stage="finetune")  # root, device and base model checked in seconds, naming the field
    return run_finetune(cfg, params.fanout)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.finetune --preset demo [--set a.b=c ...]``"""
    return flow_main(argv, "python -m flows.finetune", finetune_flow, FinetuneParams)


if __name__ == "__main__":
    sys.exit(main())
