"""Prefect tasks of the privacy audits: thin wrappers of :mod:`realfake.privacy.audit`, and their artifacts.

Each shadow pipeline is one task holding one slot of the GPU global concurrency limit, so the flow can submit
all of them and the limit decides how many run at once; with several GPUs on the node each shadow is pinned to
one of them (round robin) through its config's ``device``. Shadows store their logits next to the version and
skip themselves when logits of the same recipe and half exist, so a retried task or a re-run flow resumes
instead of retraining. The library is imported inside the tasks so that serving the flow does not load torch.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.concurrency.sync import concurrency

from realfake.config import BuildConfig, CopyDetectionConfig, LiraConfig
from tasks.artifacts import artifact_key, browser_url
from tasks.cache import TRANSIENT_RETRY

__all__ = [
    "copy_detection_task",
    "plan_lira_task",
    "publish_copy_report",
    "publish_lira_report",
    "real_shadow_task",
    "score_lira_task",
    "synthetic_shadow_task",
]

def _audit() -> Any:
    from realfake.privacy import audit

    return audit


@task(name="privacy-plan", tags=["realfake", "cpu"], **TRANSIENT_RETRY)
def plan_lira_task(cfg: BuildConfig, lira: LiraConfig) -> dict:
    """Prepare the version if needed and write the shadow membership of its real training set."""
    plan = _audit().plan_lira(cfg, lira)
    get_run_logger().info("LiRA plan for %s/%s: %d shadows x %s over %d training images", cfg.dataset,
                          cfg.version, plan["n_shadows"], plan["families"], plan["n_train"])
    return plan


@task(name="privacy-real-shadow", task_run_name="real-shadow-{index}", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
def real_shadow_task(cfg: BuildConfig, lira: LiraConfig, index: int, gpu_limit: str = "realfake-gpu") -> dict:
    """Train real shadow ``index`` on its half of the real training set, holding one GPU slot."""
    with concurrency(gpu_limit, occupy=1):
        result = _audit().run_real_shadow(cfg, lira, index)
    get_run_logger().info("real shadow %d: test top-1 %.3f%s", index, result["test_top1"],
                          " (stored logits reused)" if result["skipped"] else "")
    return result


@task(name="privacy-synthetic-shadow", task_run_name="synthetic-shadow-{index}", tags=["realfake", "gpu"],
      **TRANSIENT_RETRY)
def synthetic_shadow_task(cfg: BuildConfig, lira: LiraConfig, index: int, gpu_limit: str = "realfake-gpu") -> dict:
    """Build synthetic shadow version ``index`` (fine-tune, synthesize on its half) and train its classifier."""
    with concurrency(gpu_limit, occupy=1):
        try:
            result = _audit().run_synthetic_shadow(cfg, lira, index)
        except Exception as e:
            raise RuntimeError(f"privacy audit, synthetic shadow {index} of {cfg.dataset}/{cfg.version}: {e}") from e
    get_run_logger().info("synthetic shadow %d: %s synthetic images, test top-1 %.3f%s", index,
                          result.get("synthetic_images"), result["test_top1"],
                          " (stored logits reused)" if result["skipped"] else "")
    return result


@task(name="privacy-score-lira", tags=["realfake", "cpu"], **TRANSIENT_RETRY)
def score_lira_task(cfg: BuildConfig, lira: LiraConfig) -> dict:
    """Online and offline LiRA per family from the stored logits; writes the table and the ROC plot."""
    out = _audit().score_lira(cfg, lira)
    get_run_logger().info("LiRA results of %s/%s:\n%s", cfg.dataset, cfg.version, out["table"])
    return out


@task(name="privacy-copy-detection", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
def copy_detection_task(cfg: BuildConfig, copy: CopyDetectionConfig, gpu_limit: str = "realfake-gpu") -> dict:
    """Embed synthetic and real training images and write the copy-detection report, holding one GPU slot."""
    with concurrency(gpu_limit, occupy=1):
        out = _audit().run_copy_detection(cfg, copy)
    get_run_logger().info("copy detection of %s/%s: %d/%d synthetic images at or above %.3f", cfg.dataset,
                          cfg.version, out["n_above_threshold"], out["n_synthetic"], out["threshold"])
    return out


def _links(files: dict[str, str], dataset: str, prefix: str, what: dict[str, str]) -> list[UUID]:
    ids = []
    for kind, text in what.items():
        if kind in files:
            ids.append(create_link_artifact(browser_url(files[kind]), link_text=text,
                                            key=artifact_key(dataset, prefix, kind), description=text))
    return ids


def publish_lira_report(result: dict, dataset: str, version: str) -> list[UUID]:
    """Markdown artifact with the LiRA table (ROC plot embedded), and link artifacts to its files."""
    files = result["files"]
    md = (f"## Membership inference (LiRA) on {dataset}/{version}\n\n{result['table']}\n"
          f"![log-log ROC]({browser_url(files['roc'])})\n\nFiles: " + ", ".join(f"`{v}`" for v in files.values()))
    ids = [create_markdown_artifact(md, key=artifact_key(dataset, "privacy-lira"),
                                    description=f"LiRA membership inference on {dataset}/{version}")]
    return ids + _links(files, dataset, "privacy-lira", {"roc": "LiRA log-log ROC (PNG)",
                                                         "results": "LiRA results (JSON)"})


def publish_copy_report(result: dict, dataset: str, version: str) -> list[UUID]:
    """Markdown artifact with the copy-detection summary and closest pairs, and links to its plots."""
    q = result["top1_quantiles"]
    rows = "\n".join(f"| {p['similarity']:.3f} | `{p['syn_id']}` | `{p['real_id']}` |"
                     for p in result["closest_pairs"][:10])
    files = result["files"]
    images = "".join(f"![{k}]({browser_url(files[k])})\n\n" for k in ("histogram", "closest_pairs") if k in files)
    md = (
        f"## Copy detection on {dataset}/{version}\n\n"
        f"Descriptor `{result['descriptor']}`, {result['n_synthetic']} synthetic vs {result['n_real']} real "
        f"training images.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| share at or above {result['threshold']:g} | {result['share_above_threshold']:.4f} "
        f"({result['n_above_threshold']}) |\n"
        f"| top-1 similarity median / p99 / max | {q['p50']:.3f} / {q['p99']:.3f} / {q['max']:.3f} |\n"
        f"| nearest real is the source image | {result['share_nearest_is_source']:.3f} "
        f"(chance {result['chance']:.4f}) |\n\n"
        f"Closest pairs:\n\n| similarity | synthetic | real |\n|---|---|---|\n{rows}\n\n{images}"
    )
    ids = [create_markdown_artifact(md, key=artifact_key(dataset, "privacy-copy"),
                                    description=f"Copy detection on {dataset}/{version}")]
    return ids + _links(files, dataset, "privacy-copy", {"histogram": "Copy similarity histogram (PNG)",
                                                         "closest_pairs": "Closest synthetic/real pairs (PNG)",
                                                         "summary": "Copy detection summary (JSON)"})
