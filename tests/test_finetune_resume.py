"""Fine-tune checkpoints: a killed run resumes on the trajectory of an uninterrupted one, with its whole history.

A run is killed by an error raised from inside the UNet's forward at a chosen step, the point where a preemption
or a crash stops a real run: whatever the run committed stays in the store. The resumed run must end with the
adapter an uninterrupted run ends with and a ``train_log.json`` holding every step once. A checkpoint whose commit
never happened (a step folder without its ``state.json``, here written for real by a refused upload to S3, or
planted on a local folder) is not used and is removed; a committed one whose files are damaged, or that was written
under another recipe, is refused with an error naming the checkpoint, the fields and what to do, and is kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import mini_config
from safetensors.torch import load as load_safetensors
from support.s3 import S3Env, S3Interceptor, moto, s3  # noqa: F401 - pytest fixtures

from realfake import build
from realfake.build import store_of
from realfake.data.manifest import GUIDANCE, MANIFEST
from realfake.finetune import WEIGHTS_NAME, CheckpointError, adapter_dir, finetune
from realfake.models.loading import load_sd_components

REPO = Path(__file__).resolve().parent.parent
CKPT = (*adapter_dir("all"), "checkpoint")


class Killed(RuntimeError):
    """The run dies here, in the middle of a step, as a preempted or crashed process does."""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base, digits_folder):
    """A prepared version (manifest, guidance); max_steps 6 with a checkpoint every 2 steps, flips, MMD, sampled
    latents and gradient clipping on. 30 training images at a global batch of 16: 2 steps per epoch, so a resume
    from step 4 starts an epoch, one from step 2 or 4 lands on an epoch's boundary and step 5 is mid-epoch."""
    cfg = mini_config(str(tmp_path_factory.mktemp("resume")), tiny_base, digits_folder, finetune__max_steps=6,
                      finetune__checkpoint_every=2, finetune__random_flip=True, finetune__batch_size=16,
                      finetune__max_grad_norm=0.05)
    build.prepare(cfg)
    return cfg


def _version(cfg, name: str, storage_options: dict | None = None, root: str | None = None, **finetune_over):
    """A new version holding the prepared manifest and guidance, with ``finetune`` fields overridden."""
    new = cfg.model_copy(update={"version": name, "root": root or cfg.root,
                                 "finetune": cfg.finetune.model_copy(update=finetune_over)})
    src, dst = store_of(cfg), store_of(new, storage_options)
    for rel in (MANIFEST, GUIDANCE):
        dst.write_bytes(src.read_bytes(*rel), *rel)
    return new, dst


def _train(cfg, store, kill_at_step: int | None = None, storage_options: dict | None = None):
    """Fine-tune with freshly loaded components; with ``kill_at_step``, die in the first UNet call of the
    ``kill_at_step``-th step this call runs (of step ``kill_at_step`` for a run that starts from scratch)."""
    comps = load_sd_components(cfg.models.base)
    if kill_at_step is None:
        return finetune(cfg, store, "all", components=comps, storage_options=storage_options)
    calls: list[int] = []
    first_call = (kill_at_step - 1) * cfg.finetune.gradient_accumulation + 1

    def die(module, args, kwargs):
        calls.append(1)
        if len(calls) == first_call:
            raise Killed(f"killed in step {kill_at_step}")

    comps["unet"].register_forward_pre_hook(die, with_kwargs=True)
    with pytest.raises(Killed):
        finetune(cfg, store, "all", components=comps, storage_options=storage_options)
    return None


def _adapter(store) -> dict[str, torch.Tensor]:
    return load_safetensors(store.read_bytes(*adapter_dir("all"), WEIGHTS_NAME))


def _steps(store) -> list[int]:
    return [h["step"] for h in store.read_json(*adapter_dir("all"), "train_log.json")["history"]]


