"""A LiRA shadow's model does not depend on what else runs in its process.

Local shadows are Prefect tasks on threads of one process, and training seeds and draws from the process-wide
torch, numpy and python generators (initial weights, every image's augmentation, dropout). Two shadows trained at
the same time must store the logits each stores when trained alone: the library runs the shadows of a process
one at a time, and on a node with several GPUs the flow runs each shadow in a process of its own (faked here on
the CPU with ``CUDA_VISIBLE_DEVICES``). The recipe draws a lot: random crops, flips and colour jitter on every
image of every epoch, and drop-path.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch
from conftest import mini_config

from realfake import procs
from realfake.build import store_of
from realfake.privacy import audit
from realfake.privacy.audit import LIRA_RUN, LiraConfig, plan_lira, run_real_shadow

pytestmark = pytest.mark.slow
LIRA = LiraConfig(n_shadows=4, families=["real"], split_seed=1)
SHADOWS = (0, 1)  # two of the plan's four are enough


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``), so any difference comes from the RNGs."""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, digits_folder):
    classifier = {"model": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}, "image_size": 16,
                  "epochs": 3, "batch_size": 8, "lr": 0.05, "hflip": 0.5, "scale": (0.5, 1.0),
                  "color_jitter": 0.4, "drop_path_rate": 0.1, "input_norm": "per_image", "workers": 0}
    cfg = mini_config(str(tmp_path_factory.mktemp("shadow-rng")), "unused-no-model-is-loaded", digits_folder,
                      caption__enabled=False, guidance__enabled=False, classifier=classifier)
    plan_lira(cfg, LIRA)
    return cfg


@pytest.fixture(autouse=True)
def _no_logits(cfg):
    """Every test starts without stored logits (a shadow with logits skips itself)."""
    run = store_of(cfg).child(*LIRA_RUN)
    if run.exists("logits"):
        run.remove("logits", recursive=True)


def _logits(cfg) -> list[np.ndarray]:
    """The stored logits of every shadow, then removed so the next run trains again."""
    run = store_of(cfg).child(*LIRA_RUN)
    out = [audit._load_logits(run, "real", i, None)["logits"] for i in SHADOWS]
    run.remove("logits", recursive=True)
    return out


def _concurrently(cfg) -> list[dict]:
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(SHADOWS))

    def shadow(i: int) -> None:
        try:
            start.wait()
            results[i] = run_real_shadow(cfg, LIRA, i)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=shadow, args=(i,)) for i in SHADOWS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in SHADOWS]


def test_shadows_trained_at_the_same_time_store_the_logits_of_shadows_trained_alone(cfg):
    for i in SHADOWS:
        assert not run_real_shadow(cfg, LIRA, i)["skipped"]
    alone = _logits(cfg)
    assert not np.array_equal(alone[0], alone[1])  # two different shadows (halves and seeds)

    together = _concurrently(cfg)
    assert not any(r["skipped"] for r in together)
    for i, (a, b) in enumerate(zip(alone, _logits(cfg), strict=True)):
        assert np.array_equal(a, b), f"shadow {i} trained next to another differs by {np.abs(a - b).max():.3g}"


# -- several GPUs: a process per shadow ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a two-GPU node with CUDA_VISIBLE_DEVICES, which on a "
                    "CUDA machine would name real devices")
def test_the_local_fanout_on_two_gpus_trains_shadows_in_processes_of_their_own_as_they_train_alone(
        harness, cfg, monkeypatch):
    from prefect import flow

    from flows.privacy import run_lira_fanout
    from tasks.gpu import ensure_gpu_limit

    auto = cfg.model_copy(update={"device": "auto"})  # the CPU here; a CUDA device on a GPU node
    for i in range(LIRA.n_shadows):
        run_real_shadow(auto, LIRA, i)
    run = store_of(cfg).child(*LIRA_RUN)
    alone = [audit._load_logits(run, "real", i, None)["logits"] for i in range(LIRA.n_shadows)]
    run.remove("logits", recursive=True)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what the flow sees on a node with two GPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the shadow processes sum in the order this one does
    ensure_gpu_limit("shadow-rng-gpu", 4)  # more slots than GPUs: one process per GPU at a time all the same
    # every shadow process, observed as it starts and once it has been reaped (not sampled): its pid and GPU
    lock = threading.Lock()
    running: dict[int, str] = {}
    started: list[tuple[int, str]] = []
    most = 0
    real_attached = procs.attached_process

    @contextlib.contextmanager
    def observed(cmd, *args, **kwargs):
        nonlocal most
        with real_attached(cmd, *args, **kwargs) as proc:
            gpu = kwargs["env"]["CUDA_VISIBLE_DEVICES"]
            with lock:
                assert gpu not in running.values(), f"two shadow processes on GPU {gpu} at once"
                running[proc.pid] = gpu
                started.append((proc.pid, gpu))
                most = max(most, len(running))
            try:
                yield proc
            finally:
                with lock:
                    del running[proc.pid]
        assert proc.returncode is not None

    monkeypatch.setattr(procs, "attached_process", observed)

    @flow
    def fanout() -> dict:
        return run_lira_fanout(auto, LIRA, "shadow-rng-gpu")

    out = fanout()
    assert len({pid for pid, _ in started}) == len(started) == LIRA.n_shadows, "each shadow in a process of its own"
    assert {gpu for _, gpu in started} == {"0", "1"}
    assert most == 2, "the two GPUs train a shadow each at the same time, no more"
    assert len(out["shadows"]["real"]) == LIRA.n_shadows
    for i in range(LIRA.n_shadows):
        assert np.array_equal(audit._load_logits(run, "real", i, None)["logits"], alone[i]), f"shadow {i}"


def test_a_failed_shadow_process_names_the_shadow_its_gpu_and_the_error(cfg):
    from tasks.privacy import run_shadow_process

    bad = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"model": "no_such_model"})})
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"real shadow 2 on GPU 1 exited 1:\n(.|\n)*no_such_model"):
        run_shadow_process("real", bad, LIRA, 2, "1", on_line=lines.append)
    assert any("no_such_model" in line for line in lines)  # the process's output reached the caller's log
    assert not store_of(cfg).child(*LIRA_RUN).exists("logits", "real-002.npz")
