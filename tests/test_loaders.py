"""RealImages reads a manifest split through fsspec URIs (local and in-memory stores); LabelledImages checks pairs."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from realfake.data.loaders import LabelledImages, RealImages
from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA
from realfake.data.storage import Store


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
