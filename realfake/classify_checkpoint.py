"""Resumable checkpoints of classifier training (:func:`realfake.classify.train_classifier`).

A checkpoint folder holds one weights file, ``epoch-{N}.pt`` (model, optimizer, scheduler, gradient scaler and
every process's RNG states), and ``state.json``, the commit record naming it (:mod:`realfake.data.commit`: the
weights first, the record last, then what the record superseded is removed). The record also holds the epoch,
the optimiser updates, the train log, the world size and what the checkpoint is valid for: the recipe without its
execution fields, the number of classes and the images of one epoch over all processes. A run that differs in any
of them refuses the checkpoint, naming the fields; any number of processes may resume it.
"""

from __future__ import annotations

import io
import logging
import random
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from realfake.config import ClassifierConfig
from realfake.data.commit import CHECKPOINT_STATE, CommitError, read_record, sweep, write_payload, write_record
from realfake.data.storage import io_retry
from realfake.distributed import Ranks

if TYPE_CHECKING:
    from realfake.data.storage import Store

__all__ = ["CHECKPOINT_STATE", "EXECUTION_FIELDS", "Trainables", "commit_checkpoint", "open_store", "read_checkpoint",
           "recipe", "restore"]

log = logging.getLogger(__name__)

# Fields that change how a run is executed, not what it computes: a checkpoint stays valid across them. The
# accumulation is one of them for the same reason as the number of processes: the global batch is the recipe.
EXECUTION_FIELDS = {"workers", "checkpoint_every_epochs", "gradient_accumulation"}


def recipe(cfg: ClassifierConfig) -> dict[str, Any]:
    """What a checkpoint's weights depend on: the classifier config without :data:`EXECUTION_FIELDS`."""
    return cfg.model_dump(mode="json", exclude=EXECUTION_FIELDS)


class Trainables(NamedTuple):
    """The objects of a run whose states a checkpoint holds, besides every process's RNG states."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler
    scaler: torch.amp.GradScaler | None

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.net.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def open_store(checkpoint: Store | str | None) -> Store | None:
    """The checkpoint folder as a :class:`~realfake.data.storage.Store` (a path or URI is opened), or None."""
    from realfake.data.storage import Store

    if checkpoint is None or isinstance(checkpoint, Store):
        return checkpoint
    return Store(str(checkpoint))


def read_checkpoint(store: Store, cfg: ClassifierConfig, num_classes: int, images: int) -> dict[str, Any] | None:
    """The committed checkpoint in ``store`` (the ``state.json`` record, with the weights file it names loaded as
    ``payload``), or None; ``images`` is the epoch's image count over all processes."""
    try:
        state = read_record(store, CHECKPOINT_STATE)
    except CommitError as e:
        raise CommitError(f"{e}; remove {store.uri()} to start over") from e
    if state is None:
        return None
    wanted = {"recipe": recipe(cfg), "num_classes": num_classes, "train_images": images}
    saved = {k: state.get(k) for k in wanted}
    if saved != wanted:
        differ = sorted(
            f"classifier.{k}"
            for k in set(wanted["recipe"]) | set(saved["recipe"] or {})
            if (saved["recipe"] or {}).get(k) != wanted["recipe"].get(k)
        ) + [k for k in ("num_classes", "train_images") if saved[k] != wanted[k]]
        raise ValueError(
            f"the checkpoint at {store.uri()} was written for another training run (differs in: "
            f"{', '.join(differ)}); remove that folder to start over, or train under another run name"
        )
    try:
        data = io_retry(lambda: store.read_bytes(state["file"]), f"read {store.uri(state['file'])}")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store.uri(CHECKPOINT_STATE)} names {state['file']}, which is missing; remove {store.uri()} to start over"
        ) from None
    state["payload"] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state


def restore(payload: dict[str, Any], trainables: Trainables, ranks: Ranks, device: torch.device, seed: int) -> None:
    """Load a checkpoint's ``payload`` into the run: weights, optimizer, scheduler, scaler, and this process's RNG
    states when the checkpoint has as many processes; under another world size the data order is the same, only
    per-process draws (dropout) start anew, from ``seed``."""
    trainables.load_state_dict(payload)
    if len(payload["rng"]) == ranks.world:
        _set_rng_state(payload["rng"][ranks.rank], device)
    else:
        log.info("checkpoint of %d process(es) resumed by %d: reseeding per-process RNGs", len(payload["rng"]),
                 ranks.world)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def commit_checkpoint(store: Store, state: dict[str, Any], trainables: Trainables, ranks: Ranks,
                      device: torch.device) -> None:
    """Every process's RNG states gathered, then rank 0 commits: the weights file ``epoch-{N}.pt`` first,
    ``state.json`` naming it last (the record ``state`` plus ``file``), then what the commit superseded goes."""
    rng = [_rng_state(device)]
    if ranks.world > 1:
        rng = [None] * ranks.world
        dist.all_gather_object(rng, _rng_state(device))
    if ranks.rank != 0:
        return
    name = f"epoch-{state['epoch']:05d}.pt"
    buf = io.BytesIO()
    torch.save(trainables.state_dict(rng), buf)
    write_payload(store, buf.getvalue(), name)
    write_record(store, {**state, "file": name}, CHECKPOINT_STATE)
    sweep(store, {name, CHECKPOINT_STATE})
