"""Shared fixtures: tiny models of the production architectures, saved and loaded back like real ones."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The longest test files, longest first, from `--durations=50` of a clean clone's `.ci/run` (2026-12-02, 2 cores,
# two xdist workers): collected first, so `make test`'s two workers (a file each at a time) start them at once
# instead of one worker ending the run alone with a 7.8-minute file while the other is idle.
LONGEST_FILES = ("test_preemption.py", "test_prefect_server.py", "test_privacy_flow.py", "test_finetune_ddp.py",
                 "test_train_dist_cancel.py", "test_exit_codes.py", "test_gpu_session_smoke.py", "test_ddp.py",
                 "test_scale.py", "test_shadow_rng.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Run the files of LONGEST_FILES first (in that order); every other file keeps its place, as does the order of
    the tests within a file."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep collection order


@pytest.fixture
def one_thread():
    """One intra-op torch thread: the test machine's cores are shared, and spin-waiting under contention makes
    multi-threaded kernels slower (and float reductions differ between thread counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def harness():
    """A throwaway Prefect API on loopback for in-process flow runs (prefect imported only where used).

    One per session (per xdist worker): starting it takes 15-40 s on 2 cores, and 11 files use it. So the server
    holds other files' runs: a test reads its artifacts and runs by its own flow run, never by key alone."""
    from prefect.testing.utilities import prefect_test_harness

    torch.set_num_threads(1)
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A random-weight tiny SD pipeline folder (diffusers layout) with a tiny CLIP vision tower in clip/."""
    from realfake.models.tiny import TinySpec, build_clip_tokenizer, build_tiny_clip_vision, build_tiny_sd, save_tiny_sd

    root = tmp_path_factory.mktemp("tiny-base")
    spec = TinySpec()
    tok = build_clip_tokenizer(root / "tokenizer-src")
    save_tiny_sd(root / "sd", build_tiny_sd(spec, tok), build_tiny_clip_vision(spec))
    return str(root / "sd")


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> str:
    """scikit-learn's real handwritten digits written as a 32 px RGB image folder."""
    from realfake.data.sources import write_demo_folder

    return str(write_demo_folder("demo_digits", tmp_path_factory.mktemp("digits"), 32))


def mini_config(root: str, base: str, source_uri: str, **over):
    """A miniature build config: a few images per class, few steps, tiny classifier."""
    from realfake.config import load_config

    data = {
        "dataset": "mini",
        "version": "v1",
        "root": root,
        "device": "cpu",
        "source": {"kind": "image_folder", "uri": source_uri, "max_per_class": 4, "test_fraction": 0.25},
        "models": {"base": base, "clip": base},
        "finetune": {"max_steps": 3, "batch_size": 8, "resolution": 32, "mixed_precision": "no",
                     "checkpoint_every": 2, "random_flip": False, "rank": 4},
        "synthesis": {"steps": 4, "resolution": 32, "batch_size": 8},
        "shards": {"format": "webdataset", "image_format": "png", "max_count": 16},
        "classifier": {"model": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}, "image_size": 32,
                       "epochs": 1, "batch_size": 16, "lr": 0.05, "hflip": 0.0, "input_norm": "per_image",
                       "workers": 0, "decay_milestones": [100]},
    }
    for k, v in over.items():
        section, _, field = k.partition("__")
        if field:
            data.setdefault(section, {})[field] = v
        else:
            data[section] = v
    return load_config(data=data)
