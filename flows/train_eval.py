"""Train-eval flow: train the downstream classifier on each training set and test it on the real test split.

One task per training set (real train, the synthetic version, the text-to-image baseline); they run side by
side, each holding one GPU slot. The measures are published as a table artifact.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows.params import TrainEvalParams
from realfake.config import BuildConfig
from tasks.artifacts import publish_metrics
from tasks.gpu import ensure_gpu_limit, visible_gpus
from tasks.stages import train_eval_task

__all__ = ["run_train_eval", "train_eval_flow"]


def run_train_eval(cfg: BuildConfig, data: list[str], gpu_limit: str = "realfake-gpu") -> dict[str, dict]:
    """Measure each training set in ``data``; returns data -> metrics. Call inside a flow."""
    if not data:
        return {}
    ensure_gpu_limit(gpu_limit, len(visible_gpus()) or 1)
    futures = {d: train_eval_task.submit(cfg, d, gpu_limit) for d in dict.fromkeys(data)}
    return {d: f.result() for d, f in futures.items()}


@flow(name="train-eval", log_prints=True, persist_result=True)
def train_eval_flow(params: TrainEvalParams = TrainEvalParams()) -> dict:
    """Train the classifier on each requested training set and report its measures on real test data."""
    cfg = params.to_config()
    metrics = run_train_eval(cfg, list(params.data))
    publish_metrics(metrics, cfg.dataset, cfg.version)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.train_eval --preset demo --data real --data synthetic``"""
    p = argparse.ArgumentParser(description=train_eval_flow.description)
    p.add_argument("--preset", default="demo")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--data", action="append", choices=["real", "synthetic", "baseline"], default=None)
    a = p.parse_args(argv)
    params = TrainEvalParams(preset=a.preset, config_file=a.config, overrides=a.overrides,
                             **({"data": a.data} if a.data else {}))
    print(train_eval_flow(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
