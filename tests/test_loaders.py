"""RealImages reads a manifest split through fsspec URIs (local and in-memory stores); LabelledImages checks pairs;
training_data serves the data modes of train-eval (real, synthetic, mixes, scales, pooled versions)."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch.utils.data
from PIL import Image

from realfake.data.loaders import LabelledImages, RealImages, train_decode_size, training_data
from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA
from realfake.data.storage import Store, version_store


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_version(store: Store, rows: list[tuple[str, str, int, np.ndarray]]) -> None:
    """Images under images/ and a manifest whose uri column holds each image's full URI."""
    records = []
    for sample_id, split, label, array in rows:
        store.write_bytes(_png(array), "images", f"{sample_id}.png")
        records.append(
            dict(
                sample_id=sample_id,
                split=split,
                label=label,
                class_name=f"digit {label}",
                uri=store.uri("images", f"{sample_id}.png"),
                sha256="0" * 64,
                width=array.shape[1],
                height=array.shape[0],
            )
        )
    store.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), *MANIFEST)


def _rows() -> list[tuple[str, str, int, np.ndarray]]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (9, 8), dtype=np.uint8)  # mode L: must come back as RGB (ingest minimum side 8)
    colour = rng.integers(0, 255, (9, 8, 3), dtype=np.uint8)
    return [("s2", "train", 1, colour), ("s1", "train", 0, grey), ("s3", "test", 1, grey)]


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path) -> Iterator[Store]:
    if request.param == "file":
        yield Store(str(tmp_path / "ds" / "v1"))
        return
    s = Store(f"memory://realfake-test-{uuid.uuid4().hex}/ds/v1")
    yield s
    s.remove(recursive=True)


def test_real_images_reads_one_split_in_sample_order_as_rgb(store):
    rows = _rows()
    _write_version(store, rows)
    train = RealImages(store, "train")
    assert len(train) == 2 and train.labels == [0, 1]
    assert train.class_names == {0: "digit 0", 1: "digit 1"}
    image, label = train[0]  # s1: the grey image
    assert label == 0 and image.mode == "RGB" and image.size == (8, 9)
    assert np.array_equal(np.asarray(image)[..., 0], rows[1][3])
    assert np.array_equal(np.asarray(image)[..., 2], rows[1][3])
    image, label = train[1]
    assert label == 1 and np.array_equal(np.asarray(image), rows[0][3])
    assert len(RealImages(store, "test")) == 1


