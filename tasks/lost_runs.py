"""Lost-run detection: a GPU flow run whose process is gone is marked Crashed within a bounded time.

A preempted node takes its flow-run process with it, and nothing tells the server: the run stays Running. Prefect
3's documented remedy is a flow-run heartbeat (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) and a proactive automation
that crashes a run whose heartbeats stop ("How to detect and respond to zombie flows", docs.prefect.io). realfake
installs that automation itself (:func:`ensure_lost_run_detection`: idempotent; the fan-out parents call it, and
``python -m tasks.lost_runs`` installs it at deploy time) and scopes it to the deployments tagged
:data:`WATCH_TAG`, which set the heartbeat in their own job variables. The invariant a caller must keep: every run
that carries the tag heartbeats at least every :data:`HEARTBEAT_SECONDS`, or a healthy run of it is crashed; runs
without the tag (the ``build`` parent, a user's own flows, whatever their heartbeat) are never touched.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import timedelta
from functools import cache
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

__all__ = [
    "AUTOMATION_NAME",
    "CRASHED_MESSAGE",
    "HEARTBEAT_ENV",
    "HEARTBEAT_SECONDS",
    "LOST_AFTER_SECONDS",
    "MISSED_HEARTBEATS",
    "WATCH_TAG",
    "ensure_lost_run_detection",
    "ensure_lost_run_detection_once",
    "lost_run_automation",
    "main",
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


def _same(a: AutomationCore, b: AutomationCore) -> bool:
    keys = {"name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}

    def core(x: AutomationCore) -> dict:
        data = x.model_dump(mode="json", include=keys)
        data["trigger"].pop("id", None)
        for key in ("after", "expect", "for_each"):  # sets: the server may list them in another order
            data["trigger"][key] = sorted(data["trigger"].get(key) or [])
        return data

    return core(a) == core(b)


def ensure_lost_run_detection() -> UUID:
    """Install or update realfake's lost-run automation on the current Prefect API; returns its id.

    Idempotent: an identical automation is left alone, a changed one (an older realfake) is updated in place,
    and duplicates (two parents installing at once) are deleted, every installer keeping the same one (the
    lowest id).
    """
    wanted = lost_run_automation()
    with get_client(sync_client=True) as client:
        found = sorted(client.read_automations_by_name(AUTOMATION_NAME), key=lambda a: str(a.id))
        if not found:
            client.create_automation(wanted)
            found = sorted(client.read_automations_by_name(AUTOMATION_NAME), key=lambda a: str(a.id))
            log.info("installed the automation %r on %s", AUTOMATION_NAME, client.api_url)
        keep, extra = found[0], found[1:]
        for duplicate in extra:
            client.delete_automation(duplicate.id)
        if not _same(keep, wanted):
            client.update_automation(keep.id, wanted)
            log.info("updated the automation %r on %s", AUTOMATION_NAME, client.api_url)
        return keep.id


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
    """``python -m tasks.lost_runs``: install (or update) the automation on ``PREFECT_API_URL``'s server."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m tasks.lost_runs   (installs the lost-run automation on PREFECT_API_URL)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    automation_id = ensure_lost_run_detection()
    print(f"lost-run automation {AUTOMATION_NAME!r}: {automation_id} (runs tagged '{WATCH_TAG}' are crashed "
          f"{LOST_AFTER_SECONDS} s after their last heartbeat)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
