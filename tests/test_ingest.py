"""Ingest: manifest, deterministic split, class-name mapping, and bad input going to the rejects table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from realfake.config import SourceConfig
from realfake.data.ingest import ingest
from realfake.data.manifest import MANIFEST, REJECTS, read_manifest
from realfake.data.storage import Store


def _copy_subset(src: str, dst: Path, per_class: int = 5) -> Path:
    for cls in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    shutil.copy(Path(src) / "class_names.json", dst / "class_names.json")
    return dst


def test_manifest_rows_split_and_class_names(tmp_path, digits_folder):
    src = _copy_subset(digits_folder, tmp_path / "src", per_class=8)
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.25), store)
    assert (res.train, res.test, res.rejects) == (60, 20, 0)
    rows = read_manifest(store)
    assert {r.class_name for r in rows} == {f"digit {d}" for d in range(10)}
    assert all(r.label == int(r.sample_id.split("/")[0]) for r in rows)
    assert len({r.sha256 for r in rows}) == len(rows)
    # the split is a function of the seed, not of listing order: a second ingest gives the same rows
    store2 = Store(str(tmp_path / "v2"))
    ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.25), store2)
    assert store.read_table(*MANIFEST).equals(store2.read_table(*MANIFEST))


def test_presplit_folders_are_respected(tmp_path, digits_folder):
    src = tmp_path / "src"
    _copy_subset(digits_folder, src / "train", 3)
    _copy_subset(digits_folder, src / "test", 2)
    (src / "train" / "class_names.json").unlink()
    (src / "test" / "class_names.json").unlink()
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src)), store)
    assert (res.train, res.test) == (30, 20)
    assert {r.split for r in read_manifest(store, "test")} == {"test"}


def test_corrupt_image_and_empty_class_are_rejected_and_the_rest_ingested(tmp_path, digits_folder):
    src = _copy_subset(digits_folder, tmp_path / "src", per_class=4)
    (src / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated PNG
    (src / "4" / "empty.jpg").write_bytes(b"")
    (src / "5" / "notes.png").write_text("this is not an image")
    (src / "empty_class").mkdir()
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.25), store)
    rejects = store.read_table(*REJECTS).to_pylist()
    by_file = {Path(r["uri"]).name: r["reason"] for r in rejects}
    assert "not an image" in by_file["broken.png"]
    assert "empty file" in by_file["empty.jpg"]
    assert "not an image" in by_file["notes.png"]
    assert "empty class" in by_file["empty_class"]
    assert res.rejects == 4
    assert res.train + res.test == 40
    assert len(res.classes) == 10  # the empty class gets no label


def test_mapping_that_names_missing_folders_is_an_error(tmp_path, digits_folder):
    src = _copy_subset(digits_folder, tmp_path / "src", per_class=2)
    (src / "class_names.json").write_text(json.dumps({"0": "zero", "42": "forty-two"}))
    with pytest.raises(ValueError, match=r"class_names.json names classes with no folder: \['42'\]"):
        ingest(SourceConfig(kind="image_folder", uri=str(src)), Store(str(tmp_path / "v")))


def test_missing_source_folder_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="source.uri"):
        ingest(SourceConfig(kind="image_folder", uri=str(tmp_path / "nope")), Store(str(tmp_path / "v")))


def test_demo_sources_are_real_bundled_handwriting(tmp_path):
    from realfake.data.sources import write_demo_folder

    folder = write_demo_folder("demo_mnist", tmp_path / "mnist", 32)
    counts = {d.name: len(list(d.iterdir())) for d in folder.iterdir() if d.is_dir()}
    assert counts == {str(d): 500 for d in range(10)}
    names = json.loads((folder / "class_names.json").read_text())
    assert names["7"] == "digit 7"
