"""The end-to-end build flow: prepare -> fine-tune -> synthesize -> finalize -> train-eval -> report.

This is what ``make demo`` runs (``python -m flows.build --preset demo``, on Prefect's ephemeral server with
local storage) and what the ``build`` deployment runs on a cluster. It composes the stage helpers of the
other flows inside one flow run, so the whole build is one run in the UI with every stage a task, and
publishes the artifacts a person wants: counts per class, accuracies, the sample grid, the card link,
and the markdown report.
"""

from __future__ import annotations

import argparse
import sys
import time

from prefect import flow, get_run_logger

from flows.finetune import run_finetune
from flows.params import BuildParams
from flows.prepare import run_prepare
from flows.synthesize import run_synthesis
from realfake.build import BASELINE_PROMPTS
from realfake.config import BuildConfig, ConfigError
from realfake.data.storage import version_store
from realfake.redact import redacting_errors
from tasks.artifacts import (
    publish_card_link,
    publish_counts,
    publish_grid,
    publish_metrics,
    publish_plan,
    publish_report,
)
from tasks.lease import build_lease
from tasks.stages import finalize_task, measure_task, report_task, verify_task

__all__ = ["build_flow", "build_version_stages", "main", "publish_build_plan", "run_build_stages"]


def build_version_stages(cfg: BuildConfig, params: BuildParams) -> dict:
    """prepare -> fine-tune -> synthesize -> finalize for one version inside the current flow run.

    Returns the same per-version summary as :func:`realfake.build.build_version`, so the library's report
    code reads it unchanged.
    """
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[stage] = round(time.perf_counter() - t0, 2)
        return out

    store = version_store(cfg.root, cfg.dataset, cfg.version)
    get_run_logger().info("building %s (device %s)", store.uri(), cfg.device)
    # One build writes a version at a time: a second build of it fails here, naming this one
    with build_lease(cfg) as lease:
        prepared = timed("prepare", run_prepare, cfg)
        adapters = list(timed("finetune", run_finetune, cfg, params.fanout).values())
        synthesis = timed("synthesize", run_synthesis, cfg, params.fanout, params.pinned(cfg), lease.owner)
        stats = {"prepare": prepared, "adapters": adapters, "synthesis": _summary(synthesis),
                 "timings_s": dict(timings)}
        card = timed("finalize", finalize_task, cfg, stats, False)
    verify_task(cfg)  # after the release: verification reports a lease still present as a problem
    return {"uri": store.uri(), "prepare": prepared, "adapters": adapters, "synthesis": synthesis, "card": card,
            "timings_s": timings}


def run_build_stages(cfg: BuildConfig, params: BuildParams) -> dict:
    """Build the version (and the baseline when asked), measure, report and publish artifacts; returns the report."""
    from realfake import build as library
    from realfake.report import report_markdown

    t0 = time.perf_counter()
    versions = {"realfake": build_version_stages(cfg, params)}
    configs = {"realfake": cfg}
    if params.compare_baseline:
        base = library.baseline_config(cfg, params.baseline_prompt)
        versions["baseline"] = build_version_stages(base, params)
        configs["baseline"] = base
    report: dict = {"dataset": cfg.dataset, "version": cfg.version, "versions": versions}
    if params.measure:
        report["measures"] = measure_task(configs, params.fanout.gpu_limit)
    report["total_s"] = round(time.perf_counter() - t0, 2)
    report.update(report_task(cfg, report, configs))

    card = versions["realfake"]["card"]
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    publish_counts(card, cfg.dataset, cfg.version)
    if report.get("measures"):
        publish_metrics(report["measures"], cfg.dataset, cfg.version)
    publish_card_link(store.uri("dataset.json"), cfg.dataset, cfg.version)
    if report.get("grid"):
        publish_grid(str(report["grid"]), cfg.dataset, cfg.version)
    publish_report(report_markdown(report), cfg.dataset, cfg.version)
    return report


def _summary(synthesis: dict) -> dict:
    # The card keeps scalars only; per-group results stay in the flow run's result.
    return {k: v for k, v in synthesis.items() if not isinstance(v, list | dict)}


@flow(name="build", log_prints=True, persist_result=True)
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

    gpus = params.fanout.groups or len(visible_gpus()) or 1
    try:
        publish_plan(format_plan(build_plan(cfg, gpus=gpus)), cfg.dataset, cfg.version)
    except Exception as e:  # noqa: BLE001 - the plan informs, it never stops a build (e.g. a batch that
        # does not split over this node's GPUs is the fine-tune stage's own error to raise, naming the field)
        get_run_logger().warning("no plan artifact: %s: %s", type(e).__name__, e)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.build --preset demo [--config FILE] [--set a.b=c ...]``; prints the report."""
    p = argparse.ArgumentParser(prog="python -m flows.build", description=build_flow.description)
    p.add_argument("--preset", default="demo", help="shipped preset (configs/*.yaml)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C",
                   help="dotted override, repeatable (e.g. --set finetune.max_steps=200)")
    p.add_argument("--fanout", choices=["local", "deployment"], default="local", help="how shard groups run")
    p.add_argument("--groups", type=int, default=None, help="shard groups (default: one per visible GPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the text-to-image baseline version")
    p.add_argument("--baseline-prompt", choices=list(BASELINE_PROMPTS), default="caption",
                   help="the baseline's prompt (caption: the authors', the build's prompt with its caption)")
    a = p.parse_args(argv)
    from realfake.cli import report_error
    from realfake.redact import install_log_redaction

    install_log_redaction()
    try:
        params = BuildParams(preset=a.preset, config_file=a.config, overrides=a.overrides,
                             fanout={"mode": a.fanout, "groups": a.groups}, compare_baseline=not a.no_baseline,
                             baseline_prompt=a.baseline_prompt)
        params.to_config()
    except ConfigError as e:
        return report_error(e)
    from realfake.report import report_markdown

    try:
        report = build_flow(params)
    except Exception as e:  # noqa: BLE001 - shown as the realfake command shows errors: one line, or a bug's traceback
        return report_error(e)
    print(report_markdown(report))
    locations = report.get("locations", {})
    print(f"\nreport: {report.get('report')}\ngrid:   {report.get('grid')}")
    for name, uri in locations.get("shards", {}).items():
        print(f"shards ({name}): {uri}\ncard   ({name}): {locations.get('card', {}).get(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