def test_real_images_applies_the_transform(store):
    _write_version(store, _rows())
    ds = RealImages(store, "train", transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((9, 8, 3), 0)


def test_real_images_unknown_split_lists_the_present_ones(store):
    _write_version(store, _rows())
    with pytest.raises(ValueError, match="splits present: test, train"):
        RealImages(store, "validation")


def test_real_images_without_manifest_says_to_prepare(store):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        RealImages(store, "train")


def test_real_images_missing_or_corrupt_image_names_the_uri(store):
    _write_version(store, _rows())
    store.remove("images", "s1.png")
    store.write_bytes(b"not an image", "images", "s2.png")
    ds = RealImages(store, "train")
    with pytest.raises(FileNotFoundError, match="s1.png"):
        ds[0]
    with pytest.raises(ValueError, match=r"s2.png \(sample s2\) cannot be decoded"):
        ds[1]


def test_labelled_images_from_a_generator_converts_to_rgb():
    grey = Image.fromarray(np.full((4, 4), 7, dtype=np.uint8))
    ds = LabelledImages((grey, np.int64(i)) for i in range(3))
    assert len(ds) == 3 and ds.labels == [0, 1, 2]
    image, label = ds[2]
    assert image.mode == "RGB" and label == 2 and isinstance(label, int)
    assert LabelledImages([(grey, 1)], transform=lambda im: im.size)[0] == ((4, 4), 1)


@pytest.mark.parametrize(
    ("pairs", "error", "message"),
    [
        ([5], TypeError, "item 0 must be an"),
        ([(np.zeros((2, 2)), 0)], TypeError, "PIL.Image"),
        ([(Image.new("RGB", (2, 2)), "cat")], TypeError, "integer class index"),
        ([(Image.new("RGB", (2, 2)), True)], TypeError, "integer class index"),
        ([(Image.new("RGB", (2, 2)), -1)], ValueError, ">= 0"),
    ],
)
def test_labelled_images_rejects_bad_pairs(pairs, error, message):
    with pytest.raises(error, match=message):
        LabelledImages(pairs)


# ------------------------------------------------------------------------------------------------------------
# training_data: the data modes of train-eval
# ------------------------------------------------------------------------------------------------------------
def _version(root: Path, version: str, replicas: int, per_class: int = 4, class_prefix: str = "digit") -> Store:
    """A version with ``per_class`` real train and 2 real test images for each of 2 classes, and ``replicas``
    synthetic images (replica 0..) of every real train image in shards of 5."""
    from realfake.config import ShardConfig
    from realfake.data.shards import ShardWriter, SyntheticRecord, make_key, plan_shards

    store = version_store(str(root), "ds", version)
    rng = np.random.default_rng(sum(version.encode()))
    rows = [
        (f"{split}-{c}-{i}", split, c, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        for c in range(2)
        for split, n in (("train", per_class), ("test", 2))
        for i in range(n)
    ]
    _write_version(store, rows)  # the manifest names class c "digit c"
    records = [
        SyntheticRecord(make_key(c, sid, r), c, f"{class_prefix} {c}",
                        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                        {"replica": r, "source_sample_id": sid})
        for sid, split, c, _ in rows if split == "train"
        for r in range(replicas)
    ]
    writer = ShardWriter(store, ShardConfig(image_format="png", max_count=5), durable=False)
    for plan in plan_shards(sorted(records, key=lambda rec: rec.key), 5):
        writer.write_shard(plan.name, plan.items)
    return store


def _cfg(root: Path, version: str = "v1", **train_data):
    from realfake.config import load_config

    return load_config(data={
        "dataset": "ds", "version": version, "root": str(root), "device": "cpu",
        "source": {"kind": "image_folder", "uri": str(root / "unused")},
        "classifier": {"model": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}, "image_size": 16,
                       "epochs": 1, "batch_size": 4, "lr": 0.05, "hflip": 0.0, "input_norm": "per_image",
                       "workers": 0, "scale": [0.5, 1.0], "checkpoint_every_epochs": 0},
        "train_data": train_data,
    })


def _labels(ds) -> Counter:
    return Counter(label for _, label in ds)


def _fingerprints(ds) -> Counter:
    return Counter((hashlib.sha256(np.asarray(im).tobytes()).hexdigest(), label) for im, label in ds)


def test_data_modes_real_synthetic_and_an_equal_mix(tmp_path):
    from realfake.data.streaming import StreamingImages

    _version(tmp_path, "v1", replicas=3)
    real = training_data(_cfg(tmp_path), "real")
    assert isinstance(real.dataset, RealImages) and (real.real_images, real.synthetic_images) == (8, 0)
    syn = training_data(_cfg(tmp_path), "synthetic")
    assert isinstance(syn.dataset, StreamingImages) and (syn.real_images, syn.synthetic_images) == (0, 24)
    assert syn.replicas == {syn.synthetic_versions[0]: [0, 1, 2]} and syn.tag == ""
    assert _labels(syn.dataset) == {0: 12, 1: 12}
    mix = training_data(_cfg(tmp_path), "real+synthetic")  # default: equal amounts, synthetic side subsampled
    assert (mix.real_images, mix.synthetic_images, mix.mix_ratio) == (8, 8, 1.0)
    assert _labels(mix.dataset) == {0: 8, 1: 8}  # per class: 4 real + 4 synthetic
    again = training_data(_cfg(tmp_path), "real+synthetic")
    assert _fingerprints(again.dataset) == _fingerprints(mix.dataset)  # deterministic by classifier.seed
    with pytest.raises(ValueError, match="data must be one of real, synthetic, real\\+synthetic"):
        training_data(_cfg(tmp_path), "baseline")


@pytest.mark.parametrize(("ratio", "real", "synthetic"), [(2.0, 8, 16), (10.0, 2, 24), (0.25, 8, 2), (None, 8, 24)])
def test_mix_ratio_subsamples_the_larger_side_per_class(tmp_path, ratio, real, synthetic):
    _version(tmp_path, "v1", replicas=3)
    mix = training_data(_cfg(tmp_path, mix_ratio=ratio), "real+synthetic")
    assert (mix.real_images, mix.synthetic_images) == (real, synthetic)
    assert len(mix.dataset) == real + synthetic
    assert _labels(mix.dataset) == {0: (real + synthetic) // 2, 1: (real + synthetic) // 2}
    assert mix.tag == ("" if ratio in (1.0, None) else f"-r{ratio:g}")


def test_mix_ratio_that_leaves_nothing_is_refused(tmp_path):
    _version(tmp_path, "v1", replicas=1)
    with pytest.raises(ValueError, match="train_data.mix_ratio = 1000.0 leaves no image"):
        training_data(_cfg(tmp_path, mix_ratio=1000), "real+synthetic")


def test_scale_takes_replicas_below_k_and_names_what_exists(tmp_path):
    _version(tmp_path, "v1", replicas=3)
    x2 = training_data(_cfg(tmp_path, synthetic_scale=2), "synthetic")
    assert x2.synthetic_images == 16 and list(x2.replicas.values()) == [[0, 1]] and x2.tag == "-x2"
    both = training_data(_cfg(tmp_path, synthetic_scale=2, mix_ratio=None), "real+synthetic")
    assert (both.real_images, both.synthetic_images) == (8, 16)
    with pytest.raises(ValueError, match=r"train_data.synthetic_scale = 5 needs 5 .* hold 3: .*\(replicas 0-2\)"):
        training_data(_cfg(tmp_path, synthetic_scale=5), "synthetic")


def test_scale_pools_versions_before_replicas(tmp_path):
    _version(tmp_path, "v1", replicas=1)
    v2 = _version(tmp_path, "v2", replicas=2)
    pooled = training_data(_cfg(tmp_path, synthetic_versions=["v1", "v2"], synthetic_scale=2), "synthetic")
    assert pooled.synthetic_images == 16 and list(pooled.replicas.values()) == [[0], [0]] and pooled.tag == "-2v-x2"
    three = training_data(_cfg(tmp_path, synthetic_versions=["v1", "v2"], synthetic_scale=3), "synthetic")
    assert three.synthetic_images == 24 and three.replicas[v2.uri()] == [0, 1]
    everything = training_data(_cfg(tmp_path, synthetic_versions=["v1", "v2"]), "synthetic")
    assert everything.synthetic_images == 24
    with pytest.raises(ValueError, match=r"v1 \(replicas 0\), .*v2 \(replicas 0-1\)"):
        training_data(_cfg(tmp_path, synthetic_versions=["v1", "v2"], synthetic_scale=4), "synthetic")


def test_versions_that_are_missing_or_of_other_classes_are_refused(tmp_path):
    _version(tmp_path, "v1", replicas=1)
    _version(tmp_path, "odd", replicas=1, class_prefix="letter")
    with pytest.raises(ValueError, match=r"holds no committed shards .*train_data.synthetic_versions names ds/v3"):
        training_data(_cfg(tmp_path, synthetic_versions=["v1", "v3"]), "synthetic")
    with pytest.raises(ValueError, match=r"is class 0 'letter 0', but .* names it 'digit 0'"):
        training_data(_cfg(tmp_path, synthetic_versions=["odd"]), "synthetic")


def test_in_memory_and_streaming_hold_the_same_images(tmp_path):
    _version(tmp_path, "v1", replicas=2)
    streamed = training_data(_cfg(tmp_path, mix_ratio=0.5), "real+synthetic")
    memory = training_data(_cfg(tmp_path, mix_ratio=0.5, streaming=False), "real+synthetic")
    assert isinstance(memory.dataset, torch.utils.data.ConcatDataset) and not memory.streaming
    assert _fingerprints(memory.dataset) == _fingerprints(streamed.dataset)
    assert len(memory.dataset) == len(streamed.dataset) == 12


def test_train_decode_size_keeps_the_smallest_crop_at_full_resolution():
    from realfake.config import ClassifierConfig

    assert train_decode_size(ClassifierConfig(image_size=224)) == 915  # scale 0.08, ratio 3/4: 24.5% of a side
    assert train_decode_size(ClassifierConfig(image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))) == 32


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_train_eval_records_each_mode(tmp_path, workers):
    from realfake.build import train_eval

    store = _version(tmp_path, "v1", replicas=2)
    cfg = _cfg(tmp_path, synthetic_scale=2, mix_ratio=2.0)
    cfg.classifier.workers = workers
    for data, real, syn in (("real", 8, 0), ("synthetic", 0, 16), ("real+synthetic", 8, 16)):
        m = train_eval(cfg, data)
        assert (m["real_images"], m["synthetic_images"], m["train_images"]) == (real, syn, real + syn)
        assert 0.0 <= m["top1"] <= 1.0
    runs = sorted(store.listdir("runs"))
    assert runs == ["real-resnet18-s0", "real-synthetic-x2-r2-resnet18-s0", "synthetic-x2-resnet18-s0"]
    recorded = store.read_json("runs", "synthetic-x2-resnet18-s0", "metrics.json")["metrics"]
    assert recorded["synthetic_scale"] == 2 and recorded["streaming"] is True


def test_cli_train_eval_options_reach_train_data(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from realfake.cli import app

    _version(tmp_path, "v1", replicas=2)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_cfg(tmp_path).model_dump(mode="json")))
    runner = CliRunner()
    bad = runner.invoke(app, ["train-eval", "--config", str(config), "--data", "baseline"])
    assert bad.exit_code == 2 and "--data must be one of real, synthetic, real+synthetic" in bad.output
    res = runner.invoke(app, ["train-eval", "--config", str(config), "--scale", "3", "--synthetic-version", "v1",
                              "--in-memory"])
    assert isinstance(res.exception, ValueError)  # refused before any training: 2 replicas, x3 asked
    assert "train_data.synthetic_scale = 3 needs 3 synthetic images per real image" in str(res.exception)
    res = runner.invoke(app, ["train-eval", "--config", str(config), "--mix-ratio", "0"])
    assert res.exit_code == 2 and "train_data.mix_ratio" in res.output


def test_flow_params_carry_train_data_and_scales(tmp_path):
    from flows.params import TrainEvalParams
    from flows.train_eval import scaled_config

    params = TrainEvalParams(preset="demo", train_data={"mix_ratio": 0.5, "synthetic_versions": ["v1", "v2"]},
                             synthetic_scales=[2, 2, 5])
    cfg = params.to_config()
    assert cfg.train_data.mix_ratio == 0.5 and cfg.train_data.synthetic_versions == ["v1", "v2"]
    assert params.synthetic_scales == [2, 5]
    assert scaled_config(cfg, 5).train_data.synthetic_scale == 5 and cfg.train_data.synthetic_scale is None
    with pytest.raises(ValueError, match="synthetic_scales must lie in 1..10"):
        TrainEvalParams(synthetic_scales=[0])
