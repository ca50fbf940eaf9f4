"""Quality: per-class KID against a hand computation, a planted mislabelled class flagged in the card, the card's
per-class table through ``inspect`` and back, and the regeneration gates inside the shard writer's path (every
first attempt failing, exactly-once across a kill)."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mini_config

from realfake.quality import diversity, kid, parse_quality_table


# --------------------------------------------------------------------------------------------------------
# Measures against hand computations
# --------------------------------------------------------------------------------------------------------
def _kid_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (sum(float(ai) * float(bi) for ai, bi in zip(a, b, strict=True)) / d + 1.0) ** 3

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_kid_matches_a_hand_computation_with_its_standard_error() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3))
    y = rng.normal(loc=0.7, size=(6, 3))
    # one block: the plain unbiased estimate, no standard error
    value, se = kid(x, y, subsets=1)
    assert value == pytest.approx(_kid_by_hand(x, y), rel=1e-12)
    assert se is None
    # three blocks of contiguous rows (x: 3, 3, 2 rows; y: 2, 2, 2): mean and std / sqrt(3) of the three estimates
    blocks = [_kid_by_hand(x[a:b], y[c:e]) for (a, b), (c, e) in zip([(0, 3), (3, 6), (6, 8)],
                                                                     [(0, 2), (2, 4), (4, 6)], strict=True)]
    value, se = kid(x, y, subsets=3)
    assert value == pytest.approx(sum(blocks) / 3, rel=1e-12)
    mean = sum(blocks) / 3
    assert se == pytest.approx(math.sqrt(sum((b - mean) ** 2 for b in blocks) / 2) / math.sqrt(3), rel=1e-10)
    # more blocks than pairs allow: capped so each block holds 2 images of each set
    assert kid(x, y, subsets=50) == kid(x, y, subsets=3)
    with pytest.raises(ValueError, match="at least 2"):
        kid(x[:1], y)


def test_diversity_is_one_minus_the_mean_pairwise_cosine() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [float(u[i] @ u[j]) for i, j in itertools.permutations(range(5), 2)]
    assert diversity(x) == pytest.approx(1 - sum(pairs) / len(pairs), rel=1e-12)
    assert diversity(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# A version with a planted mislabelled class
# --------------------------------------------------------------------------------------------------------
def _measured_config(root: str, base: str, digits: str, **over):
    return mini_config(root, base, digits, source={"kind": "image_folder", "uri": digits, "max_per_class": 30,
                                                   "test_fraction": 0.25},
                       guidance__enabled=False, finetune__enabled=False,
                       classifier__epochs=12, classifier__batch_size=32, classifier__lr=0.1,
                       quality={"enabled": True, "judge": "classifier", "worst_examples": 3, "kid_subsets": 4,
                                **over})


def _planted_version(cfg, mislabelled: int, shown: int):
    """The version's real train images written back as its 'synthetic' images (each from itself), except that every
    image labelled ``mislabelled`` shows the next real image of class ``shown``."""
    from realfake.build import prepare, store_of
    from realfake.data.manifest import load_real_image, read_manifest
    from realfake.data.shards import ShardWriter, SyntheticRecord, make_key, plan_shards

    prepare(cfg)
    store = store_of(cfg)
    train = read_manifest(store, "train")
    others = itertools.cycle([s for s in train if s.label == shown])
    records = []
    for s in sorted(train, key=lambda s: (s.label, s.sample_id)):
        image = load_real_image(next(others) if s.label == mislabelled else s, 32)
        records.append(SyntheticRecord(make_key(s.label, s.sample_id, 0), s.label, s.class_name, image,
                                       {"source_sample_id": s.sample_id, "replica": 0}))
    names = sorted({(s.label, s.class_name) for s in train})
    writer = ShardWriter(store, cfg.shards, class_names=[n for _, n in names])
    for plan in plan_shards(records, cfg.shards.max_count):
        writer.write_shard(plan.name, list(plan.items))
    return store


@pytest.mark.slow
def test_a_planted_mislabelled_class_is_flagged_in_the_card_and_survives_inspect(tmp_path: Path, tiny_base: str,
                                                                                 digits_folder: str) -> None:
    from realfake.data.card import inspect_version, read_card, verify_version, write_card
    from realfake.quality import measure_quality

    cfg = _measured_config(str(tmp_path / "out"), tiny_base, digits_folder)
    store = _planted_version(cfg, mislabelled=2, shown=7)
    section = measure_quality(cfg, store)
    write_card(store, cfg.model_dump(mode="json"), {}, quality=section)
    assert verify_version(store) == []
    card = read_card(store)
    q = card["quality"]
    classes = q["classes"]
    assert "2" in q["flagged"], q["flagged"]
    assert any("label agreement" in f for f in classes["2"]["flags"])
    assert classes["2"]["agreement"] < cfg.quality.flag_agreement
    # the planted class is the one farthest from its real counterpart, and the least recognisable
    assert q["order"][0] == "2", [(k, classes[k]["kid"]) for k in q["order"]]
    assert min(classes, key=lambda k: classes[k]["agreement"]) == "2"
    # the others are recognised as well as the real held-out images of their class (same judge, same pictures)
    good = [k for k in classes if k != "2"]
    assert np.mean([classes[k]["agreement"] for k in good]) > 0.6
    # each image's scores, keyed like the index, and counts that add up
    import pyarrow.parquet as pq

    scores = pq.read_table(store.path("quality", "scores.parquet")).to_pylist()
    assert len(scores) == card["synthetic"]["num_images"] == sum(r["count"] for r in classes.values())
    assert {r["key"] for r in scores} == {r["key"] for r in pq.read_table(store.path("synthetic", "index.parquet"))
                                          .select(["key"]).to_pylist()}
    # every synthetic image here IS its source (but class 2's): similarity 1 to its own source
    own = [r["source_similarity"] for r in scores if r["label"] != 2]
    assert min(own) > 0.999
    assert all(r["dropped"] == 0 and r["regenerated"] == 0 for r in classes.values())
    assert store.exists("quality", "worst.png")

    # the per-class table printed by inspect reads back as the card's numbers, in the card's order
    text = inspect_version(store)
    rows = parse_quality_table(text)
    assert list(rows) == q["order"]
    for k, row in rows.items():
        c = classes[k]
        assert row["class"] == c["class_name"] and row["count"] == c["count"]
        assert row["agree"] == pytest.approx(c["agreement"], abs=5e-5)
        assert row["KID"] == pytest.approx(c["kid"], abs=5e-7)
        assert row["KID se"] == pytest.approx(c["kid_se"], abs=5e-7)
        assert row["FID"] == pytest.approx(c["fid"], abs=5e-5)
        assert row["near-dup"] == c["near_duplicates"]
    assert "flagged:" in text and "- 2 " in text


# --------------------------------------------------------------------------------------------------------
# Gates: regenerate before the commit, exactly once
# --------------------------------------------------------------------------------------------------------
def _gated_config(root: str, base: str, digits: str, **over):
    """Every first attempt fails: no image of a barely trained judge gets probability 1.0 for its class."""
    quality = {"enabled": True, "judge": "classifier", "min_label_agreement": 1.0, "attempts": 2, **over}
    return mini_config(root, base, digits, finetune__enabled=False, shards__max_count=8, quality=quality)


def _shard_bytes(store) -> dict[str, bytes]:
    from realfake.data.shards import committed_shards

    return {f.path: store.read_bytes("synthetic", f.path) for c in committed_shards(store) for f in c.files}


@pytest.mark.slow
def test_a_gate_every_first_attempt_fails_regenerates_each_image_once_with_the_next_seed(
        tmp_path: Path, tiny_base: str, digits_folder: str) -> None:
    from realfake.build import finalize, prepare, store_of, synthesize
    from realfake.data.card import verify_version
    from realfake.data.shards import iter_synthetic
    from realfake.quality import gate_recipe
    from realfake.synthesize import image_seed, plan_work

    cfg = _gated_config(str(tmp_path / "out"), tiny_base, digits_folder)
    prepare(cfg)
    store = store_of(cfg)
    planned = plan_work(cfg, store)
    out = synthesize(cfg)
    gate = out["quality_gate"]
    assert gate["regenerated"] == {"1": len(planned)} and gate["failed_last_attempt"] == len(planned)
    assert gate["dropped"] == 0 and gate["scored"] == 2 * len(planned)
    finalize(cfg)
    assert verify_version(store) == []
    metas = {m["key"]: m for _, _, m in iter_synthetic(store)}
    assert sorted(metas) == sorted(w.key for w in planned)  # exactly the planned images, each once (kept on fail)
    for w in planned:
        m = metas[w.key]
        assert m["quality"]["attempt"] == 1 and m["quality"]["passed"] is False
        assert m["seed"] == image_seed(cfg.version, w.sample_id, w.replica, cfg.synthesis.seed, 1)
        assert m["seed"] != image_seed(cfg.version, w.sample_id, w.replica, cfg.synthesis.seed)
        assert 0.0 <= m["quality"]["label_agreement"] < 1.0
    # the gate is in the recipe; measuring alone is not (an ungated version's shards and recipe stay as they were)
    assert gate_recipe(cfg)["quality.min_label_agreement"] == 1.0
    measure_only = cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"min_label_agreement": None})})
    assert gate_recipe(measure_only) == {}


def _kill_after_first_commit(root: str, base: str, digits: str, marker: str) -> None:
    """The child of the kill test: a gated synthesize that SIGKILLs itself once it has seen its first commit."""
    from realfake.build import synthesize

    def on_shard(name: str, n: int, seconds: float) -> None:
        Path(marker).write_text(name)
        os.kill(os.getpid(), signal.SIGKILL)

    synthesize(_gated_config(root, base, digits), on_shard=on_shard)


@pytest.mark.slow
def test_a_killed_gated_build_resumes_exactly_once_and_byte_identical(tmp_path: Path, tiny_base: str,
                                                                     digits_folder: str) -> None:
    from realfake.build import finalize, prepare, store_of, synthesize
    from realfake.data.card import verify_version
    from realfake.data.shards import committed_shards, iter_synthetic
    from realfake.synthesize import plan_work

    cfg = _gated_config(str(tmp_path / "killed"), tiny_base, digits_folder)
    prepare(cfg)
    store = store_of(cfg)
    marker = tmp_path / "committed"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_quality as t; "
            f"t._kill_after_first_commit(*{[cfg.root, tiny_base, digits_folder, str(marker)]!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = marker.read_text()
    assert [c.name for c in committed_shards(store)] == [first]  # killed right after its first observed commit
    out = synthesize(cfg)  # the resume: the other shards only, gates and all
    assert first not in out["shards_written"] and len(out["shards_written"]) == out["shards_total"] - 1
    finalize(cfg)
    assert verify_version(store) == []
    keys = [m["key"] for _, _, m in iter_synthetic(store)]
    assert sorted(keys) == sorted(w.key for w in plan_work(cfg, store))  # every planned image exactly once

    # an uninterrupted gated build of the same version in two shard groups (two engines): the same bytes
    other = _gated_config(str(tmp_path / "whole"), tiny_base, digits_folder)
    prepare(other)
    names = [c.name for c in committed_shards(store)]
    synthesize(other, shard_names=names[::2])
    synthesize(other, shard_names=names[1::2])
    assert _shard_bytes(store_of(other)) == _shard_bytes(store)


# --------------------------------------------------------------------------------------------------------
# The CLIP judge: zero-shot against the generation prompts, from a full checkpoint only
# --------------------------------------------------------------------------------------------------------
def _tiny_full_clip(folder: Path) -> str:
    """A random-weight CLIPModel (text and vision towers, projections) saved like openai/clip-vit-large-patch14."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from realfake.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(folder)
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_auto_judges_with_clip_only_when_the_checkpoint_has_a_text_tower(tmp_path: Path, tiny_base: str,
                                                                         digits_folder: str) -> None:
    from realfake.build import prepare, store_of
    from realfake.data.loaders import RealImages
    from realfake.quality import judge_kind, load_judge

    clip = _tiny_full_clip(tmp_path / "clip")
    cfg = mini_config(str(tmp_path / "out"), tiny_base, digits_folder, guidance__enabled=False,
                      quality={"enabled": True, "judge_model": clip})
    assert judge_kind(cfg) == "clip"
    vision_only = cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"judge_model": None})})
    assert judge_kind(vision_only) == "classifier"  # the tiny base's clip/ is a vision tower, as the demo's
    prepare(cfg)
    store = store_of(cfg)
    judge = load_judge(cfg, store)
    assert judge.kind == "clip" and "photo of" in judge.name
    images = [RealImages(store, "train")[i][0] for i in range(5)]
    probs, feats = judge.score(images)
    classes = len({s.label for s in RealImages(store, "train").samples})
    assert probs.shape == (5, classes) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert feats.shape == (5, 16) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
