"""Distributed train-eval: :func:`realfake.build.train_eval` under ``torchrun``, one process per GPU.

``python -m realfake.train_dist --nproc-per-node 4 --preset in1k --data real`` starts torchrun
(``torch.distributed.run``) on this node, which starts four copies of this module in worker mode. Each worker
runs ``train_eval``: the classifier trains under DistributedDataParallel on its share of every global batch
(:func:`realfake.classify.train_classifier`), rank 0 evaluates on the real test split and writes
``runs/{run}/metrics.json``. On several nodes the same command runs on each node with ``--nnodes`` and a
rendezvous (``--rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB``) or ``--node-rank`` with
``--master-addr``. Training checkpoints to ``runs/{run}/checkpoint`` in the version store, so a relaunch after
preemption, or torchrun's own ``--max-restarts``, continues from the last committed epoch.

:func:`launch` is the same launch for a caller in Python (the Prefect train-eval task): it runs torchrun as a
subprocess on this node, streams its output to the log and returns rank 0's metrics. Both start torchrun through
:func:`realfake.procs.attached_process`, so torchrun and its workers end with the process that started them,
however it ends (an exception, SIGTERM from a cancelled flow run, SIGKILL), instead of holding GPUs as orphans.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from realfake.config import BuildConfig, ConfigError, load_config
from realfake.procs import attached_process, end_with_parent

__all__ = ["launch", "main", "torchrun_command"]

log = logging.getLogger(__name__)
DATA = ("real", "synthetic", "real+synthetic")

def torchrun_command(
    worker_args: list[str],
    nproc_per_node: int = 1,
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_backend: str | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """The torchrun command line that runs this module's worker with ``worker_args`` on this node.

    One node without a rendezvous or master address gets ``--standalone`` (a local rendezvous on a free port).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node),
        "--nnodes",
        str(nnodes),
        "--max-restarts",
        str(max_restarts),
    ]
    if str(nnodes) == "1" and not (rdzv_endpoint or master_addr):
        cmd.append("--standalone")
    for flag, value in (
        ("--node-rank", node_rank),
        ("--rdzv-backend", rdzv_backend),
        ("--rdzv-endpoint", rdzv_endpoint),
        ("--rdzv-id", rdzv_id),
        ("--master-addr", master_addr),
        ("--master-port", master_port),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return [*cmd, "-m", "realfake.train_dist", "--worker", *worker_args]


def _check_world(cfg: BuildConfig, nproc_per_node: int, nnodes: str) -> None:
    """Fail before any process starts when the run cannot split its batch or has too few GPUs."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if str(nnodes).isdigit():
        world = nproc_per_node * int(nnodes)
        log.info("%s (%s node(s) x %d)", cfg.classifier.batch_arithmetic(world), nnodes, nproc_per_node)
    from realfake.models.loading import resolve_device

    if resolve_device(cfg.device).type == "cuda":
        import torch

        if nproc_per_node > torch.cuda.device_count():
            raise ValueError(
                f"--nproc-per-node {nproc_per_node} asks for one GPU per process, but this node has "
                f"{torch.cuda.device_count()}"
            )


def launch(
    cfg: BuildConfig,
    data: str = "synthetic",
    nproc_per_node: int = 2,
    run: str | None = None,
    max_restarts: int = 0,
    on_line: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run ``train_eval(cfg, data, run)`` in ``nproc_per_node`` processes on this node and return its metrics.

    Args:
        cfg: Validated build config (passed to the workers as JSON and validated again there).
        data: ``real``, ``synthetic`` or ``real+synthetic``.
        nproc_per_node: Training processes, one per GPU on a CUDA device (gloo processes on the CPU).
        run: Run name (default: train_eval's).
        max_restarts: How often torchrun restarts the whole group after a worker fails; each restart resumes
            from the run's checkpoint.
        on_line: Receives each line of torchrun's output (default: this module's logger), e.g. a Prefect run
            logger's ``info``.

    Raises:
        ValueError: the batch does not split over the processes, or there are fewer GPUs than processes.
        RuntimeError: torchrun failed; the message carries the tail of its output.
    """
    if data not in DATA:
        raise ValueError(f"data must be one of {', '.join(DATA)}, got {data!r}")
    _check_world(cfg, nproc_per_node, "1")
    with tempfile.TemporaryDirectory(prefix="realfake-train-dist-") as tmp:
        cfg_path, out_path = Path(tmp, "config.json"), Path(tmp, "metrics.json")
        cfg_path.write_text(cfg.model_dump_json())
        args = ["--config-json", str(cfg_path), "--data", data, "--out", str(out_path)]
        if run:
            args += ["--run-name", run]
        cmd = torchrun_command(args, nproc_per_node=nproc_per_node, max_restarts=max_restarts)
        log.info("launching %d training processes: %s", nproc_per_node, " ".join(cmd))
        tail: deque[str] = deque(maxlen=60)
        # Same working directory as the caller, so a relative storage root names the same folder.
        with attached_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                (on_line or log.info)(line.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(
                f"torchrun train-eval on {data} with {nproc_per_node} processes exited "
                f"{proc.returncode}:\n{''.join(tail)[-4000:]}"
            )
        return json.loads(out_path.read_text())


def _worker(a: argparse.Namespace, cfg: BuildConfig) -> int:
    from realfake.build import train_eval
    from realfake.distributed import process_rank

    result = train_eval(cfg, a.data, run=a.run_name)
    if process_rank()[0] == 0:
        if a.out:
            Path(a.out).write_text(json.dumps(result, default=str))
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2, default=str))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m realfake.train_dist",
        description="Train and evaluate the classifier under torchrun (DDP); resumes from runs/{run}/checkpoint.",
    )
    g = p.add_argument_group("what to train (as `realfake train-eval`)")
    g.add_argument("--preset", "-p", default=None, help="Preset name (see `realfake presets`).")
    g.add_argument("--config", "-c", default=None, help="YAML config file (overrides the preset).")
    g.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], help="Override: section.field=value (repeatable)."
    )
    g.add_argument("--config-json", default=None, help="A whole validated BuildConfig as JSON (instead of the above).")
    g.add_argument("--data", choices=DATA, default="synthetic", help="Training set.")
    # Worker options travel behind torchrun's own, whose parser matches abbreviations: none may be the prefix of
    # one of its options (--run would be taken for --run-path).
    g.add_argument("--run-name", default=None, help="Run name (default: {data}-{model}-s{seed}).")
    g.add_argument("--out", default=None, help="Write rank 0's metrics to this JSON file instead of printing them.")
    t = p.add_argument_group("torchrun (passed through)")
    t.add_argument("--nproc-per-node", type=int, default=1, help="Processes on this node (one per GPU).")
    t.add_argument("--nnodes", default="1", help="Nodes, or an elastic range MIN:MAX.")
    t.add_argument("--node-rank", type=int, default=None)
    t.add_argument("--rdzv-backend", default=None)
    t.add_argument("--rdzv-endpoint", default=None)
    t.add_argument("--rdzv-id", default=None)
    t.add_argument("--master-addr", default=None)
    t.add_argument("--master-port", type=int, default=None)
    t.add_argument("--max-restarts", type=int, default=0, help="Restarts of the group after a failure (each resumes).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _config(a: argparse.Namespace) -> BuildConfig:
    if a.config_json:
        return BuildConfig.model_validate_json(Path(a.config_json).read_text())
    return load_config(preset=a.preset, file=a.config, overrides=a.overrides)


def main(argv: list[str] | None = None) -> int:
    """Launch torchrun (or, with the internal ``--worker`` flag, be one of its processes); returns the exit code."""
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = _config(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.worker:
        end_with_parent()  # a rank: end with torchrun even when torchrun itself is killed outright
        return _worker(a, cfg)
    try:
        _check_world(cfg, a.nproc_per_node, a.nnodes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.config_json:
        worker_args = ["--config-json", a.config_json]
    else:
        worker_args = [*(["--preset", a.preset] if a.preset else []), *(["--config", a.config] if a.config else [])]
        worker_args += [x for o in a.overrides for x in ("--set", o)]
    worker_args += ["--data", a.data, *(["--run-name", a.run_name] if a.run_name else [])]
    worker_args += ["--out", a.out] if a.out else []
    cmd = torchrun_command(
        worker_args,
        a.nproc_per_node,
        a.nnodes,
        a.node_rank,
        a.rdzv_backend,
        a.rdzv_endpoint,
        a.rdzv_id,
        a.master_addr,
        a.master_port,
        a.max_restarts,
    )
    with attached_process(cmd) as proc:  # Ctrl-C reaches this process only; it stops torchrun
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
