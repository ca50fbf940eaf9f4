"""Child flow runs of a deployment: check the deployment is registered, run one, and name what it was for.

A parent that fans GPU work out across nodes starts one child flow run per unit of work (a shard group, a
batch of LiRA shadows) of a deployment on the GPU pool and waits for it. What the parent needs on top of
:func:`prefect.deployments.run_deployment`: a missing deployment reported before any work starts, and a child
that did not complete turned into an error that says which unit of work it carried, which child run it was
and how it ended. A child that *crashed* (its pod or process was lost) raises :class:`ChildRunLost`, which
:func:`retry_on_lost_child` lets a Prefect task retry; a child that *failed* ran its own code to an error
(transient faults are retried inside it), so running it again would fail the same way.
"""

from __future__ import annotations

from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

__all__ = ["ChildRunFailed", "ChildRunLost", "require_deployment", "retry_on_lost_child", "run_child_deployment"]


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


def run_child_deployment(deployment: str, parameters: dict[str, Any], what: str,
                         flow_run_name: str | None = None) -> FlowRun:
    """Start one child flow run of ``deployment``, wait until it ends and return it if it completed.

    Call inside a task or flow: the child is linked to it as a subflow, so the UI shows it under the parent.

    Args:
        deployment: 'flow name/deployment name'.
        parameters: the child's flow parameters.
        what: the unit of work, for messages (e.g. ``"privacy audit of mini/v1, real shadows 0, 1"``).
        flow_run_name: name of the child run (None: Prefect's generated one).

    Raises:
        ChildRunLost: the child crashed (worth one retry).
        ChildRunFailed: the child failed or was cancelled; the message carries the child's own message.
    """
    run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True,
                         flow_run_name=flow_run_name)
    state = run.state
    if state is not None and state.is_completed():
        return run
    ended = f"ended {state.type.value}: {state.message or 'no message'}" if state else "ended without a state"
    error = ChildRunLost if state is not None and state.is_crashed() else ChildRunFailed
    raise error(f"{what}: child flow run {run.name} ({run.id}) of deployment {deployment} {ended}")


def retry_on_lost_child(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when its child run was lost, not when it failed."""
    try:
        state.result()
    except ChildRunLost:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is the child's own and would repeat
        return False
    return False
