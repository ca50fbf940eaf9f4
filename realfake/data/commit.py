"""Payload first, record last: the one commit primitive of shards and checkpoints.

Every durable output of realfake is written the same way. The payload files go first, each written whole
(:meth:`Store.write_bytes`: temp file + rename on a local disk, one whole-object put on an object store). Then a
small JSON *record* naming them with their size and sha256 is written: that write is the commit. A reader trusts
only what a record names, so a crash between the two leaves files that nothing names, which :func:`sweep` removes
on the next run. Shard commits (``_commits/{name}.json``), fine-tuning checkpoints and classifier checkpoints
(:data:`CHECKPOINT_STATE`) are all records of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from realfake.data.storage import Store, io_retry

__all__ = ["CHECKPOINT_STATE", "CommitError", "Payload", "PayloadError", "check_payload", "read_record", "sweep",
           "write_payload", "write_record"]

log = logging.getLogger(__name__)
CHECKPOINT_STATE = "state.json"  # a checkpoint folder's commit record (fine-tune and classifier alike)


class CommitError(ValueError):
    """A record that cannot be read, or that names a payload which is missing or not the recorded bytes."""


class PayloadError(CommitError):
    """A payload a record names that is missing (``found`` is "is missing") or is not the recorded bytes."""

    def __init__(self, uri: str, found: str) -> None:
        super().__init__(f"{uri} {found}")
        self.uri, self.found = uri, found


@dataclass(frozen=True)
class Payload:
    """One committed file: its path relative to the store, its size and its sha256 (hex)."""

    path: str
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def write_payload(store: Store, data: bytes, *parts: str, durable: bool = True) -> Payload:
    """Write one payload file whole (retried on transient errors) and describe it for the record."""
    io_retry(lambda: store.write_bytes(data, *parts, durable=durable), f"write {store.uri(*parts)}")
    return Payload("/".join(parts), len(data), hashlib.sha256(data).hexdigest())


def write_record(store: Store, record: Mapping[str, Any], *parts: str, durable: bool = True, indent: int = 2) -> None:
    """The commit: the record JSON, written whole after every payload it names (retried on transient errors).
    ``indent`` only keeps each record kind's bytes as they always were (shard commit records use 1)."""
    data = json.dumps(record, indent=indent, sort_keys=True, default=str).encode()
    io_retry(lambda: store.write_bytes(data, *parts, durable=durable), f"write {store.uri(*parts)}")


def read_record(store: Store, *parts: str) -> dict[str, Any] | None:
    """The record at ``parts``; None when nothing was committed. :class:`CommitError` when it is not a JSON object."""
    try:
        record = store.read_json(*parts)
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or not text at all
        raise CommitError(f"{store.uri(*parts)} is not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise CommitError(f"{store.uri(*parts)} holds {type(record).__name__}, not a commit record")
    return record


def check_payload(store: Store, payload: Payload) -> bytes:
    """The payload's bytes, read whole; :class:`PayloadError` when missing or not the recorded size and sha256."""
    try:
        data = io_retry(lambda: store.read_bytes(payload.path), f"read {store.uri(payload.path)}")
    except FileNotFoundError:
        raise PayloadError(store.uri(payload.path), "is missing") from None
    if len(data) != payload.bytes or hashlib.sha256(data).hexdigest() != payload.sha256:
        raise PayloadError(store.uri(payload.path), f"holds {len(data)} bytes that are not the recorded ones")
    return data


def sweep(store: Store, keep: Collection[str], *folder: str) -> list[str]:
    """Remove every entry directly under ``folder`` whose name is not in ``keep`` (what no record names)."""
    removed = []
    for name in store.listdir(*folder):
        if name not in keep:
            log.info("removing %s: no commit record names it", store.uri(*folder, name))
            where = store.uri(*folder, name)
            io_retry(lambda name=name: store.remove(*folder, name, recursive=True), f"remove {where}")
            removed.append(name)
    return removed
