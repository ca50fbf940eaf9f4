"""Child flow runs of a deployment: check the deployment is registered, run one until its work is done, and name
what it was for.

A parent that fans GPU work out across nodes starts one child flow run per unit of work (a shard group, a
batch of LiRA shadows) of a deployment on the GPU pool and waits for it. What the parent needs on top of
:func:`prefect.deployments.run_deployment`: a missing deployment reported before any work starts; a child that was
*lost* (its node preempted, its pod evicted, its process killed: the lost-run automation of :mod:`tasks.lost_runs`
marks it Crashed within minutes) re-submitted, up to :data:`LOST_ATTEMPTS` runs, the new run resuming where the
lost one stopped (committed shards, stored logits and checkpoints are skipped); a child Running past its deadline
treated as lost (cancelled, then re-submitted), so the parent never waits forever; and a child that *failed* (its
own code raised; transient faults are retried inside it) turned into an error that says which unit of work it
carried, which child run it was and how it ended. While a parent waits, :func:`waiting_lines` says which child
it waits on, in which state, and for how long (the progress artifact shows it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, Crashed

from tasks.lost_runs import LOST_ATTEMPTS, ensure_lost_run_detection_once

__all__ = [
    "CANCEL_GRACE_SECONDS",
    "GROUP_DEADLINE_SLACK",
    "GROUP_START_SECONDS",
    "LOST_ATTEMPTS",
    "UNMEASURED_GROUP_DEADLINE_SECONDS",
    "ChildRunFailed",
    "ChildRunLost",
    "group_deadline",
    "finetune_deadline",
    "finetune_deadlines",
    "group_deadlines",
    "measure_deadline",
    "require_deployment",
    "retry_on_lost_child",
    "run_child_deployment",
    "waiting_lines",
]

log = logging.getLogger("realfake.child_runs")

# Deadline of a group: start-up allowance + slack x the plan's generation time of its images. Start-up: a pod
# scheduled, the image pulled and SD v1.5 loaded, which took minutes on a cold node (ours: 10 minutes covers a
# 15 GB image pull at 25 MB/s plus the model load). Slack 10: the plan's rate is measured on an H200
# (benchmarks/results/gpu_synthesis_*.json); a slower card, a shared node or a cold cache must not be taken
# for a lost one, and a parent that waits 10x the plan still waits a bounded time.
GROUP_START_SECONDS = 600.0
GROUP_DEADLINE_SLACK = 10.0
# No measured rate for this configuration (a demo or tiny model, another resolution): a bound, not an estimate
# (ours: 6 h, longer than any single-GPU group of a shipped preset at the plan's rates). Lost nodes are found by
# their heartbeats within minutes; this only ends a wait on a run that hangs while it heartbeats.
UNMEASURED_GROUP_DEADLINE_SECONDS = 6 * 3600.0
# How long a child past its deadline gets to confirm its cancellation (its worker kills the process and reports
# Cancelled) before the parent marks it Crashed itself: a worker polls for cancellations every
# PREFECT_WORKER_QUERY_SECONDS (10 s by default); 60 s leaves a loaded API time to answer.
CANCEL_GRACE_SECONDS = 60.0


class ChildRunFailed(RuntimeError):
    """A child flow run ended in a state other than Completed (its message names the work and the run)."""


class ChildRunLost(ChildRunFailed):
    """A child flow run crashed: its infrastructure (pod, process) went away before it finished."""


def require_deployment(name: str, field: str) -> None:
    """Fail before any work when deployment ``name`` ('flow name/deployment name') is not registered.

    Raises:
        ValueError: the deployment is unknown; the message names the parameter ``field`` that chose it.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(
                f"{field}: deployment {name!r} is not registered on {client.api_url}; register it with "
                "`prefect deploy --all --prefect-file deployments/prefect.yaml` or name a registered one "
                "('flow name/deployment name')"
            ) from None


