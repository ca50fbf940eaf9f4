"""The whole build through the library on a miniature config: shards, index, card, report, rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mini_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_with_bad_input(tmp_path_factory, digits_folder) -> str:
    """The digits folder, trimmed, plus a corrupt image and an empty class folder."""
    import shutil

    root = tmp_path_factory.mktemp("src")
    for cls in sorted(p for p in Path(digits_folder).iterdir() if p.is_dir()):
        (root / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:4]:
            shutil.copy(f, root / cls.name / f.name)
    shutil.copy(Path(digits_folder) / "class_names.json", root / "class_names.json")
    (root / "2" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "no_images_here").mkdir()
    return str(root)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_base, source_with_bad_input):
    from realfake.build import run_build

    cfg = mini_config(str(tmp_path_factory.mktemp("out")), tiny_base, source_with_bad_input)
    return cfg, run_build(cfg, compare_baseline=True, measure=True)


def test_versions_are_verified_and_complete(report):
    from realfake.build import baseline_config, store_of
    from realfake.data.card import verify_version
    from realfake.data.manifest import read_manifest
    from realfake.data.shards import read_index

    cfg, rep = report
    for c in (cfg, baseline_config(cfg)):
        store = store_of(c)
        assert verify_version(store) == []
        index = read_index(store).to_pylist()
        train = read_manifest(store, "train")
        # one synthetic image per real training image, each pointing at its source
        assert sorted(r["source_sample_id"] for r in index) == sorted(s.sample_id for s in train)
        card = json.loads(Path(store.path("dataset.json")).read_text())
        assert card["synthetic"]["num_images"] == len(train)
        assert sum(c["count"] for c in card["synthetic"]["classes"].values()) == len(train)
        assert card["rejects"]["total"] == 2  # the corrupt image and the empty class, in every version's card


def test_provenance_records_the_method(report):
    from realfake.build import baseline_config, store_of
    from realfake.data.shards import iter_synthetic

    cfg, _ = report
    _, _, meta = next(iter_synthetic(store_of(cfg)))
    assert meta["sampler"]["latent_prior"] is True and meta["sampler"]["visual_guidance"] is True
    assert meta["sampler"]["strength"] == 0.75 and meta["sampler"]["guidance_scale"] == 2.0
    assert meta["sampler"]["lora_scale"] == 0.5 and meta["adapter_hash"]
    # the authors' generate.py prompt and negative prompt (lines 283-285, 325): the defaults mini_config keeps
    assert meta["prompt"].startswith("photo of digit ") and meta["prompt"].endswith(", best quality")
    assert meta["negative_prompt"] == "distorted, unrealistic, blurry, out of frame, cropped, deformed"
    _, _, base_meta = next(iter_synthetic(store_of(baseline_config(cfg))))
    assert base_meta["sampler"]["latent_prior"] is False and base_meta["adapter_hash"] is None


def test_rejects_are_recorded_and_the_run_completed(report):
    from realfake.build import store_of

    cfg, rep = report
    rejects = store_of(cfg).read_table("real", "rejects.parquet").to_pylist()
    reasons = {Path(r["uri"]).name: r["reason"] for r in rejects}
    assert "not an image" in reasons["corrupt.png"]
    assert "empty class" in reasons["no_images_here"]
    assert rep["versions"]["realfake"]["prepare"]["rejects"] == 2


def test_report_has_the_three_measures_grid_and_locations(report):
    import math

    import numpy as np
    from PIL import Image

    from realfake.build import baseline_config, store_of
    from realfake.data.manifest import read_manifest
    from realfake.data.shards import read_index

    cfg, rep = report
    m = rep["measures"]
    assert set(m) == {"real", "baseline", "realfake"}

    def recorded_run(c, data: str) -> dict:
        """The metrics the version's own training run recorded (runs/{run}/metrics.json)."""
        s = store_of(c)
        (run,) = [r for r in s.listdir("runs") if s.exists("runs", r, "metrics.json")
                  and s.read_json("runs", r, "metrics.json")["metrics"]["data"] == data]
        return s.read_json("runs", run, "metrics.json")["metrics"]

    train = read_manifest(store_of(cfg), "train")
    for k, c, data, images in (("real", cfg, "real", len(train)),
                               ("baseline", baseline_config(cfg), "synthetic",
                                read_index(store_of(baseline_config(cfg))).num_rows),
                               ("realfake", cfg, "synthetic", read_index(store_of(cfg)).num_rows)):
        run = recorded_run(c, data)
        confusion = np.asarray(run["confusion"])
        # the measure is the recorded run's, and that run's top-1 is its confusion matrix's diagonal share
        assert m[k]["top1"] == run["top1"] == pytest.approx(np.trace(confusion) / confusion.sum())
        assert m[k]["train_images"] == run["train_images"] == images
        assert confusion.sum() == len(read_manifest(store_of(c), "test"))
    for k in ("baseline", "realfake"):
        assert 0.0 <= m[k]["label_fidelity"] <= 1.0
        assert math.isfinite(m[k]["mmd"]) and math.isfinite(m[k]["frechet"])
        assert m[k]["mmd"] >= -1e-6 and m[k]["frechet"] > 0  # synthetic images are not the real test images
    assert (m["baseline"]["mmd"], m["baseline"]["frechet"]) != (m["realfake"]["mmd"], m["realfake"]["frechet"])
    assert "(c) Real-Fake synthetic" in rep["table"] and "| synthesize |" in rep["table"]
    store = store_of(cfg)
    grid = Image.open(store.path("report", "grid.png"))
    assert grid.width > grid.height > 0
    assert store.exists("report", "report.md") and store.exists("runs")
    assert rep["locations"]["shards"]["realfake"].endswith("synthetic")


