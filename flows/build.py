"""The end-to-end build flow: prepare -> fine-tune -> synthesize -> finalize -> train-eval -> report.

This is what ``make demo`` runs (``python -m flows.build --preset demo``, on Prefect's ephemeral server with
local storage) and what the ``build`` deployment runs on a cluster. It runs the library's one composition
(:func:`realfake.build.build_and_report`) with the stage helpers of the other flows as its stages, inside one
flow run, so the whole build is one run in the UI with every stage a task, and publishes the artifacts a
person wants: counts per class, accuracies, the sample grid, the card link, and the markdown report.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger

from flows.cli import flow_main
from flows.finetune import run_finetune
from flows.measure import run_measure
from flows.params import BuildParams
from flows.prepare import run_prepare
from flows.synthesize import run_synthesis
from realfake.build import BASELINE_PROMPTS, Stages, build_and_report
from realfake.config import BuildConfig
from realfake.data.storage import resolve_storage_options, version_store
from realfake.redact import redacting_errors
from tasks.artifacts import (
    publish_card_link,
    publish_counts,
    publish_grid,
    publish_metrics,
    publish_plan,
    publish_quality,
    publish_report,
)
from tasks.lease import build_lease
from tasks.stages import finalize_task, report_task, verify_task

__all__ = ["build_flow", "flow_stages", "main", "publish_build_plan", "run_build_stages"]


def flow_stages(params: BuildParams) -> Stages:
    """The stages of :func:`realfake.build.build_and_report` as this flow's tasks: cached prepare, fine-tune, shard
    groups and measure spread as ``params.fanout`` says, finalize, verify and report; the lease is this flow run's
    (one build writes a version at a time: a second one fails naming this one)."""

    def lease(cfg: BuildConfig):
        get_run_logger().info("building %s (device %s)", version_store(cfg.root, cfg.dataset, cfg.version).uri(),
                              cfg.device)
        return build_lease(cfg)

    def finalize(cfg: BuildConfig, stats: dict) -> dict:
        # The card keeps the synthesis scalars only; per-group results stay in the flow run's result.
        synthesis = {k: v for k, v in stats["synthesis"].items() if not isinstance(v, list | dict)}
        return finalize_task(cfg, stats | {"synthesis": synthesis}, False)

    def cfg_of(configs: dict[str, BuildConfig]) -> BuildConfig:
        return next(iter(configs.values()))

    return Stages(
        lease=lease,
        prepare=run_prepare,
        finetune=lambda cfg: list(run_finetune(cfg, params.fanout, params.pinned(cfg)).values()),
        synthesize=lambda cfg, lease: run_synthesis(cfg, params.fanout, params.pinned(cfg), lease.owner),
        finalize=finalize,
        verify=verify_task,
        measure=lambda configs: run_measure(configs, params.fanout, params.pinned(cfg_of(configs)),
                                            params.baseline_prompt),
        report=report_task,
    )


def run_build_stages(cfg: BuildConfig, params: BuildParams) -> dict:
    """Build the version (and the baseline when asked), measure, report and publish artifacts; returns the report."""
    from realfake.report import report_markdown

    report = build_and_report(cfg, flow_stages(params), params.compare_baseline, params.baseline_prompt,
                              params.measure)
    card = report["versions"]["realfake"]["card"]
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    publish_counts(card, cfg.dataset, cfg.version, report.get("measures"))
    publish_quality(card, cfg.dataset, cfg.version, resolve_storage_options(cfg.storage))
    if report.get("measures"):
        publish_metrics(report["measures"], cfg.dataset, cfg.version)
    publish_card_link(store.uri("dataset.json"), cfg.dataset, cfg.version, card)
    if report.get("grid"):
        publish_grid(str(report["grid"]), cfg.dataset, cfg.version, resolve_storage_options(cfg.storage))
    publish_report(report_markdown(report), cfg.dataset, cfg.version)
    return report


# persist_result=False: the report is in the version (report/report.json) and the artifacts; a persisted return
# value would add an unkeyed artifact of raw result-storage JSON to the run in the UI
@flow(name="build", log_prints=True, persist_result=False)
@redacting_errors
def build_flow(params: BuildParams = BuildParams()) -> dict:
    """Build one synthetic dataset version with the Real-Fake method and measure it."""
    from realfake.preflight import preflight

    cfg = params.to_config()  # validation fails here, before any GPU work
    preflight(cfg, measure=params.measure)  # models, source and sizes checked in seconds, naming the field
    publish_build_plan(cfg, params)  # the first artifact: what the build will cost, before it costs anything
    return run_build_stages(cfg, params)


def publish_build_plan(cfg: BuildConfig, params: BuildParams) -> None:
    """Publish the plan artifact (counts, steps, bytes, GPU-hours); a plan that cannot be made is logged, not fatal."""
    from realfake.plan import build_plan, format_plan
    from tasks.gpu import visible_gpus

    # GPUs the build runs on at once: a fanned-out build's child runs take one GPU each (fanout.groups of them);
    # a local build uses this node's GPUs, however many groups share them
    fanned = params.fanout.groups if params.fanout.mode == "deployment" else None
    gpus = fanned or len(visible_gpus()) or 1
    try:
        publish_plan(format_plan(build_plan(cfg, gpus=gpus)), cfg.dataset, cfg.version)
    except Exception as e:  # noqa: BLE001 - the plan informs, it never stops a build (e.g. a batch that
        # does not split over this node's GPUs is the fine-tune stage's own error to raise, naming the field)
        get_run_logger().warning("no plan artifact: %s: %s", type(e).__name__, e)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fanout", choices=["local", "deployment"], default="local", help="how shard groups run")
    p.add_argument("--groups", type=int, default=None, help="shard groups (default: one per visible GPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the text-to-image baseline version")
    p.add_argument("--baseline-prompt", choices=list(BASELINE_PROMPTS), default="caption",
                   help="the baseline's prompt (caption: the authors', the build's prompt with its caption)")


def _show(report: dict) -> None:
    from realfake.report import report_markdown

    print(report_markdown(report))
    locations = report.get("locations", {})
    print(f"\nreport: {report.get('report')}\ngrid:   {report.get('grid')}")
    for name, uri in locations.get("shards", {}).items():
        print(f"shards ({name}): {uri}\ncard   ({name}): {locations.get('card', {}).get(name)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.build --preset demo [--config FILE] [--set a.b=c ...]``; prints the report."""
    return flow_main(argv, "python -m flows.build", build_flow, BuildParams, options=_options, show=_show,
                     report_errors=True, fields=lambda a: {
                         "fanout": {"mode": a.fanout, "groups": a.groups}, "compare_baseline": not a.no_baseline,
                         "baseline_prompt": a.baseline_prompt})


if __name__ == "__main__":
    sys.exit(main())
