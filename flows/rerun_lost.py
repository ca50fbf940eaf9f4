"""Re-run a lost top-level GPU run: the flow of the ``rerun-lost`` deployment, started by realfake's re-run automation
on every crash of a run tagged ``heartbeat-watched`` (:mod:`tasks.lost_runs`).

A top-level run (a ``finetune``, ``measure`` or ``train-eval`` run started from the UI, the CLI or a schedule) that
crashed is put back to Scheduled, so a worker of its pool runs it again and it resumes from its checkpoints, at most
three runs in all; a child run is left to the parent that re-submits it. One log line says which.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from flows.params import RerunLostParams
from tasks.lost_runs import rerun_if_lost

__all__ = ["rerun_lost_flow"]


@flow(name="rerun-lost", log_prints=True, persist_result=False)
def rerun_lost_flow(params: RerunLostParams = RerunLostParams()) -> str:
    """Re-run the crashed flow run ``params.flow_run`` when it is a top-level run of a watched deployment; returns
    what was done."""
    if not params.flow_run:
        raise ValueError("flow_run: empty; name the crashed flow run (its id)")
    done = rerun_if_lost(params.flow_run)
    get_run_logger().info("%s", done)
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.rerun_lost FLOW_RUN_ID")
    print(rerun_lost_flow(RerunLostParams(flow_run=sys.argv[1])))
