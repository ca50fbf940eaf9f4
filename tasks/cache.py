"""Content keys for the expensive, deterministic stages, and the retry condition for transient faults.

Captions, guidance embeddings and LoRA adapters depend only on the real data, the model weights and the
stage recipe, so Prefect caches them by a key built from exactly those: the manifest hash (or, before
ingest, a listing of the source), the model id + revision fingerprint, and the stage's config section.
The version URI is part of every key because outputs live inside the version: the same inputs written to
another version are another set of files. A run id never is, so a re-run with the same inputs hits.
Retries are for faults that may pass (network, storage, preemption); a bad config or bad data fails at once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext

from realfake.config import BuildConfig
from realfake.data.storage import version_store

__all__ = [
    "TRANSIENT_RETRY",
    "finetune_cache_key",
    "is_transient",
    "prepare_cache_key",
    "retry_on_transient",
    "source_fingerprint",
    "stage_key",
]

_KEY_SCHEMA = 1  # bump when the meaning of a stage's outputs changes, to invalidate old cache entries


def stage_key(stage: str, parts: dict[str, Any]) -> str:
    """A stable hex key of a stage name and JSON-serialisable parts."""
    blob = json.dumps({"stage": stage, "schema": _KEY_SCHEMA, **parts}, sort_keys=True, default=str)
    return f"realfake-{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _model_id(model_id: str, revision: str | None) -> str:
    # Local folders are hashed by content; hub ids by id@revision. Imported here because it pulls in torch.
    from realfake.models.loading import model_fingerprint

    try:
        return model_fingerprint(model_id, revision)
    except Exception:  # an unreachable model is reported by the stage itself, with context
        return f"{model_id}@{revision or 'main'}"


def source_fingerprint(cfg: BuildConfig) -> str:
    """Hash of what the prepare stage reads: the source recipe, and for an image folder its file listing.

    The listing (relative path + size) is what ingest scans anyway; the bundled demo sets are fully
    described by their recipe. Class-name files are hashed by content: a renamed class can keep the file's size,
    and a prepare skipped then would leave the old names in the manifest (and in every prompt).
    """
    h = hashlib.sha256(json.dumps(cfg.source.model_dump(mode="json"), sort_keys=True).encode())
    if cfg.source.kind == "image_folder" and cfg.source.uri:
        import posixpath

        import fsspec

        from realfake.data.class_names import CLASS_NAME_FILES
        from realfake.data.storage import resolve_storage_options

        options = resolve_storage_options(cfg.storage)
        fs, root = fsspec.core.url_to_fs(cfg.source.uri, **options)
        for path, info in sorted(fs.find(root, detail=True).items()):
            h.update(f"{path[len(root):]}\t{info.get('size')}\n".encode())
            if posixpath.basename(path) in CLASS_NAME_FILES:
                h.update(hashlib.sha256(fs.cat_file(path)).digest())
        if cfg.source.class_names:
            names_fs, names_path = fsspec.core.url_to_fs(cfg.source.class_names, **options)
            if names_fs.exists(names_path):  # a missing one is the stage's error to report
                h.update(hashlib.sha256(names_fs.cat_file(names_path)).digest())
    return h.hexdigest()


def _cfg(parameters: dict[str, Any]) -> BuildConfig:
    cfg = parameters["cfg"]
    return cfg if isinstance(cfg, BuildConfig) else BuildConfig.model_validate(cfg)


def prepare_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Key of the prepare task: source listing + captioner / CLIP fingerprints + their configs + version."""
    cfg = _cfg(parameters)
    return stage_key(
        "prepare",
        {
            "version": version_store(cfg.root, cfg.dataset, cfg.version).uri(),
            "source": source_fingerprint(cfg),
            "caption": cfg.caption.model_dump(mode="json"),
            "guidance": cfg.guidance.model_dump(mode="json"),
            "captioner": (
                _model_id(cfg.models.captioner, cfg.models.captioner_revision) if cfg.caption.enabled else None
            ),
            "clip": _model_id(cfg.models.clip, cfg.models.clip_revision) if cfg.guidance.enabled else None,
        },
    )


def finetune_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Key of one adapter: manifest hash + base / CLIP fingerprints + the recipe that shapes it + scope.

    Returns None (no caching) when the version has no manifest yet: the stage will fail with that message.
    """
    from realfake.build import store_of
    from realfake.data.manifest import manifest_hash

    cfg = _cfg(parameters)
    store = store_of(cfg)
    try:
        mhash = manifest_hash(store)
    except FileNotFoundError:
        return None
    return stage_key(
        "finetune",
        {
            "version": store.uri(),
            "manifest": mhash,
            "scope": parameters.get("scope", "all"),
            "base": _model_id(cfg.models.base, cfg.models.base_revision),
            "clip": _model_id(cfg.models.clip, cfg.models.clip_revision) if cfg.guidance.enabled else None,
            "captioner": cfg.models.captioner if cfg.caption.enabled else None,
            "finetune": cfg.finetune.model_dump(mode="json"),
            "guidance": cfg.guidance.model_dump(mode="json"),
            "caption": cfg.caption.model_dump(mode="json"),
            "prompt": cfg.synthesis.prompt_template,
        },
    )


def is_transient(exc: BaseException) -> bool:
    """True for faults a retry may cure: I/O, network, timeouts, a lost or preempted device."""
    from realfake.config import ConfigError
    from realfake.data.lease import LeaseHeldError, LeaseLostError
    from realfake.data.storage import is_transient_io

    # a bad config, another build holding the version: only a person can fix these
    if isinstance(exc, ConfigError | ValueError | TypeError | KeyError | LeaseHeldError | LeaseLostError):
        return False
    if is_transient_io(exc):  # the storage layer's one test (a full disk, a missing file: not transient)
        return True
    # CUDA faults after a preemption / ECC event surface as RuntimeError with these words.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in ("cuda error", "nccl", "connection", "timed out"))


def retry_on_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception is what we classify
        return is_transient(exc)
    return False


# The retry policy of every stage task: twice, after 10 s then 60 s, and only for transient faults.
TRANSIENT_RETRY = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": retry_on_transient}
