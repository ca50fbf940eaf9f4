"""Privacy-audit flow: membership inference (LiRA) over shadow pipelines, and copy detection.

The flow is a thin fan-out over :mod:`realfake.privacy.audit`: it plans the shadow halves once, submits one
task per shadow pipeline and family (each holds a slot of the GPU global concurrency limit, so the limit sets
how many run at once), scores LiRA from the logits the shadows stored, runs copy detection on the version's
synthetic images, and publishes the results table, the log-log ROC and the copy report as artifacts, with
links to the files in ``runs/privacy-lira/`` and ``runs/privacy-copy/`` of the version.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger
from pydantic import Field

from flows.params import ConfigParams
from realfake.config import BuildConfig, CopyDetectionConfig, LiraConfig
from tasks.gpu import ensure_gpu_limit, visible_gpus
from tasks.privacy import (
    copy_detection_task,
    plan_lira_task,
    publish_copy_report,
    publish_lira_report,
    real_shadow_task,
    score_lira_task,
    synthetic_shadow_task,
)

__all__ = ["PrivacyParams", "privacy_flow", "run_lira_fanout"]


class PrivacyParams(ConfigParams):
    """Parameters of the privacy audit of one dataset version: which audits, and their settings."""

    lira_enabled: bool = Field(
        True, description="Run membership inference: N shadow pipelines per family (real-trained and "
        "synthetic-trained classifiers), then online and offline LiRA.",
    )
    copy_enabled: bool = Field(
        True, description="Run copy detection of the version's synthetic images against its real training "
        "images (the version must be built).",
    )
    lira: LiraConfig = Field(default_factory=LiraConfig, description="LiRA settings: shadows, halves, scoring.")
    copy_detection: CopyDetectionConfig = Field(
        default_factory=CopyDetectionConfig, description="Copy-detection descriptor, threshold and report sizes.",
    )
    gpu_limit: str = Field(
        "realfake-gpu", description="Prefect global concurrency limit each shadow and the copy search hold one "
        "slot of; created with one slot per visible GPU (at least one) when missing.",
    )


def _committed_synthetic(cfg: BuildConfig) -> int:
    from realfake.build import store_of
    from realfake.data.shards import committed_shards

    return sum(c.count for c in committed_shards(store_of(cfg)))


def run_lira_fanout(cfg: BuildConfig, lira: LiraConfig, gpu_limit: str) -> dict:
    """Plan, run every shadow of every family as parallel tasks, then score; call inside a flow."""
    plan_lira_task(cfg, lira)
    gpus = visible_gpus()
    futures = []
    for family in lira.families:
        task = real_shadow_task if family == "real" else synthetic_shadow_task
        for i in range(lira.n_shadows):
            # Round-robin pinning: threads of this process share its GPUs; the limit bounds how many run.
            shadow_cfg = cfg.model_copy(update={"device": f"cuda:{gpus[i % len(gpus)]}"}) if len(gpus) > 1 else cfg
            futures.append(task.submit(shadow_cfg, lira, i, gpu_limit))
    shadows = [f.result() for f in futures]
    return score_lira_task(cfg, lira) | {"shadow_runs": shadows}


@flow(name="privacy-audit", log_prints=True, persist_result=True)
def privacy_flow(params: PrivacyParams = PrivacyParams()) -> dict:
    """Audit a dataset version for privacy: LiRA membership inference and copy detection."""
    log = get_run_logger()
    cfg = params.to_config()
    if params.copy_enabled and not _committed_synthetic(cfg):
        # Fail before hours of shadow training, not after.
        raise FileNotFoundError(
            f"copy detection: {cfg.root}/{cfg.dataset}/{cfg.version} has no committed synthetic images; build "
            "the version first (build flow) or set copy_enabled=false"
        )
    ensure_gpu_limit(params.gpu_limit, len(visible_gpus()) or 1)
    out: dict = {"dataset": cfg.dataset, "version": cfg.version}
    if params.lira_enabled:
        lira = run_lira_fanout(cfg, params.lira, params.gpu_limit)
        publish_lira_report(lira, cfg.dataset, cfg.version)
        out["lira"] = {k: lira[k] for k in ("table", "metrics", "shadow_test_top1", "files")}
    if params.copy_enabled:
        copy = copy_detection_task(cfg, params.copy_detection, params.gpu_limit)
        publish_copy_report(copy, cfg.dataset, cfg.version)
        out["copy"] = copy
    log.info("privacy audit of %s/%s done: %s", cfg.dataset, cfg.version, ", ".join(k for k in out if k in
                                                                                   ("lira", "copy")) or "nothing")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.privacy --preset demo --shadows 4 [--set a.b=c ...]``"""
    p = argparse.ArgumentParser(description=privacy_flow.description)
    p.add_argument("--preset", default="demo")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--shadows", type=int, default=16, help="Shadow pipelines per family (paper: 16).")
    p.add_argument("--no-lira", action="store_true", help="Skip membership inference.")
    p.add_argument("--no-copy", action="store_true", help="Skip copy detection.")
    a = p.parse_args(argv)
    params = PrivacyParams(preset=a.preset, config_file=a.config, overrides=a.overrides,
                           lira=LiraConfig(n_shadows=a.shadows), lira_enabled=not a.no_lira,
                           copy_enabled=not a.no_copy)
    out = privacy_flow(params)
    if "lira" in out:
        print(out["lira"]["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
