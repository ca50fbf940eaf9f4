"""Data-parallel LoRA fine-tuning: ``torchrun`` with 2 CPU processes (gloo) through the real ``realfake`` CLI.

With the MMD term off, two processes that each take half of every batch and average their gradients must make
the same optimiser steps as one process on the whole batch: the adapters agree to float rounding. The MMD term is
computed per process over its own micro-batch (as the authors', per GPU), so it is switched off for this comparison
only; with it on, each rank's term spans its whole micro-batch of 8 (logged per rank), and a global batch that
leaves a rank fewer than 8 images fails at once. One process writes the adapter and its log; a batch that does not
split evenly fails at once naming the field.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mini_config
from safetensors.torch import load_file

from realfake import build
from realfake.build import store_of
from realfake.finetune import WEIGHTS_NAME, adapter_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _torchrun(config: Path, *sets: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "realfake.cli", "finetune", "--config", str(config), *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base, digits_folder):
    root = tmp_path_factory.mktemp("ddp")
    cfg = mini_config(str(root), tiny_base, digits_folder, finetune__mmd_weight=0.0, finetune__max_steps=3,
                      finetune__batch_size=4, finetune__checkpoint_every=2)
    build.prepare(cfg)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, config


def test_two_processes_make_the_steps_of_one(prepared):
    cfg, config = prepared
    store = store_of(cfg)
    build.finetune(cfg, "all")  # one process, the whole batch
    single = load_file(store.local_path(*adapter_dir("all"), WEIGHTS_NAME))
    store.remove(*adapter_dir("all"), recursive=True)

    run = _torchrun(config)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    double = load_file(store.local_path(*adapter_dir("all"), WEIGHTS_NAME))
    assert single.keys() == double.keys()
    moved = [k for k in single if single[k].abs().max() > 0]
    assert moved, "the adapter must have trained"
    for k in single:
        torch.testing.assert_close(double[k], single[k], rtol=1e-4, atol=1e-6)
    log = store.read_json(*adapter_dir("all"), "train_log.json")
    assert log["processes"] == 2 and len(log["history"]) == 3
    assert not store.exists(*adapter_dir("all"), "checkpoint")  # step-2 checkpoint written once, then removed


def test_a_batch_that_does_not_split_fails_naming_the_field(prepared):
    _, config = prepared
    run = _torchrun(config, "finetune.batch_size=3")
    assert run.returncode != 0
    assert ("finetune.batch_size=3 does not split over 2 process(es) x finetune.gradient_accumulation=1: set "
            "finetune.batch_size to a multiple of 2 (e.g. 2 or 4)") in run.stderr


def test_each_rank_takes_the_mmd_over_its_whole_micro_batch(prepared):
    """MMD on, a global batch of 16 on 2 processes: every step, each rank's MMD term spans its 8 images."""
    cfg, config = prepared
    store = store_of(cfg)
    store.remove(*adapter_dir("all"), recursive=True)
    run = _torchrun(config, "finetune.mmd_weight=0.003", "finetune.batch_size=16")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "global batch 16 = 8 per process x 2 processes x 1 accumulation" in run.stderr
    log = store.read_json(*adapter_dir("all"), "train_log.json")
    assert log["processes"] == 2 and log["schedule"]["micro_batch"] == 8
    assert [h["mmd_batch_per_rank"] for h in log["history"]] == [[8, 8]] * 3
    assert all(h["mmd"] > 0 for h in log["history"])
    store.remove(*adapter_dir("all"), recursive=True)


def test_a_global_batch_leaving_a_rank_fewer_than_8_mmd_images_fails(prepared):
    """8 images over 2 processes passes the static check (8 per micro-batch on one process) but leaves 4 per rank."""
    _, config = prepared
    run = _torchrun(config, "finetune.mmd_weight=0.003", "finetune.batch_size=8")
    assert run.returncode != 0
    assert ("finetune.batch_size=8 over 2 process(es) x finetune.gradient_accumulation=1 leaves 4 images per "
            "process for the MMD term, which needs at least 8 (the authors' per-GPU batch): set "
            "finetune.batch_size=16 or more") in run.stderr


def test_the_prefect_worker_launch_trains_data_parallel_and_returns_one_result(prepared):
    """What the fine-tune task runs on a multi-GPU node: ``torchrun`` over ``tasks.group_worker``, rank 0 reports."""
    from tasks.gpu import run_group_process

    cfg, _ = prepared
    store = store_of(cfg)
    store.remove(*adapter_dir("all"), recursive=True)
    result = run_group_process(cfg, "finetune", ["all"], None, nproc=2)
    assert result["adapters"]["all"]["steps"] == 3
    assert store.read_json(*adapter_dir("all"), "train_log.json")["processes"] == 2
