"""PyTorch datasets over realfake's images: the real split of a dataset version and any labelled image pairs.

The classifier stage trains and evaluates on ``torch.utils.data.Dataset`` objects that yield
``(image, label)``. :class:`RealImages` reads one split of ``real/manifest.parquet`` and opens every image
through the fsspec URI recorded in its row, so the same code reads a laptop folder or an S3 bucket (with the
store's storage options). :class:`LabelledImages` wraps pairs that are already in memory, such as decoded
synthetic shards or a test fixture. Both return RGB PIL images, or whatever ``transform`` makes of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import fsspec
import torch.utils.data
from PIL import Image

from realfake.data.ingest import decode_image
from realfake.data.manifest import RealSample, read_manifest
from realfake.data.storage import StorageError, Store

__all__ = ["LabelledImages", "RealImages"]


class RealImages(torch.utils.data.Dataset):
    """The real images of one split of a dataset version, in manifest (sample_id) order.

    Args:
        store: Store of the dataset version; its storage options are used to open image URIs.
        split: Split name in the manifest (``train`` or ``test``).
        transform: Applied to each RGB PIL image; ``None`` returns the image itself.
    """

    def __init__(self, store: Store, split: str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.store = store
        self.split = split
        self.transform = transform
        self.samples: list[RealSample] = read_manifest(store, split)
        if not self.samples:
            splits = sorted({s.split for s in read_manifest(store)})
            raise ValueError(
                f"{store.uri('real', 'manifest.parquet')} has no rows with split {split!r}; "
                f"splits present: {', '.join(splits) or 'none'}"
            )
        self.labels: list[int] = [s.label for s in self.samples]
        names: dict[int, str] = {}
        for s in self.samples:
            names.setdefault(s.label, s.class_name)
        self.class_names = names

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, uri: str) -> bytes:
        try:
            with fsspec.open(uri, "rb", **self.store.storage_options) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"image {uri} listed in {self.store.uri('real', 'manifest.parquet')} does not exist; "
                "re-run the prepare stage or restore the file"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot read image {uri}: {e}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[index]
        data = self._read(sample.uri)
        try:
            image = decode_image(data)  # the ingest's normalisation: EXIF rotation, 16-bit, alpha on white
        except ValueError as e:
            raise ValueError(f"image {sample.uri} (sample {sample.sample_id}) cannot be decoded: {e}") from e
        return (self.transform(image) if self.transform else image), sample.label


class LabelledImages(torch.utils.data.Dataset):
    """Images with integer labels from any iterable of ``(PIL.Image, label)`` pairs, held in memory.

    Args:
        pairs: The images and their class indices; consumed once.
        transform: Applied to each RGB PIL image; ``None`` returns the image itself.
    """

    def __init__(
        self, pairs: Iterable[tuple[Image.Image, int]], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.images: list[Image.Image] = []
        self.labels: list[int] = []
        for i, pair in enumerate(pairs):
            try:
                image, label = pair
            except (TypeError, ValueError):
                raise TypeError(f"item {i} must be an (image, label) pair, got {type(pair).__name__}") from None
            if not isinstance(image, Image.Image):
                raise TypeError(f"item {i}: image must be a PIL.Image.Image, got {type(image).__name__}")
            if isinstance(label, bool) or not isinstance(label, int) and not hasattr(label, "__index__"):
                raise TypeError(f"item {i}: label must be an integer class index, got {label!r}")
            label = int(label)
            if label < 0:
                raise ValueError(f"item {i}: label must be >= 0, got {label}")
            self.images.append(image)
            self.labels.append(label)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if image.mode != "RGB":
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]
