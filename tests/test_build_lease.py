"""One build writes a version at a time, also under Prefect: the flow holds the lease, shard groups join it.

Library level: joining a lease (what a shard-group worker does) and what a worker does when its build does not
hold the lease. Prefect level, on a real temporary Prefect API: a build of a version whose lease another build
holds fails before writing anything, naming that build; a normal build leaves no lease behind (verified).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from realfake import build
from realfake.data.shards import LeaseLostError, VersionLease
from realfake.data.storage import Store, version_store
from tests.support.prefect_server import miniature_params, write_tiny_models


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return version_store(str(tmp_path), "mini", "v1")


def test_a_worker_joins_its_builds_lease_and_leaves_it_in_place(store: Store) -> None:
    holder = VersionLease(store, owner="build-A", heartbeat=False).acquire()
    worker = VersionLease(store, owner="build-A", heartbeat=False).join()
    worker.check()  # what the writer does before each commit
    worker.release()  # a worker ending must not free the version under its build
    assert VersionLease(store, owner="build-A").read()["owner"] == "build-A"
    holder.release()
    assert holder.read() is None


def test_joining_fails_when_nobody_or_another_build_holds_the_lease(store: Store) -> None:
    with pytest.raises(LeaseLostError, match="held by nobody"):
        VersionLease(store, owner="build-A").join()
    VersionLease(store, owner="build-B", heartbeat=False).acquire()
    with pytest.raises(LeaseLostError, match="belongs to build 'build-A'.*held by build 'build-B'"):
        VersionLease(store, owner="build-A").join()


def test_a_joined_worker_stops_at_its_next_commit_once_the_lease_passes(store: Store) -> None:
    first = VersionLease(store, owner="build-A", heartbeat=False).acquire()
    worker = VersionLease(store, owner="build-A", heartbeat=False).join()
    first.release()
    VersionLease(store, owner="build-B", heartbeat=False).acquire()  # e.g. build A's lease expired
    with pytest.raises(LeaseLostError, match="build-B"):
        worker.check()


def test_a_shard_group_of_a_build_that_lost_the_version_writes_nothing(tmp_path: Path) -> None:
    from realfake.config import load_config

    cfg = load_config(preset="demo", overrides=[f"root={tmp_path}", "dataset=mini", "version=v1"])
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    VersionLease(store, owner="build-B", heartbeat=False).acquire()
    with pytest.raises(LeaseLostError, match="belongs to build 'build-A'"):
        build.synthesize(cfg, lease_owner="build-A")
    assert not store.exists("synthetic")


@pytest.mark.slow
def test_prefect_build_of_a_leased_version_fails_at_once_naming_the_holder(harness, tmp_path: Path) -> None:
    from flows.build import build_flow
    from flows.params import BuildParams

    models = write_tiny_models(tmp_path / "models" / "tiny-sd")
    root = tmp_path / "out"
    store = version_store(str(root), "mini", "v1")
    VersionLease(store, owner="build-elsewhere", heartbeat=False).acquire()
    state = build_flow(BuildParams(**miniature_params(root, models, "v1", measure=False, compare_baseline=False)),
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="being written by build 'build-elsewhere'"):
        state.result()
    assert not store.exists("real", "manifest.parquet")  # failed before the prepare stage wrote anything
    assert VersionLease(store).read()["owner"] == "build-elsewhere"  # and left the other build's lease alone


@pytest.mark.slow
def test_a_failed_shard_group_ends_the_stage_only_after_every_group_ended(harness, tmp_path: Path) -> None:
    """The build's lease is released when the stage ends: it must not end while other groups still write."""
    import time

    from prefect import flow, task

    from flows.synthesize import _wait_for_every_group
    from realfake.config import load_config

    cfg = load_config(preset="demo", overrides=[f"root={tmp_path}"])
    finished = tmp_path / "finished"
    finished.mkdir()

    @task
    def group(i: int) -> dict:
        if i in (0, 2):
            raise OSError(f"group {i} lost its device")
        time.sleep(2)  # still writing when the first group has already failed
        (finished / str(i)).touch()
        return {"group": i}

    @flow
    def stage() -> list:
        return _wait_for_every_group([group.submit(i) for i in range(3)], cfg)

    state = stage(return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"(?s)2 of 3 shard groups failed.*group 0: OSError: group 0 lost.*group 2"):
        state.result()
    assert (finished / "1").exists()  # the slow group ran to its end before the stage failed
