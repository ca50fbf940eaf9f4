"""Privacy-audit flows: membership inference (LiRA) over shadow pipelines, and copy detection.

Two flows live here. ``privacy-audit`` is a thin fan-out over :mod:`realfake.privacy.audit`: it plans the
shadow halves once, runs the shadow pipelines of every family, scores LiRA from the logits the shadows stored,
runs copy detection on the version's synthetic images, and publishes the results table, the log-log ROC and
the copy report as artifacts, with links to the files in ``runs/privacy-lira/`` and ``runs/privacy-copy/`` of
the version. Shadows run where ``fanout.mode`` says: as tasks of the parent run (local: one at a time in its
process, or with several GPUs one process per shadow pinned to a GPU), or, like synthesis shard groups, as
child flow runs of the ``privacy-shadows`` deployment, which Prefect places on the GPU pool (one pod per batch
of shadows). ``privacy-shadows`` is that child: it trains its shadows with the same tasks
and stores their logits in the version exactly as the local path does, so scoring reads both alike. Either
way every shadow holds one slot of the GPU global concurrency limit, and finished shadows are skipped.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.cli import flow_main
from flows.params import ConfigParams
from realfake.config import BuildConfig
from realfake.privacy.config import CopyDetectionConfig, LiraConfig, ShadowFamily
from realfake.redact import redacting_errors
from tasks.child_runs import require_deployment
from tasks.gpu import ensure_gpu_limit, visible_gpus
from tasks.privacy import (
    copy_detection_task,
    pending_shadows_task,
    plan_lira_task,
    publish_copy_report,
    publish_lira_report,
    require_lira_plan,
    run_shadow_deployment,
    score_lira_task,
    shadow_label,
    shadow_task,
)

__all__ = ["PrivacyParams", "ShadowFanoutParams", "ShadowRunParams", "privacy_flow", "privacy_shadows_flow",
           "run_lira_fanout"]


class ShadowFanoutParams(BaseModel):
    """Where the LiRA shadow pipelines run: in the audit's own run, or as child runs on the GPU pool."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["local", "deployment"] = Field(
        "local",
        description="local: every shadow is a task of this flow run; with several GPUs on the node each shadow "
        "trains in a process of its own pinned round robin to one of them (one per GPU at a time), else the "
        "shadows train one after the other in this process (they share its random generators); deployment: each "
        "batch of shadows is a child flow run of the shadow deployment, picked up by a worker of that "
        "deployment's pool (one pod per batch).",
    )
    deployment: str = Field(
        "privacy-shadows/privacy-shadows",
        description="Deployment ('flow name/deployment name') that trains one batch of shadows in deployment mode.",
    )
    shadows_per_run: int = Field(
        1, ge=1, le=1024,
        description="Shadows of one family per child run in deployment mode; they train one after the other "
        "in its pod, so more per run means fewer pod starts and less parallelism.",
    )


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
    fanout: ShadowFanoutParams = Field(
        default_factory=ShadowFanoutParams, description="Where the shadow pipelines run: locally or as child runs.",
    )


class ShadowRunParams(ConfigParams):
    """Parameters of one batch of shadows (a child run): train these shadows of one family, skip finished ones."""

    lira: LiraConfig = Field(default_factory=LiraConfig, description="The parent's LiRA settings (they draw the "
                             "halves, so they must be the ones its plan was written with).")
    family: ShadowFamily = Field("real", description="Shadow family: classifiers on real halves, or on the "
                                 "synthetic data built from each half.")
    shadows: list[int] = Field(
        default_factory=list, description="Indices of the shadows to train, one after the other (empty: all "
        "lira.n_shadows of the family).",
    )
    gpu_limit: str = Field("realfake-gpu", description="Global concurrency limit each shadow holds one slot of.")

    @model_validator(mode="after")
    def _shadows_in_plan(self) -> ShadowRunParams:
        bad = [i for i in self.shadows if not 0 <= i < self.lira.n_shadows]
        if bad:
            raise ValueError(f"shadows {bad} are outside 0..{self.lira.n_shadows - 1} (lira.n_shadows)")
        if len(set(self.shadows)) != len(self.shadows):
            raise ValueError(f"shadows {self.shadows} name a shadow twice")
        return self


