"""The version lease of a Prefect build: one flow run holds it, its shard groups work under it.

The library's :class:`realfake.data.lease.VersionLease` is taken by the flow run that builds a version (owner
``prefect-{flow run id}``), renewed by a heartbeat thread in that process, and released when the stages are
done, before verification. Shard groups (worker processes on this node, child flow runs on other nodes) get the
owner and *join* the lease: before each commit they check that the build still holds it, so a second build of
the same version fails at once naming the first, and a build that lost its lease stops writing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from realfake.config import BuildConfig
from realfake.data.lease import VersionLease

__all__ = ["build_lease", "lease_owner"]


def lease_owner() -> str:
    """The lease owner of the current flow run (a fresh id outside one)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return f"prefect-{run_id}" if run_id else f"prefect-{uuid.uuid4().hex[:12]}"


@contextmanager
def build_lease(cfg: BuildConfig, wait_s: float = 0.0) -> Iterator[VersionLease]:
    """Hold the lease of ``cfg``'s version for the block (``LeaseHeldError`` names the build holding it)."""
    from realfake.build import store_of

    lease = VersionLease(store_of(cfg), owner=lease_owner()).acquire(wait_s)
    try:
        yield lease
    finally:
        lease.release()
