"""Lost-run detection: a GPU flow run whose process is gone is marked Crashed within a bounded time, then re-run.

A preempted node takes its flow-run process with it, and nothing tells the server: the run stays Running. Prefect
3's documented remedy is a flow-run heartbeat (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) and a proactive automation
that crashes a run whose heartbeats stop ("How to detect and respond to zombie flows", docs.prefect.io). realfake
installs that automation itself (:func:`ensure_lost_run_detection`: idempotent; the fan-out parents call it, and
``python -m tasks.lost_runs`` installs it at deploy time) and scopes it to the deployments tagged
:data:`WATCH_TAG`, which set the heartbeat in their own job variables. The invariant a caller must keep: every run
that carries the tag heartbeats at least every :data:`HEARTBEAT_SECONDS`, or a healthy run of it is crashed; runs
without the tag (the ``build`` parent, a user's own flows, whatever their heartbeat) are never touched.

Who re-runs a crashed run: a child run's parent re-submits it (:func:`tasks.child_runs.run_child_deployment`). A
top-level one (a ``finetune``, ``measure`` or ``train-eval`` run started from the UI, the CLI or a schedule) has no
parent, so a second automation (:func:`rerun_automation`) starts the ``rerun-lost`` deployment on every crash of a
watched run; its flow (``flows/rerun_lost.py``) calls :func:`rerun_if_lost`, which puts a crashed top-level run back
to Scheduled (Prefect's ``AwaitingRetry``, what the UI's Retry does): a worker of its pool runs the same flow run
again, with its parameters, and it resumes from its checkpoints. At most :data:`LOST_ATTEMPTS` runs in all, as a
parent allows; children are left to their parent.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import timedelta
from functools import cache
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

__all__ = [
    "AUTOMATION_NAME",
    "CRASHED_MESSAGE",
    "HEARTBEAT_ENV",
    "HEARTBEAT_SECONDS",
    "LOST_AFTER_SECONDS",
    "LOST_ATTEMPTS",
    "RERUN_AUTOMATION_NAME",
    "RERUN_DEPLOYMENT",
    "MISSED_HEARTBEATS",
    "WATCH_TAG",
    "ensure_lost_run_detection",
    "ensure_lost_run_detection_once",
    "lost_run_automation",
    "main",
    "rerun_automation",
    "rerun_if_lost",
]

log = logging.getLogger("realfake.lost_runs")

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
# Prefect's smallest heartbeat period (prefect.flow_engine.MINIMUM_HEARTBEAT_INTERVAL; the setting is ge=30): a
# lost node is noticed as early as Prefect allows, and a heartbeat every 30 s is one small event per run.
HEARTBEAT_SECONDS = 30
# The window of Prefect's documented zombie automation (90 s at a 30 s heartbeat): two heartbeats may be late or
# lost (a loaded API, a reconnecting websocket) before a healthy run would be taken for a lost one.
MISSED_HEARTBEATS = 3
LOST_AFTER_SECONDS = HEARTBEAT_SECONDS * MISSED_HEARTBEATS
# Deployments whose runs set the heartbeat above (deployments/prefect.yaml: every GPU deployment); the automation
# matches this tag only, so a run that heartbeats at Prefect's default 180 s (the build parent) is never crashed.
WATCH_TAG = "heartbeat-watched"
AUTOMATION_NAME = "realfake: crash GPU runs whose heartbeats stopped"
# Runs of one unit of work before it is left lost: the first and two re-runs, so work lost twice (a spot pool
# reclaimed twice in a row) still completes; a third loss in a row points at the node pool, not luck.
LOST_ATTEMPTS = 3
RERUN_AUTOMATION_NAME = "realfake: re-run lost top-level GPU runs"
RERUN_DEPLOYMENT = "rerun-lost/rerun-lost"  # deployments/prefect.yaml; flows/rerun_lost.py
RERUN_STATE_NAME = "AwaitingRetry"
CRASHED_MESSAGE = (f"no heartbeat for {LOST_AFTER_SECONDS} s: the run's process or node is gone (marked by the "
                   f"'{AUTOMATION_NAME}' automation; a realfake parent re-submits its work)")


def lost_run_automation() -> AutomationCore:
    """The automation: after a heartbeat of a watched run, expect another heartbeat or a final state within
    :data:`LOST_AFTER_SECONDS`, else set the run Crashed (Prefect's zombie automation, scoped by tag)."""
    return AutomationCore(
        name=AUTOMATION_NAME,
        description=f"Marks a flow run tagged '{WATCH_TAG}' Crashed when it sent no heartbeat for "
                    f"{LOST_AFTER_SECONDS} s ({MISSED_HEARTBEATS} heartbeats of {HEARTBEAT_SECONDS} s). Installed "
                    "by realfake (tasks/lost_runs.py); runs without the tag are never matched.",
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{WATCH_TAG}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=LOST_AFTER_SECONDS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASHED_MESSAGE)],
    )


def rerun_automation(deployment_id: UUID) -> AutomationCore:
    """The automation that hands every crash of a watched run to the ``rerun-lost`` deployment ``deployment_id``
    (whose flow re-runs a top-level run and leaves a child to its parent: :func:`rerun_if_lost`)."""
    return AutomationCore(
        name=RERUN_AUTOMATION_NAME,
        description=f"Starts {RERUN_DEPLOYMENT} when a flow run tagged '{WATCH_TAG}' crashes; that flow puts a "
                    f"top-level run back to Scheduled (at most {LOST_ATTEMPTS} runs) and leaves a child run to the "
                    "parent that re-submits it. Installed by realfake (tasks/lost_runs.py).",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{WATCH_TAG}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters={
            "params": {"flow_run": {"__prefect_kind": "jinja", "template": "{{ event.resource.id }}"}}})],
    )


