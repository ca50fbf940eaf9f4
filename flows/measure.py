"""Measure flow: the three measures of a built version (and its baseline) on the real test split.

A classifier trained on real data, one on each version's synthetic data, both tested on the real test split; label
fidelity and the feature MMD / Frechet distance to the real test split, taken with the real-trained classifier
(:func:`realfake.build.measure_versions`). The measures are recorded in the version
(``runs/measure/{model}-s{seed}/measures.json``, one file per classifier seed)
and published as a table artifact.

The build's measure stage runs here. With ``fanout.mode == "local"`` it runs in the build's own process; with
``fanout.mode == "deployment"`` it is one child run of the ``measure`` deployment on the GPU pool, like fine-tuning
and the shard groups: a child lost with its node is marked Crashed by the lost-run automation and re-submitted
(:func:`tasks.child_runs.run_child_deployment`), and the new run resumes each classifier from its checkpoint (the
real-trained one is kept until every version is measured); a child Running past its deadline (from the plan's
classifier work at a published training rate) is treated as lost the same way.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task

from flows.cli import flow_main
from flows.params import FanoutParams, MeasureParams
from realfake.build import BaselineKind, baseline_config, read_measures
from realfake.config import BuildConfig
from realfake.redact import redacting_errors
from tasks.artifacts import publish_metrics
from tasks.child_runs import measure_deadline, require_deployment, run_child_deployment
from tasks.gpu import ensure_gpu_limit, visible_gpus
from tasks.stages import measure_task

__all__ = ["measure_configs", "measure_flow", "measure_parameters", "run_measure"]


def measure_configs(cfg: BuildConfig, compare_baseline: bool, baseline_prompt: BaselineKind) -> dict[str, BuildConfig]:
    """The versions a build of ``cfg`` measures: its own, and its baseline when it builds one."""
    return {"realfake": cfg} | ({"baseline": baseline_config(cfg, baseline_prompt)} if compare_baseline else {})


def run_measure(configs: dict[str, BuildConfig], fanout: FanoutParams, pinned: dict | None = None,
                baseline_prompt: BaselineKind = "caption") -> dict:
    """Measure ``configs`` (from :func:`measure_configs`) here, or in one child run of ``fanout.measure_deployment``
    when ``fanout.mode`` is ``deployment`` (``pinned``: the parameters that reproduce the first config there).
    Call inside a flow; returns what :func:`realfake.build.measure_versions` returns."""
    if fanout.mode != "deployment":
        ensure_gpu_limit(fanout.gpu_limit, len(visible_gpus()) or 1)
        return measure_task(configs, fanout.gpu_limit)
    if pinned is None:
        raise ValueError("fanout.mode=deployment: run_measure needs the pinned parameters of the config")
    cfg = next(iter(configs.values()))
    require_deployment(fanout.measure_deployment, "fanout.measure_deployment")
    ensure_gpu_limit(fanout.gpu_limit, len(visible_gpus()) or 1)
    deadline_s, source = measure_deadline(configs)
    get_run_logger().info("measuring %s of %s/%s in a child run of %s; treated as lost after %.0f s Running: %s",
                          ", ".join(configs), cfg.dataset, cfg.version, fanout.measure_deployment, deadline_s, source)
    measure_deployment(fanout.measure_deployment, measure_parameters(pinned, configs, fanout, baseline_prompt),
                       f"measure stage of {cfg.dataset}/{cfg.version} ({', '.join(configs)})", deadline_s)
    return read_measures(cfg)


def measure_parameters(pinned: dict, configs: dict[str, BuildConfig], fanout: FanoutParams,
                       baseline_prompt: BaselineKind) -> dict:
    """Parameters of the measure child run: the pinned config, whether to measure the baseline too, the GPU limit."""
    params = MeasureParams(**pinned, compare_baseline="baseline" in configs, baseline_prompt=baseline_prompt,
                           gpu_limit=fanout.gpu_limit)
    return {"params": params.model_dump(mode="json", exclude_none=True)}


@task(name="measure-child", tags=["realfake"])
def measure_deployment(deployment: str, parameters: dict, what: str, deadline_s: float | None) -> str:
    """One child run of the measure deployment, re-submitted while it is lost; returns the name of the run that
    completed (its measures are in the version)."""
    run = run_child_deployment(deployment, parameters, what, deadline_s=deadline_s)
    get_run_logger().info("child run %s (%s) of the measure stage completed", run.name, run.id)
    return run.name


@flow(name="measure", log_prints=True, persist_result=False)
@redacting_errors
def measure_flow(params: MeasureParams = MeasureParams()) -> dict:
    """Measure a built version (and its baseline): classifiers on real and on synthetic data, label fidelity, MMD
    and Frechet distance, all against the real test split."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg, stage="train-eval")  # root, device and the classifier recipe checked in seconds
    configs = measure_configs(cfg, params.compare_baseline, params.baseline_prompt)
    measures = run_measure(configs, FanoutParams(gpu_limit=params.gpu_limit))
    publish_metrics(measures, cfg.dataset, cfg.version)
    return measures


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.measure --preset demo [--set a.b=c ...]``"""
    return flow_main(argv, "python -m flows.measure", measure_flow, MeasureParams)


if __name__ == "__main__":
    sys.exit(main())
