"""Secret redaction: credentials never reach logs, exception messages, artifacts or the dataset card.

realfake reads S3 and hub credentials from the standard places (environment variables, the AWS shared
credentials file, ``storage_options`` handed over by a Prefect block or the caller) and passes them only to
the clients that need them. Whatever text leaves the process goes through this module first:
:class:`RedactingFilter` masks known secret values (and secret-shaped strings such as ``hf_...`` tokens,
``AKIA...`` key ids, URL passwords and pre-signed URL signatures) in every log record, including its
traceback; :func:`install_log_redaction` applies it to every record of the process, whichever library logs
it; :func:`redact` masks a string, :func:`redact_exception` an exception's message in place (before the CLI prints
it or Prefect keeps it as a failed run's state message and result; :func:`redacting_errors` wraps a flow or task
function so, and :func:`exception_chain` walks the exceptions behind one), and :func:`scrub` a JSON-like object
before it is written to a card, a report or a Prefect artifact.
"""

from __future__ import annotations

import configparser
import functools
import inspect
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "RedactedError",
    "RedactingFilter",
    "exception_chain",
    "install_log_redaction",
    "is_secret_key",
    "redact",
    "redact_exception",
    "redacting_errors",
    "register_overrides",
    "register_secret",
    "register_storage_options",
    "scrub",
    "secret_values",
]

MASK = "***"
MIN_SECRET_LEN = 6  # shorter values would mask ordinary words; real keys and tokens are 20-1000 characters
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "PREFECT_API_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "MINIO_ROOT_PASSWORD",
    "MINIO_SECRET_KEY",
    "WANDB_API_KEY",
)
# Key names whose values are secrets (storage_options, client_kwargs, Prefect block fields, any config), matched on
# whole words of the name so that ``max_new_tokens`` or ``tokenizer`` are not taken for secrets.
_SECRET_WORDS = {"secret", "token", "password", "passwd", "pwd", "passphrase", "credential", "credentials", "apikey",
                 "sas", "signature", "auth", "authorization", "cookie", "privatekey", "bearer"}
_SECRET_PAIRS = {("access", "key"), ("api", "key"), ("private", "key"), ("account", "key"), ("secret", "key"),
                 ("connection", "string"), ("client", "secret")}
_EXACT_SECRET_KEYS = {"key", "pass"}  # s3fs: key= is the access key id, secret= the secret key
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Secret-shaped strings, masked even when their value was never registered.
_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face tokens
    re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[0-9A-Z]{16}\b"),  # AWS key ids
    re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)(?=@)"),  # user:password@ in URLs
    re.compile(
        r"(?i)((?:x-amz-(?:signature|security-token|credential)|signature|sig|token|access_token|api_key)=)[^&\s\"']+"
    ),
    re.compile(r"(?i)(authorization:\s*(?:bearer|basic|aws4-hmac-sha256)\s+)\S+"),
)
_lock = threading.Lock()
_registered: set[str] = set()
_file_cache: dict[str, tuple[float, frozenset[str]]] = {}


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a secret (``secret``, ``key``, ``token``, ``aws_secret_access_key``, ...)."""
    name = str(name).strip()
    if name.lower() in _EXACT_SECRET_KEYS:
        return True
    words = [w.lower() for w in _WORD.findall(name)]
    pairs = zip(words, words[1:], strict=False)
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in pairs)


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on, wherever it appears (e.g. a token read from a Prefect block)."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _registered.add(value)


def register_overrides(overrides: Iterable[str] | None) -> None:
    """Mask from now on the value of every ``section.field=value`` override whose dotted name holds a secret-like
    key (``storage.secret=...``): the configuration refuses it, and its message must not quote it."""
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep and any(is_secret_key(part) for part in key.strip().split(".")):
            register_secret(value.strip())


def _secret_leaves(obj: Any, under_secret_key: bool = False) -> Iterable[str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _secret_leaves(v, under_secret_key or is_secret_key(k))
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _secret_leaves(v, under_secret_key)
    elif under_secret_key and obj is not None and not isinstance(obj, bool):
        text = str(obj)
        if len(text) >= MIN_SECRET_LEN:
            yield text


def register_storage_options(storage_options: Mapping[str, Any] | None) -> None:
    """Mask every value stored under a secret-like key of ``storage_options`` (nested ``client_kwargs`` too)."""
    for v in _secret_leaves(storage_options or {}):
        register_secret(v)


def _aws_file_secrets() -> frozenset[str]:
    """Secrets of the AWS shared credentials file (``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``)."""
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path.home() / ".aws" / "credentials")
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return frozenset()
    cached = _file_cache.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError, OSError):
        return frozenset()
    values = frozenset(
        v.strip()
        for section in parser.sections()
        for k, v in parser.items(section)
        if is_secret_key(k) and len(v.strip()) >= MIN_SECRET_LEN
    )
    _file_cache[path] = (mtime, values)
    return values


def secret_values(storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Every secret value known now: the environment, the AWS credentials file, registered values and options."""
    values = {os.environ[n] for n in SECRET_ENV_VARS if len(os.environ.get(n, "")) >= MIN_SECRET_LEN}
    values |= _aws_file_secrets()
    with _lock:
        values |= _registered
    values.update(_secret_leaves(storage_options or {}))
    return values


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``text`` with every known secret and every secret-shaped string replaced by ``***``."""
    if not text:
        return text
    # longest first, so a secret that contains another is masked whole
    for v in sorted(secret_values(storage_options), key=len, reverse=True):
        if v in text:
            text = text.replace(v, MASK)
    for p in _PATTERNS:
        if p.groups == 0:
            text = p.sub(MASK, text)
        elif p.groups == 2:
            text = p.sub(lambda m: f"{m.group(1)}:{MASK}", text)
        else:
            text = p.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return text


def scrub(obj: Any, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A copy of a JSON-like object safe to publish: values under secret-like keys become ``***`` and
    every string is passed through :func:`redact`."""
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(k) and v not in (None, "", {}, []) and not isinstance(v, bool)
                    else scrub(v, storage_options)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v, storage_options) for v in obj]
    if isinstance(obj, str):
        return redact(obj, storage_options)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record's message, arguments and traceback; never drops a record.

    Attach it to handlers (``handler.addFilter``), or use :func:`install_log_redaction` to cover every record
    of the process. The traceback is rendered and masked here, because a formatter would otherwise render
    it later from the live exception, secrets included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_realfake_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not fit its format: keep it readable
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._realfake_redacted = True  # type: ignore[attr-defined]
        return True


