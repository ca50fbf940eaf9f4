"""The flows' parameter forms mirror the library config: a new config section that a form lacks would make every
child run (which receives the parent's whole config) fail validation, so it fails here first."""

from __future__ import annotations

from flows.params import _SECTIONS, ConfigParams, ShardGroupParams
from realfake.config import BuildConfig, load_config


def test_the_form_has_every_config_section() -> None:
    scalars = {"dataset", "version", "root", "device", "mode"}
    assert set(_SECTIONS) == set(BuildConfig.model_fields) - scalars
    assert set(_SECTIONS) | scalars <= set(ConfigParams.model_fields)


def test_a_child_run_rebuilds_the_parents_config_exactly(tmp_path) -> None:
    cfg = load_config(preset="demo", overrides=[f"root={tmp_path}", "synthesis.seed=7", "classifier.epochs=3"])
    child = ShardGroupParams(**ConfigParams().pinned(cfg), shard_names=["shard-000000"])
    assert child.to_config() == cfg


def test_the_library_imports_without_prefect() -> None:
    """realfake/ is the library the flows wrap: every module of it imports in a fresh interpreter without
    loading Prefect (the flows and tasks stay a thin layer over it)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, realfake\n"
        "mods = [m.name for m in pkgutil.walk_packages(realfake.__path__, 'realfake.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "print(len(mods), sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    count, loaded = out.stdout.strip().split(" ", 1)
    assert int(count) > 30 and loaded == "[]", out.stdout
