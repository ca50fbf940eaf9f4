"""Tests of realfake.data.card: the dataset card, verify (each kind of damage is found) and inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from test_shards import CLASSES, items_for, mini_build

from realfake.config import ShardConfig
from realfake.data.card import inspect_version, read_card, verify_version, write_card
from realfake.data.shards import COMMITS_DIR, LEASE_FILE, committed_shards
from realfake.data.storage import Store, version_store


@pytest.fixture
def built(tmp_path: Path) -> Store:
    store = version_store(str(tmp_path / "out"), "toy", "v1")
    manifest = pa.table(
        {
            "sample_id": [f"r{i}" for i in range(6)],
            "split": ["train"] * 4 + ["test"] * 2,
            "label": pa.array([0, 1, 2, 2, 0, 1], pa.int32()),
            "class_name": [CLASSES[i] for i in (0, 1, 2, 2, 0, 1)],
        }
    )
    store.write_table(manifest, "real", "manifest.parquet")
    store.write_table(pa.table({"uri": ["a", "b"], "reason": ["unreadable", "too small"]}), "real", "rejects.parquet")
    mini_build(store, items_for(3), ShardConfig(format="webdataset", max_count=4))
    return store


def test_card_records_config_versions_counts_checksums_and_rejects(built: Store) -> None:
    card = read_card(built)
    assert card["config"]["dataset"] == "toy" and card["versions"]["pyarrow"] == pa.__version__
    syn = card["synthetic"]
    assert syn["num_images"] == 9 and syn["num_shards"] == 3 and syn["format"] == "webdataset"
    assert {k: v["count"] for k, v in syn["classes"].items()} == {"0": 3, "1": 3, "2": 3}
    assert syn["classes"]["1"]["class_name"] == "square"
    assert [s["sha256"] for s in card["shards"]] == [c.sha256 for c in committed_shards(built)]
    assert card["real"]["splits"]["train"] == {"0": 1, "1": 1, "2": 2}
    assert card["rejects"] == {"total": 2, "by_reason": {"too small": 1, "unreadable": 1}}
    assert card["stats"] == {"written": 3}


def test_verify_passes_on_a_whole_version_given_as_uri(built: Store) -> None:
    assert verify_version(built.uri()) == []


def _flip(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_verify_finds_a_corrupted_shard(built: Store) -> None:
    _flip(built.path("synthetic", "shard-000001.tar"), 800)
    problems = verify_version(built)
    assert any("shard-000001" in p and "sha256" in p for p in problems), problems


def test_verify_finds_a_missing_shard_file(built: Store) -> None:
    Path(built.path("synthetic", "shard-000002.tar")).unlink()
    assert any("shard-000002" in p and "missing" in p for p in verify_version(built))


def test_verify_finds_index_rows_that_disagree_with_the_shards(built: Store) -> None:
    t = built.read_table("synthetic", "index.parquet")
    built.write_table(t.slice(1), "synthetic", "index.parquet")
    problems = verify_version(built)
    assert any("no index row" in p for p in problems)
    assert any("index sha256" in p for p in problems)
    labels = t.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 3
    built.write_table(
        t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int32())),
        "synthetic",
        "index.parquet",
    )
    assert any("disagree with their shard" in p for p in verify_version(built))


def test_verify_finds_card_counts_that_differ(built: Store) -> None:
    card = read_card(built)
    card["synthetic"]["classes"]["0"]["count"] = 4
    card["synthetic"]["num_images"] = 10
    built.write_json(card, "dataset.json")
    problems = verify_version(built)
    assert any("per-class counts" in p for p in problems) and any("num_images 10" in p for p in problems)


def test_verify_finds_leftovers_missing_card_and_a_live_lease(built: Store) -> None:
    Path(built.path("synthetic", "shard-000009.tar")).write_bytes(b"partial")
    Path(built.path("dataset.json")).unlink()
    built.write_json({"owner": "x"}, LEASE_FILE)
    problems = verify_version(built)
    assert any("uncommitted" in p and "shard-000009.tar" in p for p in problems)
    assert any(p.startswith("card:") for p in problems)
    assert any("lease" in p for p in problems)


def test_verify_finds_an_unreadable_commit_record(built: Store) -> None:
    Path(built.path("synthetic", COMMITS_DIR, "shard-000000.json")).write_text("{not json")
    assert any("unreadable" in p for p in verify_version(built))


def test_wds_info_must_list_the_committed_shards(built: Store) -> None:
    info = json.loads(Path(built.path("synthetic", "_info.json")).read_text())
    info["splits"]["train"]["shard_lengths"][0] += 1
    Path(built.path("synthetic", "_info.json")).write_text(json.dumps(info))
    assert any("_info.json" in p for p in verify_version(built))


def test_inspect_prints_card_and_per_class_counts(built: Store) -> None:
    text = inspect_version(built.uri())
    assert "dataset toy version v1" in text and "9 images in 3 webdataset shard(s)" in text
    lines = {ln.split()[1]: ln.split()[2:] for ln in text.splitlines() if ln.strip()[:1].isdigit()}
    assert lines["triangle"] == ["3", "2"] and lines["circle"] == ["3", "1"]
    assert "rejected inputs: 2" in text


def test_write_card_on_an_empty_version_and_inspect_of_a_missing_card(tmp_path: Path) -> None:
    store = version_store(str(tmp_path), "toy", "v2")
    card = write_card(store, {"dataset": "toy", "version": "v2"}, {})
    assert card["synthetic"]["num_images"] == 0 and card["shards"] == []
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        inspect_version(version_store(str(tmp_path), "toy", "v3"))


def test_verify_reports_the_same_problems_whatever_the_number_of_workers(built: Store) -> None:
    """Shards are checked several at a time; the findings are merged in commit order, so the report of a version
    damaged in several shards is the same list, in the same order, with one worker or four."""
    _flip(built.path("synthetic", "shard-000000.tar"), 800)  # an image byte: sha256 and image checksum
    Path(built.path("synthetic", "shard-000002.tar")).unlink()
    Path(built.path("synthetic", "_index", "shard-000001.parquet")).unlink()
    serial = verify_version(built, workers=1)
    assert any("shard-000000" in p and "sha256" in p for p in serial)
    assert any("shard-000002" in p and "missing" in p for p in serial)
    assert any("shard-000001" in p and "index part" in p for p in serial)
    for _ in range(3):
        assert verify_version(built, workers=4) == serial
    assert verify_version(built) == serial
    with pytest.raises(ValueError, match="workers must be at least 1"):
        verify_version(built, workers=0)


def test_verify_command_exits_non_zero_listing_each_problem(built: Store) -> None:
    from typer.testing import CliRunner

    from realfake.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", built.uri()])
    assert ok.exit_code == 0 and ok.output.strip() == f"OK {built.uri()}"
    _flip(built.path("synthetic", "shard-000001.tar"), 800)
    Path(built.path("synthetic", "shard-000002.tar")).unlink()
    bad = runner.invoke(app, ["verify", built.uri(), "--workers", "2"])
    assert bad.exit_code == 1
    fails = [ln for ln in bad.output.splitlines() if ln.startswith("FAIL ")]
    assert any("shard-000001" in ln and "sha256" in ln for ln in fails), bad.output
    assert any("shard-000002" in ln and "missing" in ln for ln in fails), bad.output
    assert runner.invoke(app, ["verify", built.uri(), "--workers", "0"]).exit_code == 2  # refused by the option