def rerun_if_lost(flow_run: str | UUID) -> str:
    """Re-run a crashed top-level watched run in place (Scheduled, ``AwaitingRetry``: a worker of its pool starts
    the same flow run again and it resumes from its checkpoints); returns what was done, in one line.

    ``flow_run``: its id, or the event resource id ``prefect.flow-run.{id}``. Left alone: a run that is no longer
    Crashed (already re-run), a child run (its parent re-submits it), a run without the watch tag or without a
    deployment (no worker could run it again), and a run that crashed :data:`LOST_ATTEMPTS` times.
    """
    from prefect.states import AwaitingRetry

    run_id = UUID(str(flow_run).removeprefix("prefect.flow-run."))
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        where = f"flow run {run.name} ({run.id})"
        if run.state is None or not run.state.is_crashed():
            return f"{where} is {run.state.type.value if run.state else 'without a state'}: nothing to re-run"
        if run.parent_task_run_id is not None:
            return f"{where} is a child run: its parent re-submits it"
        if WATCH_TAG not in (run.tags or []) or run.deployment_id is None:
            return f"{where} is not a watched deployment run: left Crashed"
        crashes = sum(1 for s in client.read_flow_run_states(run_id) if s.is_crashed())
        if crashes >= LOST_ATTEMPTS:
            return (f"{where} crashed {crashes} times: left Crashed (a third loss in a row points at the node pool; "
                    "start it again by hand, it resumes)")
        client.set_flow_run_state(run_id, AwaitingRetry(message=(
            f"re-run by realfake after crash {crashes} of {LOST_ATTEMPTS} ({run.state.message or 'no message'}); it "
            "resumes from its checkpoints")), force=True)
        return f"{where} crashed ({crashes} of {LOST_ATTEMPTS}): scheduled again on its pool, it resumes"


def _same(a: AutomationCore, b: AutomationCore) -> bool:
    keys = {"name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}

    def core(x: AutomationCore) -> dict:
        data = x.model_dump(mode="json", include=keys)
        data["trigger"].pop("id", None)
        for key in ("after", "expect", "for_each"):  # sets: the server may list them in another order
            data["trigger"][key] = sorted(data["trigger"].get(key) or [])
        return data

    return core(a) == core(b)


def _ensure(client: Any, wanted: AutomationCore) -> UUID:
    """Install or update one automation by name (idempotent: see :func:`ensure_lost_run_detection`)."""
    found = sorted(client.read_automations_by_name(wanted.name), key=lambda a: str(a.id))
    if not found:
        client.create_automation(wanted)
        found = sorted(client.read_automations_by_name(wanted.name), key=lambda a: str(a.id))
        log.info("installed the automation %r on %s", wanted.name, client.api_url)
    keep, extra = found[0], found[1:]
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    if not _same(keep, wanted):
        client.update_automation(keep.id, wanted)
        log.info("updated the automation %r on %s", wanted.name, client.api_url)
    return keep.id


def ensure_lost_run_detection() -> UUID:
    """Install or update realfake's lost-run automation on the current Prefect API, and the re-run automation when
    the ``rerun-lost`` deployment is registered; returns the lost-run automation's id.

    Idempotent: an identical automation is left alone, a changed one (an older realfake) is updated in place,
    and duplicates (two parents installing at once) are deleted, every installer keeping the same one (the
    lowest id).
    """
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        automation_id = _ensure(client, lost_run_automation())
        try:
            rerun = client.read_deployment_by_name(RERUN_DEPLOYMENT)
        except ObjectNotFound:
            log.warning("deployment %s is not registered: lost top-level GPU runs are marked Crashed but not re-run "
                        "(register it with `prefect deploy --all --prefect-file deployments/prefect.yaml`)",
                        RERUN_DEPLOYMENT)
        else:
            _ensure(client, rerun_automation(rerun.id))
        return automation_id


_ONCE = threading.Lock()


def ensure_lost_run_detection_once() -> UUID | None:
    """:func:`ensure_lost_run_detection` once per process (a parent's groups start from several threads at once);
    a server that refuses it (no automations API, no permission) is logged, not fatal: the parent's per-group
    deadline still bounds its wait."""
    with _ONCE:
        return _ensure_once()


@cache
def _ensure_once() -> UUID | None:
    try:
        return ensure_lost_run_detection()
    except Exception as e:  # noqa: BLE001 - detection is a safety net; the deadline is the backstop
        log.warning("could not install the lost-run automation %r (%s: %s); lost GPU runs are found by their "
                    "deadline only. Install it with `python -m tasks.lost_runs`.", AUTOMATION_NAME,
                    type(e).__name__, e)
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.lost_runs``: install (or update) the automations on ``PREFECT_API_URL``'s server (after
    ``prefect deploy``, so that the re-run one finds the ``rerun-lost`` deployment)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m tasks.lost_runs   (installs the lost-run automations on PREFECT_API_URL)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    automation_id = ensure_lost_run_detection()
    print(f"lost-run automation {AUTOMATION_NAME!r}: {automation_id} (runs tagged '{WATCH_TAG}' are crashed "
          f"{LOST_AFTER_SECONDS} s after their last heartbeat)")
    with get_client(sync_client=True) as client:
        for rerun in client.read_automations_by_name(RERUN_AUTOMATION_NAME):
            print(f"re-run automation {RERUN_AUTOMATION_NAME!r}: {rerun.id} (a crashed top-level run is re-run by "
                  f"{RERUN_DEPLOYMENT}, at most {LOST_ATTEMPTS} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
