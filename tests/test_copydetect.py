"""Tests of copy detection (realfake.privacy.copydetect): blocked search, descriptors, planted copies, report."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from realfake.data.storage import Store
from realfake.privacy.config import CopyDetectionConfig
from realfake.privacy.copydetect import (
    FALLBACK_QUANTILE,
    SSCD_THRESHOLD,
    build_descriptor,
    clip_descriptor,
    copy_report,
    embed_images,
    is_torchscript_file,
    l2_normalize,
    nearest_real,
    resolve_descriptor_kind,
    sscd_descriptor,
    timm_descriptor,
)

torch.set_num_threads(1)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, d)))


# -- blocked search --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n", "k", "block"), [(37, 101, 5, 8), (10, 3, 5, 2), (64, 200, 1, 1000), (5, 9, 9, 4)])
def test_nearest_real_equals_brute_force(m, n, k, block):
    rng = np.random.default_rng(m * n + k)
    syn, real = _unit(rng, m, 16), _unit(rng, n, 16)
    sims, idx = nearest_real(syn, real, k=k, block=block)
    full = syn @ real.T
    expect_idx = np.argsort(-full, axis=1, kind="stable")[:, : min(k, n)]
    assert sims.shape == idx.shape == (m, min(k, n))
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, expect_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expect_idx, axis=1), atol=1e-6)


def test_nearest_real_rejects_mismatched_descriptors():
    with pytest.raises(ValueError, match="same d"):
        nearest_real(np.zeros((2, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least one real"):
        nearest_real(np.zeros((2, 4)), np.zeros((0, 4)))


# -- images and descriptors ------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A random 'photo': a smooth colour field with a few filled shapes on it."""
    im = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        w, h = (int(v) for v in rng.integers(6, size // 3, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return im


def _light_copy(im: Image.Image) -> Image.Image:
    """A lightly edited copy: ~7% crop resized back, brightness/contrast jitter, JPEG at quality 70."""
    w, h = im.size
    out = im.crop((3, 2, w - 2, h - 3)).resize((w, h), Image.BILINEAR)
    out = Image.fromarray(np.clip(np.asarray(out, dtype=np.float32) * 1.08 + 6, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


class _Thumbnail(torch.nn.Module):
    """A classic near-duplicate descriptor: the zero-mean 8x8 grey thumbnail (robust to light edits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.nn.functional.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), 8).flatten(1)
        return g - g.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    """A TorchScript descriptor file, loaded through the same code path as the SSCD model."""
    path = tmp_path_factory.mktemp("sscd") / "thumbnail.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; SSCD ships in it
        torch.jit.script(_Thumbnail()).save(str(path))
    return path


def _sscd(path, size=64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sscd_descriptor(path, size=size)


def test_planted_copies_rank_first_and_cross_the_threshold(torchscript_file, tmp_path):
    rng = np.random.default_rng(0)
    real = [_scene(rng) for _ in range(200)]
    unrelated = [_scene(rng) for _ in range(100)]
    syn = unrelated[:40] + [real[5]] + unrelated[40:70] + [_light_copy(real[17])] + unrelated[70:]
    exact_at, edited_at = 40, 71
    desc = _sscd(torchscript_file)
    assert desc.resize == "short_side" and desc.name == "sscd:thumbnail.torchscript.pt"
    syn_emb, real_emb = embed_images(syn, desc, batch_size=16), embed_images(real, desc, batch_size=64)

    threshold = 0.9
    store = Store(str(tmp_path / "run"))
    report = copy_report(
        syn_emb,
        real_emb,
        store,
        threshold=threshold,
        k=3,
        syn_ids=[f"syn-{i:03d}" for i in range(len(syn))],
        real_ids=[f"real-{j:03d}" for j in range(len(real))],
        syn_images=syn,
        real_images=lambda j: real[j],
        n_pairs=6,
        reference=True,
        descriptor_name=desc.name,
    )
    first, second = report.closest_pairs[:2]
    assert (first["syn_index"], first["real_index"]) == (exact_at, 5)
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert (second["syn_index"], second["real_index"]) == (edited_at, 17)
    assert second["similarity"] >= threshold
    # Every unrelated image stays clearly below the threshold, so exactly the two copies are flagged.
    assert report.closest_pairs[2]["similarity"] < threshold - 0.1
    assert report.n_above_threshold == 2 and report.share_above_threshold == pytest.approx(2 / 102)
    assert report.reference_quantiles["max"] < threshold  # no two distinct real images look like copies

    summary = json.loads(store.read_bytes("copy_detection.json"))
    assert summary["n_above_threshold"] == 2 and summary["closest_pairs"][0]["real_id"] == "real-005"
    table = pq.read_table(store.path("copy_neighbours.parquet")).to_pydict()
    assert len(table["syn_id"]) == 102 * 3
    row = table["syn_id"].index("syn-071")
    assert table["rank"][row] == 0 and table["real_id"][row] == "real-017"
    for name in ("copy_similarity_hist.png", "copy_closest_pairs.png"):
        with Image.open(io.BytesIO(store.read_bytes(name))) as im:
            assert im.format == "PNG"
    with Image.open(io.BytesIO(store.read_bytes("copy_closest_pairs.png"))) as grid:
        assert grid.width >= 4 * 2 * 128  # four pairs per row, two tiles each


def test_short_side_batches_mixed_shapes_like_single_images(torchscript_file):
    rng = np.random.default_rng(1)
    images = [_scene(rng, 64).resize(size) for size in [(64, 64), (96, 64), (64, 80), (64, 64), (96, 64)]]
    desc = _sscd(torchscript_file, size=32)
    assert desc.target_size(96, 64) == (48, 32) and desc.target_size(64, 80) == (32, 40)
    batched = embed_images(iter(images), desc, batch_size=2)
    single = np.concatenate([embed_images([im], desc, batch_size=1) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)


def test_timm_backbone_finds_exact_copies_and_loads_local_weights(tmp_path):
    rng = np.random.default_rng(2)
    real = [_scene(rng, 48) for _ in range(12)]
    arrays = [np.asarray(im) for im in real]  # uint8 arrays are accepted as well as PIL images
    torch.manual_seed(0)
    desc = timm_descriptor("test_resnet", size=48)
    assert desc.name == "timm:test_resnet:random-init" and desc.mean == (0.5, 0.5, 0.5)
    real_emb = embed_images(arrays, desc, batch_size=5)
    syn_emb = embed_images([real[7], _scene(rng, 48)], desc, batch_size=5)
    sims, idx = nearest_real(syn_emb, real_emb, k=2)
    assert idx[0, 0] == 7 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)

    # A weights file of the same architecture (with its classifier head) is loaded, head dropped, offline.
    source = timm.create_model("test_resnet", num_classes=10).eval()
    weights = tmp_path / "test_resnet.safetensors"
    save_file(source.state_dict(), str(weights))
    loaded = build_descriptor("timm", path=weights, model_name="test_resnet")
    assert loaded.name == "timm:test_resnet:test_resnet.safetensors"
    batch = torch.stack([loaded.preprocess(im) for im in real[:3]])
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(batch), pre_logits=True)
    torch.testing.assert_close(loaded(batch), expected)


def test_clip_backbone_from_a_saved_folder(tmp_path):
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    desc = build_descriptor("clip", path=tmp_path / "clip")
    assert desc.size == 32 and desc.resize == "center_crop"
    rng = np.random.default_rng(3)
    real = [_scene(rng, 40) for _ in range(6)]
    emb = embed_images(real + [real[2]], desc, batch_size=4)
    assert emb.shape == (7, 24)
    sims, idx = nearest_real(emb[6:], emb[:6], k=1)
    assert idx[0, 0] == 2 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_clear_errors_for_missing_models_and_unnormalised_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="SSCD TorchScript file not found"):
        sscd_descriptor(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no CLIP model folder"):
        clip_descriptor(tmp_path)
    with pytest.raises(ValueError, match="needs the path"):
        build_descriptor("sscd")
    with pytest.raises(ValueError, match="L2-normalised"):
        copy_report(np.ones((2, 3)), l2_normalize(np.ones((2, 3))), tmp_path / "out")
    with pytest.raises(TypeError, match="uint8"):
        embed_images([np.zeros((8, 8, 3), dtype=np.float32)], timm_descriptor("test_resnet", size=16))


# -- SSCD whenever its file is given; fallbacks named, with their own threshold ------------------------------------


def test_auto_is_sscd_exactly_when_the_path_is_a_torchscript_file(torchscript_file, tmp_path):
    weights = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)  # a zip archive too, but of weights, not TorchScript
    (tmp_path / "clip").mkdir()
    assert is_torchscript_file(torchscript_file) and not is_torchscript_file(weights)
    assert not is_torchscript_file(tmp_path / "clip") and not is_torchscript_file(tmp_path / "absent.pt")
    assert resolve_descriptor_kind("auto", torchscript_file) == "sscd"
    assert resolve_descriptor_kind("auto", None) == "clip"  # the build's own CLIP model: a fallback
    assert resolve_descriptor_kind("auto", tmp_path / "clip") == "clip"
    assert resolve_descriptor_kind("auto", "openai/clip-vit-large-patch14") == "clip"
    assert resolve_descriptor_kind("auto", tmp_path / "sscd_disc_mixup.torchscript.pt") == "sscd"  # missing: says so
    assert resolve_descriptor_kind("timm", weights) == "timm"
    with pytest.raises(ValueError) as err:
        resolve_descriptor_kind("auto", weights)
    assert "\n" not in str(err.value)
    assert "copy_detection.descriptor_path" in str(err.value) and "not a TorchScript file" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert build_descriptor("auto", torchscript_file).kind == "sscd"
    assert CopyDetectionConfig().descriptor == "auto" and CopyDetectionConfig().threshold is None


def test_a_fallback_descriptor_is_named_and_thresholded_on_the_real_to_real_reference(tmp_path):
    rng = np.random.default_rng(4)
    real, syn = _unit(rng, 200, 32), _unit(rng, 50, 32)
    syn[0] = real[7]  # one exact copy
    fallback = copy_report(syn, real, tmp_path / "clip", k=2, reference=True, descriptor_name="clip:tiny-clip")
    reference = nearest_real(real, real, k=2)[0][:, 1]  # each real image's nearest other real image
    assert fallback.fallback and fallback.descriptor_kind == "clip"
    assert fallback.threshold == pytest.approx(float(np.quantile(reference, FALLBACK_QUANTILE)), abs=1e-6)
    assert fallback.threshold != SSCD_THRESHOLD and "p99 of real -> nearest other real" in fallback.threshold_source
    assert fallback.note.startswith("fallback descriptor clip:tiny-clip, not SSCD")
    assert fallback.n_above_threshold >= 1 and fallback.closest_pairs[0]["syn_index"] == 0
    summary = json.loads(Store(str(tmp_path / "clip")).read_bytes("copy_detection.json"))
    assert summary["fallback"] is True and "not SSCD" in summary["note"]

    sscd = copy_report(syn, real, tmp_path / "sscd", k=2, descriptor_name="sscd:sscd_disc_mixup.torchscript.pt")
    assert not sscd.fallback and sscd.threshold == SSCD_THRESHOLD and "Somepalli" in sscd.threshold_source
    assert sscd.note.startswith("SSCD descriptor sscd:sscd_disc_mixup.torchscript.pt: threshold 0.5")
    given = copy_report(syn, real, tmp_path / "given", threshold=0.3, descriptor_name="timm:resnet18:w.pth")
    assert given.fallback and given.threshold == 0.3 and given.threshold_source == "set by copy_detection.threshold"

    with pytest.raises(ValueError, match="no calibrated copy threshold and no real-to-real reference"):
        copy_report(syn, real, tmp_path / "none", descriptor_name="clip:tiny-clip", reference=False)
    with pytest.raises(ValueError, match="copy_detection.reference=true"):
        CopyDetectionConfig(descriptor="clip", reference=False)
    CopyDetectionConfig(descriptor="clip", reference=False, threshold=0.9)  # a threshold the user stands for
