"""Prefect tasks of the privacy audits: thin wrappers of :mod:`realfake.privacy.audit`, and their artifacts.

Each shadow pipeline is one task holding one slot of the GPU global concurrency limit, so the flow can submit
all of them and the limit decides how many run at once. Shadows seed process-wide random generators, so those
that run in this process train one at a time (:mod:`realfake.privacy.audit`); with several GPUs on the node each
shadow instead runs in a process of its own pinned to one of them, one process per GPU at a time
(:func:`run_shadow_process`), so the GPUs train shadows in parallel and each shadow trains as it would alone.
Across nodes the same tasks run inside child flow runs of the ``privacy-shadows`` deployment, one batch of
shadows each (:func:`run_shadow_deployment`).
Shadows store their logits next to the version and skip themselves when logits of the same recipe and half
exist, so a retried task or a re-run flow resumes instead of retraining; :func:`pending_shadows_task` makes the
same check up front so a re-run does not start child runs for finished shadows. The library is imported
inside the tasks so that serving the flow does not load torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.logging import get_logger

from realfake.config import BuildConfig
from realfake.privacy.config import CopyDetectionConfig, LiraConfig
from realfake.redact import redacting_errors
from tasks.artifacts import artifact_key, browser_url, create_link_artifact, create_markdown_artifact
from tasks.cache import TRANSIENT_RETRY
from tasks.child_runs import retry_on_lost_child, run_child_deployment
from tasks.gpu import gpu_slot

__all__ = [
    "copy_detection_task",
    "pending_shadows_task",
    "plan_lira_task",
    "publish_copy_report",
    "publish_lira_report",
    "real_shadow_task",
    "require_lira_plan",
    "run_shadow_deployment",
    "run_shadow_process",
    "score_lira_task",
    "shadow_label",
    "shadow_task",
    "synthetic_shadow_task",
]

log = get_logger("realfake.privacy")
_GPU_LOCKS: dict[str, threading.RLock] = {}
_GPU_LOCKS_GUARD = threading.Lock()


def _audit() -> Any:
    from realfake.privacy import audit

    return audit


@contextmanager
def _one_per_gpu(gpu: str, what: str) -> Iterator[None]:
    """Hold GPU ``gpu``'s lock of this process for the block (one shadow process per GPU; reentrant)."""
    with _GPU_LOCKS_GUARD:
        lock = _GPU_LOCKS.setdefault(gpu, threading.RLock())
    if not lock.acquire(blocking=False):
        log.info("%s waits for GPU %s (one shadow per GPU at a time)", what, gpu)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _turn(family: str, index: int, gpu: str | None) -> Any:
    """The local turn a shadow waits for before it takes a GPU slot, so a waiting shadow holds no slot of the
    cluster-wide limit: this process's shadow lock, or with ``gpu`` that GPU's."""
    what = shadow_label(family, [index])
    return _audit().one_shadow_at_a_time(what) if gpu is None else _one_per_gpu(gpu, what)


