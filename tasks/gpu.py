"""GPU placement: which devices this node has, the global concurrency limit, and one process per GPU.

On one node the synthesis (and per-class fine-tuning) fan-out starts one worker process per visible GPU,
pinned with ``CUDA_VISIBLE_DEVICES`` so each process sees exactly one device and loads the pipeline once for
all its shards. Across nodes the same groups become child flow runs instead (see :mod:`flows.synthesize`).
Either way every group holds one slot of a Prefect global concurrency limit named after the GPU pool
(:func:`gpu_slot`), so a cluster never runs more GPU groups than it has GPUs; the slot is a lease the holder renews,
so a slot held by a run on a lost node returns to the pool about when that run is marked Crashed. Nothing here
schedules: Prefect and the OS do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from realfake.config import BuildConfig
from realfake.procs import attached_process
from tasks.lost_runs import LOST_AFTER_SECONDS

__all__ = ["GPU_SLOT_LEASE_SECONDS", "ensure_gpu_limit", "gpu_slot", "gpu_slots", "run_group_process",
           "split_groups", "visible_gpus"]

log = get_logger("realfake.gpu")

# Lease of a GPU slot: the holder renews it every 3/4 of it (Prefect's renewal thread); a holder that is gone (its
# node lost) stops renewing, and the server's repossessor (every 15 s) returns the slot once the lease ran out.
# Prefect's default, 300 s, kept a lost group's slot from the pool for up to 5 minutes after the kill (measured:
# tests/test_preemption.py, the surviving group waited 5 min 7 s for the one slot); the lost-run window (90 s)
# returns it about when the lost run is marked Crashed and its work re-submitted.
GPU_SLOT_LEASE_SECONDS = float(LOST_AFTER_SECONDS)


@contextmanager
def gpu_slot(gpu_limit: str, occupy: int = 1) -> Iterator[None]:
    """Hold ``occupy`` slots of the GPU global concurrency limit ``gpu_limit`` (leased for
    :data:`GPU_SLOT_LEASE_SECONDS`, renewed while held) for the duration of the block."""
    with concurrency(gpu_limit, occupy=max(1, occupy), lease_duration=GPU_SLOT_LEASE_SECONDS):
        yield


def visible_gpus() -> list[str]:
    """Device ids this process may use: CUDA_VISIBLE_DEVICES when set, else every CUDA device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA runtime: a CPU node
        return []


def split_groups(items: Sequence[str], groups: int) -> list[list[str]]:
    """Deal items round-robin into at most ``groups`` non-empty groups (balanced, order-preserving)."""
    groups = max(1, min(groups, len(items))) if items else 0
    out: list[list[str]] = [[] for _ in range(groups)]
    for i, item in enumerate(items):
        out[i % groups].append(item)
    return out


def ensure_gpu_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots unless it exists (never resize it).

    An operator sizes the limit for the whole pool (``prefect gcl create realfake-gpu --limit N``); a run
    only creates it when missing, from what its own node sees, so a first demo run is bounded too.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=max(1, slots)))
            log.info("created global concurrency limit %r with %d slot(s)", name, max(1, slots))
        except Exception as e:  # a concurrent run created it first
            if "already exists" not in str(e).lower() and "409" not in str(e):
                raise


def gpu_slots(name: str) -> int:
    """Slots of the global concurrency limit ``name`` (1 when it does not exist yet)."""
    with get_client(sync_client=True) as client:
        try:
            return max(1, client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            return 1


def run_group_process(cfg: BuildConfig, verb: str, items: list[str], device: str | None,
                      lease_owner: str | None = None, nproc: int = 1) -> dict:
    """Run one group in a fresh worker process pinned to ``device`` and return its JSON result.

    Args:
        cfg: validated build config (passed as JSON, so the worker validates it again).
        verb: ``synthesize`` (items are shard names) or ``finetune`` (items are adapter scopes).
        items: the group's shards or scopes.
        device: CUDA device id to pin, or None to inherit this process's devices.
        lease_owner: the build whose lease the worker's commits check (synthesize only).
        nproc: worker processes started by ``torchrun`` on this node, one per GPU, training data-parallel
            (finetune only); rank 0 writes the result.

    The worker runs under :func:`realfake.procs.attached_process`: it is stopped when this call is
    interrupted, and the kernel stops it when this process dies, so a cancelled run leaves no worker on a GPU.

    Raises:
        RuntimeError: the worker failed; the message carries the tail of its output.
        ValueError: a data-parallel fine-tune whose global batch does not split over ``nproc`` ranks (checked
            before torchrun starts).
    """
    from tasks.group_worker import LEASE_OWNER_ENV

    if verb == "finetune" and nproc > 1:
        from realfake.finetune import training_schedule

        # a batch that does not split over the ranks fails here, once, not in every rank under torchrun's traceback
        training_schedule(cfg.finetune, images=1, processes=nproc)
    env = dict(os.environ)
    env.pop(LEASE_OWNER_ENV, None)
    if lease_owner:
        env[LEASE_OWNER_ENV] = lease_owner
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with tempfile.TemporaryDirectory(prefix="realfake-group-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        out_path = Path(tmp) / "result.json"
        cfg_path.write_text(cfg.model_dump_json())
        launcher = [sys.executable] if nproc <= 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launcher, "-m", "tasks.group_worker", verb, str(cfg_path), str(out_path), *items]
        log.info("starting %s worker on device %s for %d item(s)", verb, device or "(inherited)", len(items))
        # Attached: the worker (torchrun and its ranks) ends with this process, even when a cancelled flow run
        # is stopped by a signal that runs no cleanup.
        with attached_process(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=str(Path(__file__).parent.parent)) as proc:
            output, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{verb} worker on device {device} for {items[:3]}... exited {proc.returncode}:\n{output[-4000:]}"
            )
        return json.loads(out_path.read_text())