def _committed_synthetic(cfg: BuildConfig) -> int:
    from realfake.build import store_of
    from realfake.data.shards import committed_shards

    return sum(c.count for c in committed_shards(store_of(cfg)))


def _wait_all(futures: list[tuple[str | None, Any]], cfg: BuildConfig) -> list[Any]:
    """Results of every ``(label, future)``; when some failed, one error naming each failed shadow (batch).

    ``label`` names the shadow of a local task; a child run's error names its shadows itself (label None).
    """
    results, failures = [], []
    for label, f in futures:
        try:
            results.append(f.result())
        except Exception as e:
            failures.append((label, e))
    if failures:
        raise RuntimeError(
            f"privacy audit of {cfg.dataset}/{cfg.version}: {len(failures)} shadow run(s) failed (finished shadows "
            "keep their logits and are skipped on a re-run):\n"
            + "\n".join(f"- {label}: {type(e).__name__}: {e}" if label else f"- {e}" for label, e in failures)
        ) from failures[0][1]
    return results


def run_lira_fanout(cfg: BuildConfig, lira: LiraConfig, gpu_limit: str, fanout: ShadowFanoutParams | None = None,
                    pinned: dict | None = None) -> dict:
    """Plan, run every shadow of every family in parallel (tasks or child runs), then score.

    Must be called inside a flow run. ``pinned`` are the parameters that reproduce ``cfg`` in a child run
    (:meth:`flows.params.ConfigParams.pinned`); needed in deployment mode only.
    """
    fanout = fanout or ShadowFanoutParams()
    plan_lira_task(cfg, lira)
    futures = []
    if fanout.mode == "deployment":
        if pinned is None:
            raise ValueError("run_lira_fanout: deployment mode needs `pinned`, the parameters that reproduce cfg")
        pending = pending_shadows_task(cfg, lira)
        k = fanout.shadows_per_run
        for family, indices in pending.items():
            for batch in (indices[j:j + k] for j in range(0, len(indices), k)):
                params = ShadowRunParams(**pinned, lira=lira, family=family, shadows=batch, gpu_limit=gpu_limit)
                sent = {"params": params.model_dump(mode="json", exclude_none=True)}  # None: keep the preset
                futures.append((None, run_shadow_deployment.submit(fanout.deployment, sent, cfg, family, batch)))
        skipped = {f: sorted(set(range(lira.n_shadows)) - set(v)) for f, v in pending.items()}
    else:
        # Shadows in this process train one at a time (they seed its random generators). With several GPUs, each
        # shadow runs in a process of its own pinned round robin to one GPU, one process per GPU at a time, and
        # the concurrency limit bounds how many run in all.
        gpus = visible_gpus() if cfg.device != "cpu" else []
        for family in lira.families:
            for i in range(lira.n_shadows):
                gpu = gpus[len(futures) % len(gpus)] if len(gpus) > 1 else None
                futures.append((shadow_label(family, [i]), shadow_task(family).submit(cfg, lira, i, gpu_limit, gpu)))
        skipped = None  # each task reports its own skip
    shadows = _wait_all(futures, cfg)
    return score_lira_task(cfg, lira) | {"shadow_runs": shadows, "fanout": {"mode": fanout.mode, "skipped": skipped}}