def group_deadline(cfg: Any, shard_names: list[str], waves: int = 1) -> tuple[float, str]:
    """Seconds a Running child of this shard group may take before it is treated as lost, and where they come from.

    From the plan: :data:`GROUP_START_SECONDS` + :data:`GROUP_DEADLINE_SLACK` x ``waves`` x the group's images (its
    shards at ``shards.max_count``) at the measured generation rate of ``cfg`` (:func:`realfake.plan.generation_rate`);
    :data:`UNMEASURED_GROUP_DEADLINE_SECONDS` when this configuration has no measured rate. ``waves``: groups run
    that many rounds on the GPU limit's slots, and a child waits for its slot while Running.
    """
    from realfake.plan import generation_rate

    return _deadline(len(shard_names) * cfg.shards.max_count, "images", generation_rate(cfg), waves)


def _deadline(units: int, unit: str, rate: dict, waves: int) -> tuple[float, str]:
    """The deadline formula of :func:`group_deadline` and :func:`finetune_deadline`: ``units`` of work (``unit``:
    images, fine-tuning samples) at ``rate`` (``realfake.plan``'s measured rate, or why there is none)."""
    if "per_s" not in rate:
        return UNMEASURED_GROUP_DEADLINE_SECONDS, f"no measured rate ({rate.get('missing', 'not measured')})"
    seconds = GROUP_START_SECONDS + GROUP_DEADLINE_SLACK * max(1, waves) * units / rate["per_s"]
    return seconds, (f"{GROUP_START_SECONDS:.0f} s start-up + {GROUP_DEADLINE_SLACK:g} x {max(1, waves)} wave(s) x "
                     f"{units} {unit} at {rate['per_s']:.3g} {unit.rsplit(' ', 1)[-1]}/s ({rate['file']})")