_installed_factory: Any = None


def install_log_redaction() -> None:
    """Mask secrets in every log record created in this process from now on (idempotent).

    A filter on a logger does not see records of its child loggers, and handlers are added by others
    (Prefect, the CLI) at any time, so the filter runs in the log-record factory instead: every record is
    masked once, when it is created, before any handler or formatter sees it.
    """
    global _installed_factory
    with _lock:
        if _installed_factory is not None:
            return
        previous = logging.getLogRecordFactory()
        flt = RedactingFilter()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            flt.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed_factory = (factory, previous)


def uninstall_log_redaction() -> None:
    """Restore the log-record factory that :func:`install_log_redaction` replaced (tests)."""
    global _installed_factory
    with _lock:
        if _installed_factory is None:
            return
        factory, previous = _installed_factory
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)
        _installed_factory = None


class RedactedError(RuntimeError):
    """Stands for an exception whose message held a secret and could not be masked in place; the message names the
    original type."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (``__cause__`` and ``__context__``, followed to the end), each once: the
    original error of a wrapped one (a botocore error s3fs re-raises as OSError) is among them."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def redact_exception(exc: BaseException, storage_options: Mapping[str, Any] | None = None) -> BaseException:
    """``exc`` with every secret masked in its message, in place, with its type kept: its arguments, an OSError's
    file names, its notes, and the same for the exceptions it was raised from. What records it afterwards (the
    CLI, a Prefect state message, a pickled result, a logged traceback) sees ``***``; its text fields (notes, a
    :class:`~realfake.preflight.PreflightError`'s problems) too. An exception whose text cannot
    be changed in place is replaced by a :class:`RedactedError` carrying the masked text.
    """
    for e in exception_chain(exc):
        try:
            e.args = tuple(redact(a, storage_options) if isinstance(a, str) else a for a in e.args)
            if isinstance(e, OSError):
                for name in ("strerror", "filename", "filename2"):
                    if isinstance(getattr(e, name), str):
                        setattr(e, name, redact(getattr(e, name), storage_options))
            for name, value in list(vars(e).items()):  # __notes__, PreflightError.problems, ...: pickled with it
                if isinstance(value, str):
                    setattr(e, name, redact(value, storage_options))
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    setattr(e, name, [redact(v, storage_options) for v in value])
        except (AttributeError, TypeError):  # an exception type with read-only fields: checked below
            pass
    text = str(exc)
    clean = redact(text, storage_options)
    if clean == text:
        return exc
    return RedactedError(f"{type(exc).__name__}: {clean}")


_F = TypeVar("_F", bound=Callable[..., Any])


def redacting_errors(fn: _F) -> _F:
    """``fn`` with log redaction installed on its first call and its exceptions passed through
    :func:`redact_exception` on their way out: for Prefect flows and tasks (put it under ``@flow`` / ``@task``), whose
    failed state keeps the exception's message and the exception itself. The signature is kept (Prefect reads it).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install_log_redaction()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            clean = redact_exception(e)
            if clean is e:
                raise
            raise clean from None

    try:  # annotations resolved in fn's module: Prefect resolves string ones in the wrapper's, this module
        wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    except (NameError, TypeError, SyntaxError):
        pass
    return wrapper  # type: ignore[return-value]