def _assert_same_run(store, reference) -> None:
    """The adapter and the logged losses of ``store`` are those of the uninterrupted ``reference`` run."""
    weights, log = reference
    got = _adapter(store)
    assert got.keys() == weights.keys()
    assert any(bool(v.abs().max() > 0) for k, v in weights.items() if "lora_B" in k), "the adapter must have trained"
    for k in weights:
        torch.testing.assert_close(got[k], weights[k], rtol=1e-6, atol=1e-8)
    history = store.read_json(*adapter_dir("all"), "train_log.json")["history"]
    assert [h["step"] for h in history] == [h["step"] for h in log["history"]]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in log["history"]], rel=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    """``run(**finetune_over)``: adapter weights and train log of an uninterrupted run (each computed once)."""
    runs: dict[tuple, tuple[dict, dict]] = {}

    def run(**finetune_over):
        key = tuple(sorted(finetune_over.items()))
        if key not in runs:
            cfg, store = _version(prepared, f"reference-{len(runs)}", **finetune_over)
            _train(cfg, store)
            runs[key] = (_adapter(store), store.read_json(*adapter_dir("all"), "train_log.json"))
        return runs[key]

    return run


def test_a_killed_run_resumes_on_the_uninterrupted_trajectory_and_logs_each_step_once(prepared, uninterrupted):
    cfg, store = _version(prepared, "killed")
    _train(cfg, store, kill_at_step=5)
    # checkpoints of steps 2 and 4 were committed; the commit of step 4 removed the folder of step 2
    assert store.listdir(*CKPT) == ["state.json", "step-00000004"]
    state = store.read_json(*CKPT, "state.json")
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert not store.exists(*adapter_dir("all"), "train_log.json")

    result = _train(cfg, store)
    assert (result.resumed_from, result.steps) == (4, 6)
    _assert_same_run(store, uninterrupted())
    assert _steps(store) == [1, 2, 3, 4, 5, 6]
    assert not store.exists(*CKPT)  # removed once the adapter is final


def test_max_steps_may_grow_to_train_longer_from_the_checkpoint(prepared, uninterrupted):
    cfg, store = _version(prepared, "longer", max_steps=4)
    _train(cfg, store, kill_at_step=3)
    assert store.read_json(*CKPT, "state.json")["step"] == 2
    longer = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_steps": 6})})
    result = _train(longer, store)
    assert result.resumed_from == 2
    _assert_same_run(store, uninterrupted())  # the first steps of a longer run are those of a shorter one


def test_execution_settings_may_change_across_a_resume(prepared):
    """Smaller micro-batches with more accumulation (the out-of-memory advice), another checkpoint interval and no
    latent cache resume the checkpoint: they change how steps run, not the recipe."""
    cfg, store = _version(prepared, "execution")
    _train(cfg, store, kill_at_step=3)
    split = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={
        "gradient_accumulation": 2, "checkpoint_every": 3, "cache_latents": False})})
    result = _train(split, store)
    assert result.resumed_from == 2
    assert _steps(store) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("committed", [True, False], ids=["after-a-commit", "before-any-commit"])
def test_a_step_folder_without_its_commit_is_ignored_and_removed(prepared, uninterrupted, committed):
    """What a crash part-way through a checkpoint leaves: a newer step folder with a partial adapter and no
    optimiser file, which no ``state.json`` names."""
    cfg, store = _version(prepared, f"torn-{committed}")
    if committed:
        _train(cfg, store, kill_at_step=3)  # step 2 committed
    store.write_bytes(os.urandom(1000), *CKPT, "step-00000004", "adapter.safetensors")
    kept = ["state.json", "step-00000002"] if committed else []
    assert store.listdir(*CKPT) == [*kept, "step-00000004"]

    _train(cfg, store, kill_at_step=1)  # opens the checkpoint, then dies in the first step it runs
    assert store.listdir(*CKPT) == kept  # the torn folder is gone, the committed checkpoint stays
    result = _train(cfg, store)
    assert result.resumed_from == (2 if committed else 0)
    _assert_same_run(store, uninterrupted())


class RefuseCommit(S3Interceptor):
    """An S3 gateway that refuses the upload of the checkpoint's ``state.json`` of one step (403): the run dies
    between the step folder's uploads and its commit."""

    def __init__(self, upstream_port: int, step: int) -> None:
        super().__init__(upstream_port)
        self.step, self.refused = step, 0

    def decide(self, method: str, path: str, body: bytes):
        if method == "PUT" and path.split("?")[0].endswith("/checkpoint/state.json") and \
                f'"step": {self.step}'.encode() in body:
            self.refused += 1
            return "before", (403, "AccessDenied", "refused by the test gateway")
        return "pass", None