@flow(name="privacy-audit", log_prints=True, persist_result=True)
@redacting_errors
def privacy_flow(params: PrivacyParams = PrivacyParams()) -> dict:
    """Audit a dataset version for privacy: LiRA membership inference and copy detection."""
    from realfake.preflight import preflight

    log = get_run_logger()
    cfg = params.to_config()
    # LiRA's shadows run whole builds (fine-tune, synthesize, train) here or on the GPU pool; copy detection reads
    # the version under the root
    remote = ("device",) if params.lira_enabled and params.fanout.mode == "deployment" else ()
    preflight(cfg, stage="build" if params.lira_enabled else "finalize", skip=remote)
    if params.copy_enabled and not _committed_synthetic(cfg):
        # Fail before hours of shadow training, not after.
        raise FileNotFoundError(
            f"copy detection: {cfg.root}/{cfg.dataset}/{cfg.version} has no committed synthetic images; build "
            "the version first (build flow) or set copy_enabled=false"
        )
    if params.lira_enabled and params.fanout.mode == "deployment":
        require_deployment(params.fanout.deployment, "fanout.deployment")
    ensure_gpu_limit(params.gpu_limit, len(visible_gpus()) or 1)
    out: dict = {"dataset": cfg.dataset, "version": cfg.version}
    if params.lira_enabled:
        lira = run_lira_fanout(cfg, params.lira, params.gpu_limit, params.fanout, params.pinned(cfg))
        publish_lira_report(lira, cfg.dataset, cfg.version)
        out["lira"] = {k: lira[k] for k in ("table", "metrics", "shadow_test_top1", "files", "fanout")}
    if params.copy_enabled:
        copy = copy_detection_task(cfg, params.copy_detection, params.gpu_limit)
        publish_copy_report(copy, cfg.dataset, cfg.version)
        out["copy"] = copy
    log.info("privacy audit of %s/%s done: %s", cfg.dataset, cfg.version, ", ".join(k for k in out if k in
                                                                                   ("lira", "copy")) or "nothing")
    return out


@flow(name="privacy-shadows", log_prints=True, persist_result=True)
@redacting_errors
def privacy_shadows_flow(params: ShadowRunParams = ShadowRunParams()) -> dict:
    """Child run: train a batch of LiRA shadows of one family and store their logits (finished ones are skipped)."""
    from realfake.preflight import preflight

    cfg = params.to_config()
    preflight(cfg)  # a shadow is a whole build on its half of the data
    require_lira_plan(cfg, params.lira)
    indices = list(params.shadows) or list(range(params.lira.n_shadows))
    ensure_gpu_limit(params.gpu_limit, len(visible_gpus()) or 1)
    task = shadow_task(params.family)
    # A pod sees its own GPU(s); the shadows run one after the other on them, each holding one GPU slot.
    results = []
    for i in indices:
        try:
            results.append(task(cfg, params.lira, i, params.gpu_limit))
        except Exception as e:
            # The parent's message names the whole batch; this names the shadow of it that failed.
            raise RuntimeError(f"{shadow_label(params.family, [i])} of {cfg.dataset}/{cfg.version}: "
                               f"{type(e).__name__}: {e}") from e
    get_run_logger().info("%s of %s/%s done", shadow_label(params.family, indices), cfg.dataset, cfg.version)
    return {"family": params.family, "shadows": results, "devices": visible_gpus()}


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shadows", type=int, default=16, help="Shadow pipelines per family (paper: 16).")
    p.add_argument("--no-lira", action="store_true", help="Skip membership inference.")
    p.add_argument("--no-copy", action="store_true", help="Skip copy detection.")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.privacy --preset demo --shadows 4 [--set a.b=c ...]``"""
    def fields(a: argparse.Namespace) -> dict:
        return {"lira": LiraConfig(n_shadows=a.shadows), "lira_enabled": not a.no_lira, "copy_enabled": not a.no_copy}

    def show(out: dict) -> None:
        if "lira" in out:
            print(out["lira"]["table"])

    return flow_main(argv, "python -m flows.privacy", privacy_flow, PrivacyParams, options=_options, fields=fields,
                     show=show)


if __name__ == "__main__":
    sys.exit(main())
