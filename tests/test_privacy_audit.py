"""The privacy audits end to end on the miniature config: LiRA over real shadow pipelines, copy detection.

Everything runs the real code path: shadow versions are derived, fine-tuned, synthesized, finalized and verified
with the tiny random models of ``conftest``; classifiers are real (tiny) timm networks. Checks are on what the
audit must guarantee whatever the (random) models learn: the membership plan, the derived versions, the shape and
range of every metric, files that decode, resumption, and copy detection finding duplicates planted among the
synthetic images.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from realfake.build import build_version, store_of
from realfake.config import ShardConfig
from realfake.data.card import verify_version
from realfake.data.loaders import RealImages
from realfake.data.manifest import GUIDANCE, read_manifest
from realfake.data.shards import ShardWriter, SyntheticRecord, make_key
from realfake.privacy.audit import (
    COPY_RUN,
    LIRA_RUN,
    CopyDetectionConfig,
    LiraConfig,
    PrivacyConfig,
    derive_shadow_version,
    plan_lira,
    run_copy_detection,
    run_lira,
    run_real_shadow,
    shadow_config,
    shadow_membership,
)
from realfake.privacy.lira import tpr_key
from tests.conftest import mini_config

N_SHADOWS = 4


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_base, digits_folder):
    # Two training images per class (20 in all), one fine-tuning step: the audit's cost is N x the pipeline's.
    return mini_config(str(tmp_path_factory.mktemp("privacy")), tiny_base, digits_folder,
                       source__max_per_class=2, finetune__max_steps=1)


@pytest.fixture(scope="module")
def lira_cfg():
    return LiraConfig(n_shadows=N_SHADOWS, split_seed=3)


@pytest.fixture(scope="module")
def lira_result(cfg, lira_cfg):
    return run_lira(cfg, PrivacyConfig(lira=lira_cfg))


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_plan_draws_halves_where_every_image_has_in_and_out_shadows(cfg, lira_cfg):
    plan = plan_lira(cfg, lira_cfg)
    samples, mask = shadow_membership(cfg, lira_cfg)
    assert plan["n_train"] == len(samples) == 20 and mask.shape == (N_SHADOWS, 20)
    assert (mask.sum(axis=0) == N_SHADOWS // 2).all()  # Carlini's split: each image IN for exactly half
    table = store_of(cfg).child(*LIRA_RUN).read_table("membership.parquet").to_pylist()
    assert [r["sample_id"] for r in table] == [s.sample_id for s in samples]
    assert all(sorted(r["shadow_in"]) == np.flatnonzero(mask[:, j]).tolist() for j, r in enumerate(table))
    assert plan["shadow_versions"] == [f"v1-shadow{i}" for i in range(N_SHADOWS)]


def test_derived_shadow_version_holds_exactly_its_half(cfg, lira_cfg, tmp_path):
    from realfake.data.storage import Store

    plan_lira(cfg, lira_cfg)
    parent = store_of(cfg)
    samples, mask = shadow_membership(cfg, lira_cfg)
    half = [samples[j].sample_id for j in np.flatnonzero(mask[1])]
    shadow = Store(str(tmp_path / "shadow"))
    counts = derive_shadow_version(parent, shadow, half)
    assert counts == {"train": len(half), "test": len(read_manifest(parent, "test"))}
    assert [s.sample_id for s in read_manifest(shadow, "train")] == sorted(half)
    assert shadow.read_table(*GUIDANCE).column("sample_id").to_pylist() == sorted(half)
    assert derive_shadow_version(parent, shadow, half) == counts  # a re-run checks, never rewrites
    other = [samples[j].sample_id for j in np.flatnonzero(~mask[1])]
    with pytest.raises(ValueError, match="already holds another training half"):
        derive_shadow_version(parent, shadow, other)
    with pytest.raises(ValueError, match="not training images"):
        derive_shadow_version(parent, Store(str(tmp_path / "bad")), ["no-such-image.png"])


def test_shadow_config_changes_version_and_seeds_only(cfg):
    s = shadow_config(cfg, 2)
    assert s.version == "v1-shadow2" and s.finetune.seed == cfg.finetune.seed + 2
    assert s.classifier.seed == cfg.classifier.seed + 2
    assert s.synthesis == cfg.synthesis and s.models == cfg.models and s.source == cfg.source


@pytest.mark.slow
def test_lira_writes_a_well_formed_report_for_both_families(cfg, lira_result):
    rows = lira_result["metrics"]
    assert set(rows) == {f"{fam}-trained ({mode})" for fam in ("real", "synthetic") for mode in ("online", "offline")}
    for m in rows.values():
        assert 0.0 <= m["auc"] <= 1.0 and 0.5 <= m["balanced_accuracy"] <= 1.0
        for level in (0.001, 0.01):
            assert 0.0 <= m[tpr_key(level)] <= 1.0
    run = store_of(cfg).child(*LIRA_RUN)
    md = run.read_bytes("lira_results.md").decode()
    assert "TPR @ 0.1% FPR" in md and all(f"| {name} |" in md for name in rows)
    assert all(f"| {name} |" in lira_result["table"] for name in rows)
    roc = _png(run.read_bytes("lira_roc.png"))
    assert roc.format == "PNG" and roc.width > 200
    results = run.read_json("lira_results.json")
    assert results["settings"]["n_shadows"] == N_SHADOWS and results["settings"]["n_train"] == 20
    # Leave-one-model-out: every shadow is a target once, over all 20 images.
    assert all(t["n_members"] + t["n_nonmembers"] == N_SHADOWS * 20 for t in results["targets"].values())
    for fam in ("real", "synthetic"):
        accs = lira_result["shadow_test_top1"]
        assert 0.0 <= accs[fam] <= 1.0
        for i in range(N_SHADOWS):
            assert run.exists("logits", f"{fam}-{i:03d}.npz")


@pytest.mark.slow
def test_synthetic_shadows_are_verified_versions_built_from_their_half(cfg, lira_cfg, lira_result):
    samples, mask = shadow_membership(cfg, lira_cfg)
    for i, summary in enumerate(lira_result["shadows"]["synthetic"]):
        shadow = store_of(shadow_config(cfg, i))
        assert verify_version(shadow) == []
        half = {samples[j].sample_id for j in np.flatnonzero(mask[i])}
        assert {s.sample_id for s in read_manifest(shadow, "train")} == half
        card = shadow.read_json("dataset.json")
        assert card["synthetic"]["num_images"] == len(half) == summary["synthetic_images"]
        sources = {r["source_sample_id"] for r in shadow.read_table("synthetic", "index.parquet").to_pylist()}
        assert sources == half  # synthesized from its own half, never from the held-out images


@pytest.mark.slow
def test_finished_shadows_are_reused_and_scores_are_reproducible(cfg, lira_cfg, lira_result, monkeypatch):
    from realfake import build
    from realfake.privacy import audit

    # nothing is retrained or rebuilt: the stages that would do it fail the test if called
    def must_not_run(what):
        def refuse(*args, **kwargs):
            raise AssertionError(f"a finished shadow was redone ({what})")
        return refuse

    monkeypatch.setattr(audit, "_train_and_score", must_not_run("classifier trained"))
    for stage in ("finetune", "synthesize", "finalize"):
        monkeypatch.setattr(build, stage, must_not_run(f"build.{stage}"))
    assert run_real_shadow(cfg, lira_cfg, 0)["skipped"] is True
    again = run_lira(cfg, PrivacyConfig(lira=lira_cfg))
    assert again["metrics"] == lira_result["metrics"]


@pytest.fixture(scope="module")
def planted(cfg):
    """The built version plus one shard holding an exact and a lightly augmented copy of two real images."""
    build_version(cfg)
    store = store_of(cfg)
    real = RealImages(store, "train")
    exact_i, aug_i = 3, 14
    exact = real[exact_i][0]
    aug = ImageEnhance.Brightness(real[aug_i][0]).enhance(0.9)
    aug = aug.crop((1, 1, aug.width - 1, aug.height - 1)).resize(exact.size, Image.BICUBIC)
    records = [
        SyntheticRecord(make_key(real.labels[i], f"planted-{kind}", 0), real.labels[i],
                        real.class_names[real.labels[i]], img,
                        {"source_sample_id": real.samples[i].sample_id, "replica": 0})
        for kind, i, img in (("exact", exact_i, exact), ("augmented", aug_i, aug))
    ]
    ShardWriter(store, ShardConfig(format="webdataset", image_format="png")).write_shard("shard-900000", records)
    return {"exact": (records[0].key, real.samples[exact_i].sample_id),
            "augmented": (records[1].key, real.samples[aug_i].sample_id)}


@pytest.mark.slow
def test_copy_detection_finds_planted_exact_and_augmented_duplicates(cfg, planted):
    copy = CopyDetectionConfig(top_k=3, n_pairs=8)  # default descriptor: the build's own (tiny) CLIP model
    report = run_copy_detection(cfg, PrivacyConfig(copy_detection=copy))
    run = store_of(cfg).child(*COPY_RUN)
    top1 = {r["syn_id"]: r for r in run.read_table("copy_neighbours.parquet").to_pylist() if r["rank"] == 0}
    exact_key, exact_src = planted["exact"]
    aug_key, aug_src = planted["augmented"]
    assert top1[exact_key]["real_id"] == exact_src and top1[exact_key]["similarity"] > 0.999
    assert top1[aug_key]["real_id"] == aug_src
    assert report["closest_pairs"][0]["syn_id"] == exact_key
    assert report["n_synthetic"] == 22 and report["n_real"] == 20 and report["k"] == 3
    assert report["n_above_threshold"] >= 1 and 0 < report["share_above_threshold"] <= 1
    assert 0.0 <= report["share_nearest_is_source"] <= 1.0 and report["chance"] == pytest.approx(1 / 20)
    assert len(run.read_table("copy_neighbours.parquet")) == 22 * 3
    for name in ("copy_similarity_hist.png", "copy_closest_pairs.png"):
        assert _png(run.read_bytes(name)).format == "PNG"
    assert run.read_json("copy_detection.json")["share_nearest_is_source"] == report["share_nearest_is_source"]


def test_copy_detection_refuses_a_version_without_synthetic_images(tmp_path, tiny_base, digits_folder):
    cfg = mini_config(str(tmp_path), tiny_base, digits_folder)
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        run_copy_detection(cfg, PrivacyConfig())


def test_lira_needs_four_shadows():
    with pytest.raises(ValueError, match="n_shadows"):
        LiraConfig(n_shadows=2)