def test_rerun_regenerates_nothing(report):
    from realfake.build import build_version

    cfg, _ = report
    again = build_version(cfg)
    assert again["synthesis"]["shards_written"] == []
    assert all(a["skipped"] for a in again["adapters"])
    assert again["prepare"]["guidance"]["skipped"]


def test_a_measure_lost_after_the_real_classifier_restores_it_instead_of_training_it_again(report, monkeypatch):
    import realfake.build as build

    cfg, _ = report
    store = build.store_of(cfg)
    train_eval = build.train_eval

    def lost_on_synthetic(c, data="synthetic", *args, **kwargs):
        if data == "synthetic":  # the measure's node is lost once the real-trained classifier is done
            raise ConnectionError("node lost")
        return train_eval(c, data, *args, **kwargs)

    monkeypatch.setattr(build, "train_eval", lost_on_synthetic)
    with pytest.raises(ConnectionError):
        build.measure_versions({"realfake": cfg})
    (real_run,) = [r for r in store.listdir("runs") if r.startswith("real-")]
    first = store.read_json("runs", real_run, "metrics.json")["metrics"]
    assert first["resumed_from_epoch"] == 0 and store.exists("runs", real_run, "checkpoint")  # kept for a re-run

    monkeypatch.setattr(build, "train_eval", train_eval)
    measures = build.measure_versions({"realfake": cfg})
    again = store.read_json("runs", real_run, "metrics.json")["metrics"]
    assert again["resumed_from_epoch"] == cfg.classifier.epochs  # restored from its last checkpoint, not retrained
    assert (again["top1"], again["per_class"]) == (first["top1"], first["per_class"])
    assert measures["real"]["top1"] == first["top1"]
    assert not any(store.exists("runs", r, "checkpoint") for r in store.listdir("runs"))  # nothing left to resume


def test_measures_of_two_classifier_seeds_are_recorded_side_by_side(report):
    from realfake.build import measures_path, read_measures, write_measures

    cfg, _ = report
    other = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"seed": cfg.classifier.seed + 1})})
    write_measures(cfg, {"real": {"top1": 0.5}})
    write_measures(other, {"real": {"top1": 0.25}})  # a measure of another seed, at the same time: no overwrite
    assert read_measures(cfg) == {"real": {"top1": 0.5}} and read_measures(other) == {"real": {"top1": 0.25}}
    assert measures_path(cfg) != measures_path(other)
    assert measures_path(cfg)[:2] == ("runs", "measure") and measures_path(cfg)[-1] == "measures.json"