@pytest.mark.s3
def test_on_s3_a_checkpoint_whose_commit_failed_is_not_resumed(prepared, uninterrupted, s3: S3Env):  # noqa: F811
    from support.s3 import s3_options

    gateway = RefuseCommit(int(s3.endpoint_url.rsplit(":", 1)[1]), step=4).start()
    try:
        refused_opts = s3_options(gateway.endpoint_url, botocore_retries=0)
        cfg, store = _version(prepared, "s3-torn", refused_opts, root=s3.root)
        with pytest.raises(OSError, match="state.json"):
            _train(cfg, store)
    finally:
        gateway.stop()
    assert gateway.refused >= 1
    store = store_of(cfg, s3.storage_options)
    # both files of step 4 were uploaded; only the commit is missing
    assert store.listdir(*CKPT) == ["state.json", "step-00000002", "step-00000004"]
    assert store.listdir(*CKPT, "step-00000004") == ["adapter.safetensors", "trainer.pt"]
    assert store.read_json(*CKPT, "state.json")["step"] == 2

    result = _train(cfg, store)
    assert result.resumed_from == 2
    _assert_same_run(store, uninterrupted())
    assert not store.exists(*CKPT)


@pytest.fixture(scope="module")
def checkpointed(prepared):
    """A version killed in step 3, holding the committed checkpoint of step 2, and components to call with."""
    cfg, store = _version(prepared, "checkpointed")
    _train(cfg, store, kill_at_step=3)
    return cfg, store, load_sd_components(cfg.models.base)


def _snapshot(store) -> dict[str, bytes]:
    root = Path(store.local_path(*CKPT))
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("section", "update", "expected"), [
    ("finetune", {"rank": 8}, "finetune.rank: 4 in the checkpoint, 8 now"),
    ("finetune", {"alpha": 8.0}, "finetune.alpha: 4.0 in the checkpoint, 8.0 now"),
    ("finetune", {"learning_rate": 1e-3}, "finetune.learning_rate: 0.0001 in the checkpoint, 0.001 now"),
    ("finetune", {"batch_size": 8}, "finetune.batch_size: 16 in the checkpoint, 8 now"),
    ("finetune", {"max_grad_norm": None}, "finetune.max_grad_norm: 0.05 in the checkpoint, None now"),
    ("finetune", {"latents": "mean"}, "finetune.latents: 'sample' in the checkpoint, 'mean' now"),
    ("finetune", {"crop": "center"}, "finetune.crop: 'random' in the checkpoint, 'center' now"),
    ("finetune", {"resolution": 16}, "finetune.resolution: 32 in the checkpoint, 16 now"),
    ("finetune", {"seed": 1}, "finetune.seed: 0 in the checkpoint, 1 now"),
    ("finetune", {"mmd_weight": 0.0}, "finetune.mmd_weight: 0.003 in the checkpoint, 0.0 now"),
    ("finetune", {"mmd_kernel": "rbf"}, "finetune.mmd_kernel: 'linear' in the checkpoint, 'rbf' now"),
    ("models", {"base": "another/base"}, "models.base (weights fingerprint): "),
    ("guidance", {"enabled": False}, "data.guidance_sha256: "),
    ("synthesis", {"prompt_template": "a {class_name}"}, "synthesis.prompt_template: "),
])
def test_a_checkpoint_of_another_recipe_is_refused_naming_the_field(checkpointed, section, update, expected):
    cfg, store, comps = checkpointed
    before = _snapshot(store)
    other = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=update)})
    with pytest.raises(CheckpointError) as err:
        finetune(other, store, "all", components=comps)
    message = str(err.value)
    assert expected in message
    assert f"checkpoint at {store.uri(*CKPT)} (step 2)" in message
    assert f"Delete {store.uri(*CKPT)}" in message and "restore the checkpoint's values" in message
    assert _snapshot(store) == before  # kept whole, nothing discarded


