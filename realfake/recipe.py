"""Recipes: what a stage's output depends on, field by field, and how two recipes differ.

A recipe is a flat JSON-able dict keyed by the config field (``synthesis.steps``) or the data (``class names``,
``adapters``) that sets each value; its values are scalars or flat dicts. A stage records the recipe with its
output (a fine-tune checkpoint, a version's synthetic shards) and compares it before reusing that output: any
difference is reported by :func:`recipe_diff` as one phrase per field, so a refusal names every field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from realfake.data.manifest import MANIFEST
from realfake.data.storage import Store

__all__ = [
    "RecipeMismatchError",
    "canonical",
    "manifest_class_map",
    "mismatch_message",
    "recipe_bytes",
    "recipe_diff",
    "suggest_version",
]

_SHOWN = 3  # entries of a dict field listed in a difference; the rest are counted


class RecipeMismatchError(ValueError):
    """Output a stage would reuse or extend was made under another recipe; the message names the fields that
    differ and the two ways out (rebuild it, or write a new version)."""


def canonical(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` as it reads back from JSON (tuples as lists, int dict keys as strings), for comparisons."""
    return json.loads(json.dumps(recipe, sort_keys=True))


def recipe_bytes(recipe: Mapping[str, Any]) -> bytes:
    """The recorded form of a recipe: sorted keys, so the same recipe always gives the same bytes."""
    return json.dumps(canonical(recipe), indent=1, sort_keys=True, ensure_ascii=False).encode()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


def _dict_diff(field: str, old: Mapping[str, Any], new: Mapping[str, Any], growing: bool) -> str | None:
    keys = sorted(set(old) | set(new), key=lambda k: (len(k), k))  # label order for numeric keys
    changed = [f"{k}: {_short(old[k])} -> {_short(new[k])}" for k in keys if k in old and k in new
               and old[k] != new[k]]
    removed = [f"{k}: {_short(old[k])}" for k in keys if k not in new]
    added = [] if growing else [f"{k}: {_short(new[k])}" for k in keys if k not in old]
    if not (changed or removed or added):
        return None
    parts = []
    if changed:
        parts.append(f"{len(changed)} of {len(keys)} differ ({_entries(changed)})")
    if removed:
        parts.append(f"{len(removed)} no longer present ({_entries(removed)})")
    if added:
        parts.append(f"{len(added)} new ({_entries(added)})")
    return f"{field}: {'; '.join(parts)}"


def recipe_diff(recorded: Mapping[str, Any], current: Mapping[str, Any], may_grow: Collection[str] = ()
                ) -> list[str]:
    """One phrase per field whose value differs, ``field: recorded -> current``, in the current recipe's order.

    A dict field lists how many of its entries differ and the first few, e.g. ``class names: 3 of 10 differ
    (0: 'n01440764' -> 'tench', ...)``. Fields in ``may_grow`` are those an extension of the output may change:
    a dict field there may gain entries (not change or lose any), a scalar one may take any value.
    """
    old, new = canonical(recorded), canonical(current)
    out = []
    for field in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            phrase = _dict_diff(field, a, b, field in may_grow)
            if phrase:
                out.append(phrase)
        elif field not in may_grow:
            shown = lambda v, present: _short(v) if present else "(not recorded)"  # noqa: E731
            out.append(f"{field}: {shown(a, field in old)} -> {shown(b, field in new)}")
    return out


def manifest_class_map(store: Store) -> dict[str, str]:
    """Label -> class name of a version's manifest (every split), labels as strings in label order: the class map
    a version's synthetic images are made with."""
    t = store.read_table(*MANIFEST).select(["label", "class_name"])
    pairs = dict(zip(t.column("label").to_pylist(), t.column("class_name").to_pylist(), strict=True))
    return {str(k): pairs[k] for k in sorted(pairs)}


def mismatch_message(what: str, differ: list[str], grows: bool, version: str) -> str:
    """The one-line refusal of output made under another recipe: what it is, each field that differs, and the ways
    out (extend it when the differences only add images, rebuild it, or write a new version)."""
    fix = "Add the new images to this version (mode=extend, e.g. --set mode=extend), rebuild them all " if grows \
        else "Rebuild them with this one "
    return (f"{what} were made under another recipe: {'; '.join(differ)}. {fix}(mode=overwrite, e.g. --set "
            f"mode=overwrite, deletes them) or write a new version (e.g. --set version={suggest_version(version)})")


def suggest_version(version: str) -> str:
    """A new version name to offer in a refusal: ``v1`` -> ``v2``, ``run-3b`` -> ``run-3b-2``."""
    head = version.rstrip("0123456789")
    return f"{head}{int(version[len(head):]) + 1}" if head != version else f"{version}-2"
