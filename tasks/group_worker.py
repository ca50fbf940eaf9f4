"""Entry point of one GPU worker process: ``python -m tasks.group_worker VERB CONFIG.json RESULT.json ITEM...``.

Started by :func:`tasks.gpu.run_group_process` with ``CUDA_VISIBLE_DEVICES`` pinned to one device. It calls
the library once for its whole group, so the pipeline is loaded once and stays warm across the group's
shards (or adapter scopes), and writes the library's result as JSON for the parent task. It imports no
Prefect: the parent task owns retries, limits and logs; this process only does the GPU work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["LEASE_OWNER_ENV", "main"]

LEASE_OWNER_ENV = "REALFAKE_LEASE_OWNER"


def main(argv: list[str]) -> int:
    """Run one group; returns the process exit code."""
    if len(argv) < 3 or argv[0] not in ("synthesize", "finetune"):
        print("usage: python -m tasks.group_worker {synthesize|finetune} CONFIG.json RESULT.json ITEM...",
              file=sys.stderr)
        return 2
    verb, cfg_path, out_path, items = argv[0], Path(argv[1]), Path(argv[2]), argv[3:]
    if "LOCAL_RANK" in os.environ:  # a rank of torchrun (a multi-GPU group): end with torchrun, however it ends
        from realfake.procs import end_with_parent

        end_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from realfake import build
    from realfake.config import BuildConfig

    cfg = BuildConfig.model_validate_json(cfg_path.read_text())
    if verb == "synthesize":
        # the parent build's lease owner travels in the environment (tasks.gpu.run_group_process)
        result = build.synthesize(cfg, list(items) or None, lease_owner=os.environ.get(LEASE_OWNER_ENV) or None)
    else:
        result = {"adapters": {scope: build.finetune(cfg, scope) for scope in items}}
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this; one writes the result
        out_path.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
