"""Which fields two nested configuration dicts disagree on, by dotted name (the UI tests' "changed that field only")."""

from __future__ import annotations


def differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted names of the leaves where ``a`` and ``b`` differ (a key missing on one side counts)."""
    out = set()
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out |= differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.add(f"{prefix}{k}")
    return out
