"""Planning across runs: which shards are still to write (resume, extend, overwrite) under which recipe.

The recipe the shards are made under is recorded beside them (``_recipe.json``, by :func:`plan_pending`) before
the first one, and committed shards made under another are never resumed or extended.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

from realfake.data.lease import VersionLease
from realfake.data.shards.index import committed_keys
from realfake.data.shards.reader import remove_partial_shards
from realfake.data.shards.records import RECIPE_FILE, ShardIntegrityError, ShardPlan, plan_shards
from realfake.data.storage import Store, io_retry
from realfake.recipe import RecipeMismatchError, canonical, mismatch_message, recipe_bytes, recipe_diff

__all__ = ["plan_pending", "read_recipe"]

log = logging.getLogger(__name__)


def plan_pending(
    store: Store,
    items: Sequence,
    key: Callable[[Any], str],
    max_count: int,
    mode: Literal["resume", "extend", "overwrite"] = "resume",
    prefix: str = "shard",
    folder: str = "synthetic",
    lease: VersionLease | None = None,
    recipe: dict[str, Any] | None = None,
    may_grow: Collection[str] = (),
    may_drop: bool = False,
    shards: Collection[str] | None = None,
) -> list[ShardPlan]:
    """The shards still to write for ``items``, given what the version already holds.

    Call once per run, under the lease, before the workers start; it also removes crash leftovers. A shard group
    of a running build passes its ``shards``: only their leftovers are removed, never the other groups' files in
    flight.

    - ``resume``: the committed shards must be exactly shards of ``plan_shards(items)``; returns the others,
      with the same names, so a resumed build ends byte-identical to an uninterrupted one.
    - ``extend``: as resume when nothing changed; when items were added (more images per class, new classes),
      returns new shards numbered after the last one holding only the items not yet committed. Committed
      shards are never touched.
    - ``overwrite``: deletes every shard, the index and the card, then plans everything; with a ``recipe``, only
      when the committed shards were made under another recipe or plan (a re-run of an interrupted overwrite
      resumes it).

    ``recipe`` (see :mod:`realfake.recipe`) is what the shards' content depends on. It is recorded in
    ``{folder}/_recipe.json`` before any shard of it is written (the same bytes from every worker of a build), and
    committed shards recorded under another recipe, or under none, are refused in ``resume`` and ``extend``.
    ``may_grow`` names the recipe fields only ``extend`` may change (:func:`~realfake.recipe.recipe_diff`), and
    then the items must hold the committed ones, as without a recipe. ``may_drop``: a committed shard may hold a
    subset of its planned items, in plan order (a quality gate dropped the rest, counted in the card).

    Raises:
        RecipeMismatchError: The committed shards were made under another recipe; the message names the fields
            that differ and how to overwrite them or write a new version.
        ValueError: With the fix in the message, when committed items are missing from ``items`` or (resume)
            when ``items`` changed since the version was written.
    """
    if lease is not None:
        lease.check()
    if mode not in ("resume", "extend", "overwrite"):
        raise ValueError(f"mode must be resume, extend or overwrite, got {mode!r}")
    full = plan_shards(items, max_count, prefix)
    if mode == "overwrite" and recipe is None:
        _remove_shards_and_card(store, folder)
        return full
    remove_partial_shards(store, folder, shards)
    done = committed_keys(store, folder)
    by_name = {p.name: p for p in full}
    consistent = all(n in by_name and _holds([key(i) for i in by_name[n].items], ks, may_drop)
                     for n, ks in done.items())
    recorded = read_recipe(store, folder) if recipe is not None else None
    if recipe is not None and done:
        if recorded is None:
            differ = ["no recipe recorded with them (written by an earlier realfake)"]
        else:  # only an extension may change the may_grow fields
            differ = recipe_diff(recorded, recipe, may_grow if mode == "extend" else ())
        if differ and mode != "overwrite":
            grows = recorded is not None and not recipe_diff(recorded, recipe, may_grow)
            raise RecipeMismatchError(mismatch_message(f"the {len(done)} committed shard(s) in {store.uri(folder)}",
                                                       differ, grows, posixpath.basename(store.root)))
        if differ or (mode == "overwrite" and not consistent):
            log.info("overwrite: deleting the %d committed shard(s) of %s (%s)", len(done), store.uri(folder),
                     "; ".join(differ) or "another plan")
            _remove_shards_and_card(store, folder)
            done, consistent, recorded = {}, True, None
    pending = _pending(store, items, key, max_count, mode, prefix, folder, full, done, consistent)
    if recipe is not None and (recorded is None or canonical(recorded) != canonical(recipe)):
        # before the first shard of this recipe commits; every worker of a build writes these same bytes
        target = store.child(folder)
        io_retry(lambda: target.write_bytes(recipe_bytes(recipe), RECIPE_FILE), f"write {target.uri(RECIPE_FILE)}")
    return pending


def _holds(planned: list[str], committed: list[str], may_drop: bool) -> bool:
    """Whether a committed shard holds what its plan says: exactly, or (``may_drop``) a subset in plan order."""
    if not may_drop:
        return planned == committed
    kept = set(committed)
    return len(kept) == len(committed) and [k for k in planned if k in kept] == committed


def _pending(store: Store, items: Sequence, key: Callable[[Any], str], max_count: int, mode: str, prefix: str,
             folder: str, full: list[ShardPlan], done: dict[str, list[str]], consistent: bool) -> list[ShardPlan]:
    """The body of :func:`plan_pending` once the committed shards are known (and the recipe accepted)."""
    if not done:
        return full
    if consistent:
        return [p for p in full if p.name not in done]
    done_keys = {k for ks in done.values() for k in ks}
    item_keys = {key(i) for i in items}
    missing = done_keys - item_keys
    if missing:
        raise ValueError(
            f"{len(missing)} committed image(s) of {store.uri(folder)} are not among the planned items "
            f"(e.g. {sorted(missing)[:3]}): the configuration changed; use mode='overwrite' (--set mode=overwrite) "
            "or a new version"
        )
    if mode == "resume":
        raise ValueError(
            f"the planned items of {store.uri(folder)} differ from its committed shards (images were added or "
            "max_count changed): use mode='extend' (--set mode=extend) to add the new images, or mode='overwrite' "
            "to rebuild"
        )
    pending = [i for i in items if key(i) not in done_keys]
    start = max(int(n.rsplit("-", 1)[1]) for n in done if n.rsplit("-", 1)[-1].isdigit()) + 1
    return plan_shards(pending, max_count, prefix, start=start)


def _remove_shards_and_card(store: Store, folder: str) -> None:
    io_retry(lambda: store.remove(folder, recursive=True), f"remove {store.uri(folder)}")
    io_retry(lambda: store.remove("dataset.json"), f"remove {store.uri('dataset.json')}")


def read_recipe(store: Store, folder: str = "synthetic") -> dict[str, Any] | None:
    """The recipe recorded with a version's shards (``{folder}/_recipe.json``, see :func:`plan_pending`), or None."""
    s = store.child(folder)
    try:
        raw = io_retry(lambda: s.read_bytes(RECIPE_FILE), f"read {s.uri(RECIPE_FILE)}")
    except FileNotFoundError:
        return None
    try:
        recipe = json.loads(raw)
    except ValueError as e:
        raise ShardIntegrityError(f"{s.uri(RECIPE_FILE)} is not valid JSON ({e})") from e
    if not isinstance(recipe, dict):
        raise ShardIntegrityError(f"{s.uri(RECIPE_FILE)} holds {type(recipe).__name__}, not a recipe (a mapping)")
    return recipe