def test_a_checkpoint_past_max_steps_is_refused(checkpointed):
    cfg, store, comps = checkpointed
    shorter = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_steps": 1})})
    with pytest.raises(CheckpointError, match=r"at step 2, past this run's 1 steps \(finetune.epochs=100, "
                                              r"finetune.max_steps=1\): raise finetune.max_steps \(or finetune.epochs\)"
                                              r" to at least 2 steps"):
        finetune(shorter, store, "all", components=comps)


def test_a_checkpoint_of_other_training_images_is_refused(checkpointed, prepared):
    cfg, store, comps = checkpointed
    fewer, other = _version(prepared, "fewer-images")
    table = pq.read_table(other.path(*MANIFEST))
    ids = sorted(r["sample_id"] for r in table.to_pylist() if r["split"] == "train")
    pq.write_table(table.filter(pc.not_equal(table["sample_id"], ids[0])), other.path(*MANIFEST))
    shutil.copytree(store.local_path(*CKPT), other.local_path(*CKPT))
    n = len(ids)
    with pytest.raises(CheckpointError, match=rf"data.images: {n} in the checkpoint, {n - 1} now.*data.images_sha256"):
        finetune(fewer, other, "all", components=comps)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_committed_checkpoint_with_damaged_files_is_not_used(prepared, damage):
    cfg, store = _version(prepared, f"damaged-{damage}")
    _train(cfg, store, kill_at_step=3)
    state = store.read_json(*CKPT, "state.json")
    victim = (*CKPT, state["folder"], "trainer.pt" if damage == "missing" else "adapter.safetensors")
    if damage == "missing":
        store.remove(*victim)
    else:
        store.write_bytes(store.read_bytes(*victim)[:-100], *victim)
    comps = load_sd_components(cfg.models.base)
    with pytest.raises(CheckpointError, match=rf"names {store.uri(*victim)} .*which "
                                              rf"{'is missing' if damage == 'missing' else 'holds'}.*Delete "):
        finetune(cfg, store, "all", components=comps)
    assert store.exists(*CKPT, "state.json")


@pytest.mark.parametrize(("state", "expected"), [
    (b'{"step": 2}', r"records no recipe or folder .*delete .*checkpoint to train this adapter from scratch"),
    (b"\x00\xff not json", r"state.json is not valid JSON .*delete .*checkpoint to train this adapter from scratch"),
], ids=["earlier-layout", "not-json"])
def test_a_state_record_that_cannot_be_checked_is_refused(prepared, state, expected):
    """The layout of earlier releases (``state.json`` holds only the step, next to files it cannot vouch for), or a
    record that is not JSON: refused, and kept."""
    cfg, store = _version(prepared, f"unreadable-{len(state)}")
    store.write_bytes(state, *CKPT, "state.json")
    store.write_bytes(b"weights", *CKPT, "adapter.safetensors")
    with pytest.raises(CheckpointError, match=expected):
        finetune(cfg, store, "all", components=load_sd_components(cfg.models.base))
    assert store.exists(*CKPT, "adapter.safetensors")


@pytest.mark.slow
def test_two_processes_resume_one_checkpoint_from_the_same_step(prepared, uninterrupted, tmp_path):
    """torchrun, 2 CPU processes (gloo): rank 0 opens the checkpoint and removes a torn folder, both resume from its
    step and end where one uninterrupted process ends (MMD off: then the processes' steps are those of one)."""
    cfg, store = _version(prepared, "ddp", mmd_weight=0.0)
    _train(cfg, store, kill_at_step=3)
    store.write_bytes(b"partial", *CKPT, "step-00000004", "adapter.safetensors")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "realfake.cli", "finetune", "--config", str(config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.count("resuming adapter all from step 2") == 2  # both ranks
    log = store.read_json(*adapter_dir("all"), "train_log.json")
    assert log["processes"] == 2 and log["resumed_from"] == 2
    assert _steps(store) == [1, 2, 3, 4, 5, 6]
    weights, _ = uninterrupted(mmd_weight=0.0)
    got = _adapter(store)
    for k in weights:
        torch.testing.assert_close(got[k], weights[k], rtol=1e-4, atol=1e-6)