def group_deadlines(cfg: Any, groups: list[list[str]], gpu_limit: str) -> list[float]:
    """:func:`group_deadline` of each shard group of a fan-out (waves from the GPU limit's slots); logs the source."""
    from tasks.gpu import gpu_slots

    waves = -(-len(groups) // max(1, gpu_slots(gpu_limit)))
    out = [group_deadline(cfg, g, waves) for g in groups]
    if out:
        _logger().info("each shard group is treated as lost after %.0f s Running at most: %s",
                       max(s for s, _ in out), out[0][1])
    return [s for s, _ in out]


def finetune_deadline(cfg: Any, images: list[int], waves: int = 1) -> tuple[float, str]:
    """Seconds a Running child training one lane of adapters may take before it is treated as lost, and their source.

    ``images``: the training images of each adapter of the lane (they train one after another). From the plan:
    :data:`GROUP_START_SECONDS` + :data:`GROUP_DEADLINE_SLACK` x ``waves`` x the lane's fine-tuning samples
    (:func:`realfake.finetune.training_schedule` of each adapter) at the measured fine-tuning rate of ``cfg``
    (:func:`realfake.plan.finetune_rate`); :data:`UNMEASURED_GROUP_DEADLINE_SECONDS` when it has none. A child
    treated as lost is re-submitted and resumes from its adapters' committed checkpoints.

    Raises:
        ValueError: the fine-tune schedule cannot be made (one line naming the ``finetune`` fields).
    """
    from realfake.finetune import training_schedule
    from realfake.plan import finetune_rate

    samples = sum(training_schedule(cfg.finetune, n).samples for n in images if n)
    return _deadline(samples, "fine-tuning samples", finetune_rate(cfg), waves)


def finetune_deadlines(cfg: Any, lanes: list[list[str]], images: dict[str, int], gpu_limit: str) -> list[float]:
    """:func:`finetune_deadline` of each lane of adapter scopes (``images``: scope -> its training images; waves
    from the GPU limit's slots); logs the source."""
    from tasks.gpu import gpu_slots

    waves = -(-len(lanes) // max(1, gpu_slots(gpu_limit)))
    out = [finetune_deadline(cfg, [images.get(s, 0) for s in lane], waves) for lane in lanes]
    if out:
        _logger().info("each fine-tune lane is treated as lost after %.0f s Running at most: %s",
                       max(s for s, _ in out), out[0][1])
    return [s for s, _ in out]


def measure_deadline(configs: dict[str, Any]) -> tuple[float, str]:
    """Seconds a Running child measuring ``configs`` (name -> config, the build's first) may take before it is
    treated as lost, and their source.

    From the plan: :data:`GROUP_START_SECONDS` + :data:`GROUP_DEADLINE_SLACK` x the classifier's image passes (its
    epochs over the real training images, then over each version's planned synthetic images, at
    ``synthesis.images_per_real`` per real one) at :func:`realfake.plan.classifier_rate`, a published ResNet-50
    rate (none of ours is measured); :data:`UNMEASURED_GROUP_DEADLINE_SECONDS` on a CPU device.
    """
    from realfake.build import store_of
    from realfake.data.manifest import read_manifest
    from realfake.plan import classifier_rate

    first = next(iter(configs.values()))
    real = len(read_manifest(store_of(first), "train"))
    images = real + sum(real * c.synthesis.images_per_real for c in configs.values())
    return _deadline(first.classifier.epochs * images, "image passes", classifier_rate(first), 1)


# --------------------------------------------------------------------------------------------------------------
# What each parent is waiting on, for its progress artifact
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Wait:
    what: str
    attempt: int
    run_name: str = ""
    state: str = "SCHEDULED"
    since: float = field(default_factory=time.monotonic)
    lost: int = 0
    deadline_at: float | None = None


_WAITING: dict[str, dict[str, _Wait]] = {}
_WAITING_LOCK = threading.Lock()


def _parent_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _minutes(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def waiting_lines(parent_flow_run_id: str | None = None) -> list[str]:
    """One line per child the parent flow run is waiting on: the work, the child run, its state and since when.

    ``parent_flow_run_id`` None: the current flow run. Children that completed are not listed.
    """
    parent = parent_flow_run_id if parent_flow_run_id is not None else _parent_id()
    now = time.monotonic()
    with _WAITING_LOCK:
        waits = list(_WAITING.get(parent, {}).values())
    lines = []
    for w in sorted(waits, key=lambda w: w.what):
        state = {"SCHEDULED": "waiting for a worker", "PENDING": "starting on a worker",
                 "RUNNING": "running"}.get(w.state, w.state.lower())
        line = f"{w.what}: child run {w.run_name or '(being created)'} {state} for {_minutes(now - w.since)}"
        if w.lost:
            line += f", run {w.attempt} of {LOST_ATTEMPTS} ({w.lost} lost before)"
        if w.deadline_at is not None and w.state == "RUNNING":
            line += f", treated as lost in {_minutes(w.deadline_at - now)}"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------------------------
# Running a child until its work is done
# --------------------------------------------------------------------------------------------------------------
def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    return get_run_logger() if FlowRunContext.get() or TaskRunContext.get() else log


def _wait_for_child(run: FlowRun, wait: _Wait, deadline_s: float | None, poll_s: float) -> FlowRun:
    """Poll the child until it is final; one Running past ``deadline_s`` is cancelled, then crashed if its worker
    does not confirm. Returns the child as it ended."""
    running_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                return run
            kind = state.type.value if state is not None else "SCHEDULED"
            if kind != wait.state:
                wait.state, wait.since = kind, time.monotonic()
            if kind == "RUNNING" and running_since is None:
                running_since = time.monotonic()
                wait.deadline_at = running_since + deadline_s if deadline_s is not None else None
            if kind == "RUNNING" and deadline_s is not None and time.monotonic() - running_since > deadline_s:
                return _end_overdue(client, run, wait.what, deadline_s, poll_s)
            time.sleep(poll_s)


def _end_overdue(client: Any, run: FlowRun, what: str, deadline_s: float, poll_s: float) -> FlowRun:
    message = (f"{what}: no result within its deadline of {deadline_s:.0f} s (derived from the plan); treated as "
               "lost and re-submitted by its parent")
    _logger().warning("%s: child run %s (%s) is past its deadline of %.0f s: cancelling it", what, run.name, run.id,
                      deadline_s)
    client.set_flow_run_state(run.id, Cancelling(message=message), force=True)
    end = time.monotonic() + CANCEL_GRACE_SECONDS
    while time.monotonic() < end:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            break
        time.sleep(min(poll_s, 5.0))
    else:  # no worker confirmed: its node is gone with it
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    run = client.read_flow_run(run.id)
    # Whatever it ended as, the parent treats it as lost (a Cancelled state here is the parent's own doing).
    run.state = Crashed(message=message) if run.state is None or not run.state.is_crashed() else run.state
    return run


def run_child_deployment(deployment: str, parameters: dict[str, Any], what: str,
                         flow_run_name: str | None = None, *, deadline_s: float | None = None,
                         attempts: int = LOST_ATTEMPTS, poll_s: float = 5.0) -> FlowRun:
    """Start a child flow run of ``deployment``, wait until it ends, re-submit it while it is lost; return the run
    that completed.

    Call inside a task or flow: each child is linked to it as a subflow, so the UI shows them under the parent.
    A child that crashed (its process or node was lost; see :mod:`tasks.lost_runs`) or ran past ``deadline_s``
    is started again with the same parameters, at most ``attempts`` runs in all; the new run resumes (its work
    skips what the lost one committed).

    Args:
        deployment: 'flow name/deployment name'.
        parameters: the child's flow parameters.
        what: the unit of work, for messages (e.g. ``"privacy audit of mini/v1, real shadows 0, 1"``).
        flow_run_name: name of the child run (None: Prefect's generated one); a re-submission adds ``-run-N``.
        deadline_s: seconds a child may be Running before it is treated as lost (None: no deadline).
        attempts: runs of this unit of work at most, the first included.
        poll_s: seconds between two reads of the child's state.

    Raises:
        ChildRunLost: the child was lost ``attempts`` times.
        ChildRunFailed: the child failed or was cancelled (not by this parent); the message carries the child's
            own message.
    """
    ensure_lost_run_detection_once()
    parent = _parent_id()
    wait = _Wait(what, 1)
    with _WAITING_LOCK:
        _WAITING.setdefault(parent, {})[what] = wait
    try:
        for attempt in range(1, max(1, attempts) + 1):
            wait.attempt, wait.state, wait.since, wait.deadline_at, wait.run_name = \
                attempt, "SCHEDULED", time.monotonic(), None, ""
            name = flow_run_name if attempt == 1 or flow_run_name is None else f"{flow_run_name}-run-{attempt}"
            run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=True, flow_run_name=name)
            wait.run_name = run.name
            run = _wait_for_child(run, wait, deadline_s, poll_s)
            state = run.state
            if state is not None and state.is_completed():
                return run
            ended = f"ended {state.type.value}: {state.message or 'no message'}" if state else "ended without a state"
            lost = state is not None and state.is_crashed()
            message = f"{what}: child flow run {run.name} ({run.id}) of deployment {deployment} {ended}"
            if not lost:
                raise ChildRunFailed(message)
            wait.lost += 1
            if attempt < attempts:
                _logger().warning("%s; re-submitting (run %d of %d), resuming where it stopped", message,
                                  attempt + 1, attempts)
                continue
            raise ChildRunLost(f"{message} (lost {wait.lost} times in a row; see the GPU pool's nodes)")
        raise AssertionError("unreachable")
    finally:
        with _WAITING_LOCK:
            _WAITING.get(parent, {}).pop(what, None)
            if not _WAITING.get(parent):
                _WAITING.pop(parent, None)


def retry_on_lost_child(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when its child run was lost, not when it failed."""
    try:
        state.result()
    except ChildRunLost:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is the child's own and would repeat
        return False
    return False