def run_shadow_process(family: str, cfg: BuildConfig, lira: LiraConfig, index: int, gpu: str,
                       on_line: Callable[[str], Any] | None = None) -> dict:
    """Run shadow ``index`` of ``family`` in a process of its own that sees only GPU ``gpu``; return its result.

    The process (``python -m realfake.privacy.audit``) gets ``CUDA_VISIBLE_DEVICES=gpu`` and a config whose CUDA
    ``device`` is its one GPU; one such process per GPU runs at a time (memory), whatever the concurrency limit
    allows. It is attached (:func:`realfake.procs.attached_process`): it ends when this process ends or this
    call is interrupted.

    Args:
        on_line: Receives each line of the process's output (default: this module's logger).

    Raises:
        RuntimeError: the process failed; the message carries the tail of its output.
    """
    from realfake.procs import attached_process

    shadow_cfg = cfg.model_copy(update={"device": "cuda:0"}) if cfg.device.startswith("cuda") else cfg
    what = shadow_label(family, [index])
    with _one_per_gpu(gpu, what), tempfile.TemporaryDirectory(prefix="realfake-shadow-") as tmp:
        cfg_path, lira_path, out_path = Path(tmp, "config.json"), Path(tmp, "lira.json"), Path(tmp, "result.json")
        cfg_path.write_text(shadow_cfg.model_dump_json())
        lira_path.write_text(lira.model_dump_json())
        cmd = [sys.executable, "-m", "realfake.privacy.audit", family, str(index), str(cfg_path), str(lira_path),
               str(out_path)]
        log.info("%s on GPU %s in a process of its own", what, gpu)
        tail: deque[str] = deque(maxlen=60)
        # Same working directory as this process, so a relative storage root names the same folder.
        with attached_process(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                (on_line or log.info)(line.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(f"{what} on GPU {gpu} exited {proc.returncode}:\n{''.join(tail)[-4000:]}")
        return json.loads(out_path.read_text())


def _run_shadow(family: str, cfg: BuildConfig, lira: LiraConfig, index: int, gpu: str | None) -> dict:
    """One shadow: in this process (one at a time), or with ``gpu`` in a process of its own on that GPU."""
    if gpu is None:
        return _audit().SHADOW_RUNNERS[family](cfg, lira, index)
    return run_shadow_process(family, cfg, lira, index, gpu, on_line=get_run_logger().info)


def _shadow_in_turn(family: str, cfg: BuildConfig, lira: LiraConfig, index: int, gpu_limit: str,
                    gpu: str | None) -> dict:
    """One shadow of ``family``: its local turn first, then one slot of ``gpu_limit``; a failure names the shadow."""
    with _turn(family, index, gpu), gpu_slot(gpu_limit):
        try:
            return _run_shadow(family, cfg, lira, index, gpu)
        except Exception as e:
            _name_the_shadow(e, cfg, family, index)
            raise


def _name_the_shadow(e: Exception, cfg: BuildConfig, family: str, index: int) -> None:
    # Name the shadow in the run's log and as a note on the traceback without changing the exception's type,
    # so the retry condition still tells a transient fault from a bad recipe.
    where = f"privacy audit of {cfg.dataset}/{cfg.version}, {family} shadow {index}"
    get_run_logger().error("%s failed: %s: %s", where, type(e).__name__, e)
    e.add_note(where)


@task(name="privacy-plan", tags=["realfake", "cpu"], **TRANSIENT_RETRY)
@redacting_errors
def plan_lira_task(cfg: BuildConfig, lira: LiraConfig) -> dict:
    """Prepare the version if needed and write the shadow membership of its real training set."""
    plan = _audit().plan_lira(cfg, lira)
    get_run_logger().info("LiRA plan for %s/%s: %d shadows x %s over %d training images", cfg.dataset,
                          cfg.version, plan["n_shadows"], plan["families"], plan["n_train"])
    return plan


@task(name="privacy-real-shadow", task_run_name="real-shadow-{index}", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
@redacting_errors
def real_shadow_task(cfg: BuildConfig, lira: LiraConfig, index: int, gpu_limit: str = "realfake-gpu",
                     gpu: str | None = None) -> dict:
    """Train real shadow ``index`` on its half of the real training set, holding one GPU slot.

    With ``gpu`` (a CUDA device id of this node) it trains in a process of its own pinned to that GPU.
    """
    result = _shadow_in_turn("real", cfg, lira, index, gpu_limit, gpu)
    get_run_logger().info("real shadow %d: test top-1 %.3f%s", index, result["test_top1"],
                          " (stored logits reused)" if result["skipped"] else "")
    return result


@task(name="privacy-synthetic-shadow", task_run_name="synthetic-shadow-{index}", tags=["realfake", "gpu"],
      **TRANSIENT_RETRY)
@redacting_errors
def synthetic_shadow_task(cfg: BuildConfig, lira: LiraConfig, index: int, gpu_limit: str = "realfake-gpu",
                          gpu: str | None = None) -> dict:
    """Build synthetic shadow version ``index`` (fine-tune, synthesize on its half) and train its classifier.

    With ``gpu`` (a CUDA device id of this node) it runs in a process of its own pinned to that GPU.
    """
    result = _shadow_in_turn("synthetic", cfg, lira, index, gpu_limit, gpu)
    get_run_logger().info("synthetic shadow %d: %s synthetic images, test top-1 %.3f%s", index,
                          result.get("synthetic_images"), result["test_top1"],
                          " (stored logits reused)" if result["skipped"] else "")
    return result


def shadow_task(family: str) -> Any:
    """The task that runs one shadow pipeline of ``family`` (``real`` or ``synthetic``)."""
    tasks = {"real": real_shadow_task, "synthetic": synthetic_shadow_task}
    if family not in tasks:
        raise ValueError(f"unknown shadow family {family!r}; expected one of {sorted(tasks)}")
    return tasks[family]


def shadow_label(family: str, indices: list[int]) -> str:
    """``real shadow 3`` or ``synthetic shadows 0, 1``: how messages name a batch of shadows."""
    return f"{family} shadow{'s' if len(indices) > 1 else ''} {', '.join(str(i) for i in indices)}"


def require_lira_plan(cfg: BuildConfig, lira: LiraConfig) -> dict:
    """The stored LiRA plan of ``cfg``'s version, checked against ``lira``; for runs that train shadows only.

    A child run trains shadows of a plan its parent wrote; without the plan (or with one drawn under other
    settings) its halves would not be the ones the parent scores.

    Raises:
        FileNotFoundError: no ``runs/privacy-lira/plan.json`` (run the privacy-audit flow, which plans first).
        ValueError: the plan was drawn with other ``lira`` settings; the message names them.
    """
    from realfake.build import store_of

    audit = _audit()
    run = store_of(cfg).child(*audit.LIRA_RUN)
    if not run.exists("plan.json"):
        raise FileNotFoundError(
            f"{run.uri('plan.json')}: no LiRA plan for this version; the privacy-audit flow writes it before it "
            "starts shadows (run that flow, not the shadow flow alone)"
        )
    plan = run.read_json("plan.json")
    wrong = {k: (plan.get(k), getattr(lira, k)) for k in ("n_shadows", "split_seed", "paired")
             if plan.get(k) != getattr(lira, k)}
    if wrong:
        raise ValueError(
            f"{run.uri('plan.json')} was drawn with other LiRA settings than this run's: "
            + ", ".join(f"lira.{k} {p!r} in the plan, {v!r} here" for k, (p, v) in wrong.items())
        )
    return plan


@task(name="privacy-pending-shadows", tags=["realfake", "cpu"], **TRANSIENT_RETRY)
@redacting_errors
def pending_shadows_task(cfg: BuildConfig, lira: LiraConfig) -> dict[str, list[int]]:
    """Family -> indices of the shadows that have no stored logits of this recipe and half yet.

    The same test the shadow pipelines make before training (logits stored under the shadow's fingerprint),
    made up front so that a re-run starts no child run for a finished shadow.
    """
    import numpy as np

    from realfake.build import store_of

    audit = _audit()
    samples, mask = audit.shadow_membership(cfg, lira)
    ids = [s.sample_id for s in samples]
    run = store_of(cfg).child(*audit.LIRA_RUN)
    pending: dict[str, list[int]] = {}
    for family in lira.families:
        pending[family] = []
        for i in range(lira.n_shadows):
            members = [ids[j] for j in np.flatnonzero(mask[i])]
            key = audit._shadow_key(audit.shadow_config(cfg, i), family, i, members, ids)
            if audit._load_logits(run, family, i, key) is None:
                pending[family].append(i)
    done = {f: lira.n_shadows - len(v) for f, v in pending.items()}
    get_run_logger().info("LiRA shadows of %s/%s still to train: %s (finished: %s)", cfg.dataset, cfg.version,
                          pending, done)
    return pending


@task(name="privacy-shadow-run", task_run_name="child-{family}-{indices}", tags=["realfake"], retries=1,
      retry_delay_seconds=30, retry_condition_fn=retry_on_lost_child)
@redacting_errors
def run_shadow_deployment(deployment: str, parameters: dict, cfg: BuildConfig, family: str,
                          indices: list[int]) -> dict:
    """Run one batch of shadows as a child flow run of ``deployment`` and wait; fail naming the shadows.

    The shadow tasks inside the child retry transient faults; this task retries once more only for a child
    lost with its pod or process (a failed child would fail again).
    """
    what = f"privacy audit of {cfg.dataset}/{cfg.version}, {shadow_label(family, indices)}"
    run = run_child_deployment(deployment, parameters, what,
                               flow_run_name=f"{cfg.dataset}-{cfg.version}-{family}-shadow-"
                               + "-".join(str(i) for i in indices))
    get_run_logger().info("%s done in child flow run %s (%s)", shadow_label(family, indices), run.name, run.id)
    return {"family": family, "indices": list(indices), "flow_run_id": str(run.id), "flow_run_name": run.name}


@task(name="privacy-score-lira", tags=["realfake", "cpu"], **TRANSIENT_RETRY)
@redacting_errors
def score_lira_task(cfg: BuildConfig, lira: LiraConfig) -> dict:
    """Online and offline LiRA per family from the stored logits; writes the table and the ROC plot."""
    out = _audit().score_lira(cfg, lira)
    get_run_logger().info("LiRA results of %s/%s:\n%s", cfg.dataset, cfg.version, out["table"])
    return out


@task(name="privacy-copy-detection", tags=["realfake", "gpu"], **TRANSIENT_RETRY)
@redacting_errors
def copy_detection_task(cfg: BuildConfig, copy: CopyDetectionConfig, gpu_limit: str = "realfake-gpu") -> dict:
    """Embed synthetic and real training images and write the copy-detection report, holding one GPU slot."""
    with gpu_slot(gpu_limit):
        out = _audit().run_copy_detection(cfg, copy)
    get_run_logger().info("copy detection of %s/%s: %d/%d synthetic images at or above %.3f; %s", cfg.dataset,
                          cfg.version, out["n_above_threshold"], out["n_synthetic"], out["threshold"], out["note"])
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
        f"training images.\n\n**{result['note']}**\n\n"
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
