"""Train-eval flow: train the downstream classifier on each training set and test it on the real test split.

One task per training set (real train, the synthetic version, the text-to-image baseline); they run side by
side, each holding one GPU slot, or ``nproc_per_node`` slots when it trains under torchrun (DDP) with one
process per GPU of its worker. A retried task resumes from its run's checkpoint. The measures are published as
a table artifact.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prefect import flow

from flows.cli import flow_main
from flows.params import TrainEvalParams
from realfake.config import BuildConfig
from realfake.data.storage import resolve_storage_options
from realfake.redact import redacting_errors
from tasks.artifacts import publish_metrics
from tasks.gpu import ensure_gpu_limit, visible_gpus
from tasks.reports import results_task
from tasks.stages import train_eval_task

__all__ = ["run_train_eval", "scaled_config", "train_eval_flow"]


def run_train_eval(cfg: BuildConfig, data: list[str], gpu_limit: str = "realfake-gpu",
                   nproc_per_node: int = 1, synthetic_scales: Sequence[int] = ()) -> dict[str, dict]:
    """Measure each training set in ``data``, then synthetic data at each of ``synthetic_scales`` (results
    ``synthetic-xK``); returns name -> metrics. Call inside a flow.

    ``nproc_per_node`` > 1 trains each set under torchrun in that many processes (one per GPU; gloo on CPU).
    """
    runs = {d: (cfg, d) for d in dict.fromkeys(data)}
    for k in dict.fromkeys(synthetic_scales):
        runs[f"synthetic-x{k}"] = (scaled_config(cfg, k), "synthetic")
    if not runs:
        return {}
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
    ensure_gpu_limit(gpu_limit, len(visible_gpus()) or 1)
    futures = {name: train_eval_task.submit(c, d, gpu_limit, nproc_per_node) for name, (c, d) in runs.items()}
    return {name: f.result() for name, f in futures.items()}


def scaled_config(cfg: BuildConfig, scale: int) -> BuildConfig:
    """``cfg`` with ``train_data.synthetic_scale = scale`` (validated)."""
    data = cfg.model_dump()
    data["train_data"]["synthetic_scale"] = scale
    return BuildConfig.model_validate(data)


@flow(name="train-eval", log_prints=True, persist_result=True)
@redacting_errors
def train_eval_flow(params: TrainEvalParams = TrainEvalParams()) -> dict:
    """Train the classifier on each requested training set and report its measures on real test data; then
    publish the table of every run of this version (mean +- std over classifier seeds)."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg, stage="train-eval")  # root, device and the classifier recipe checked in seconds
    metrics = run_train_eval(cfg, list(params.data), nproc_per_node=params.nproc_per_node,
                             synthetic_scales=params.synthetic_scales)
    publish_metrics(metrics, cfg.dataset, cfg.version)
    results_task(cfg.root, cfg.dataset, [cfg.version], resolve_storage_options(cfg.storage))
    return metrics


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", choices=["real", "synthetic", "real+synthetic"], default=None)
    p.add_argument("--nproc-per-node", type=int, default=1, help="Training processes per set (torchrun, DDP).")
    p.add_argument("--scale", dest="scales", action="append", type=int, default=[],
                   help="Also train on synthetic data at this scale xK (repeatable).")
    p.add_argument("--mix-ratio", type=float, default=None, help="real+synthetic: synthetic images per real image.")
    p.add_argument("--synthetic-version", dest="versions", action="append", default=[],
                   help="Pool the synthetic images of this version (repeatable).")


def _fields(a: argparse.Namespace) -> dict:
    train_data = {k: v for k, v in (("mix_ratio", a.mix_ratio), ("synthetic_versions", a.versions)) if v}
    return {"synthetic_scales": a.scales, "nproc_per_node": a.nproc_per_node,
            **({"data": a.data} if a.data else {}), **({"train_data": train_data} if train_data else {})}


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.train_eval --preset demo --data real --data synthetic --scale 2``"""
    return flow_main(argv, "python -m flows.train_eval", train_eval_flow, TrainEvalParams, options=_options,
                     fields=_fields)


if __name__ == "__main__":
    sys.exit(main())
