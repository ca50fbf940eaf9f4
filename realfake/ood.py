"""Out-of-distribution evaluation: ImageNet-V2, -Sketch, -R and -A folders scored in the training label space.

A classifier trained on a version is also tested on shifted test sets (the paper's Tab. 9). Each set is an
image folder with one sub-folder per class, named by WordNet id (ImageNet-V2 as released names them by
ImageNet-1k class index instead, which is translated through the shipped 1000-wnid list). A folder's class
is matched to a training label by the training *class folder* name, which for ImageNet is the wnid (the
readable name from ``class_names.json`` is not used: two wnids can share one). Images of classes the
classifier was not trained on are left out and counted. ImageNet-R and -A cover 200 of the 1000 classes,
so for them the logits are restricted to the training classes among those 200 before the argmax; their
wnid lists ship as package data (``realfake/data/ood_classes/``), taken from the datasets' own evaluation
scripts. The numbers come from :func:`realfake.classify.evaluate`, so OOD and in-distribution accuracy are
computed the same way, with the model's own evaluation transform.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import fsspec
import torch
import torch.nn as nn
import torch.utils.data
from PIL import Image

from realfake.config import BuildConfig, OODConfig
from realfake.data.manifest import read_manifest
from realfake.data.storage import StorageError, Store

__all__ = [
    "OOD_SETS",
    "OODImages",
    "check_ood_folders",
    "configured_sets",
    "class_folders",
    "evaluate_ood",
    "ood_dataset",
    "subset_indices",
    "wnid_list",
]

log = logging.getLogger(__name__)

# Config field -> the name tables use for it, in the paper's column order.
OOD_SETS: dict[str, str] = {
    "imagenet_v2": "IN-v2",
    "imagenet_sketch": "IN-Sketch",
    "imagenet_r": "IN-R",
    "imagenet_a": "IN-A",
}
_LISTS = {"imagenet_1k": 1000, "imagenet_r": 200, "imagenet_a": 200}  # shipped list -> its number of wnids
_SUBSET_SETS = ("imagenet_r", "imagenet_a")  # sets whose logits are restricted to their own classes
WNID = re.compile(r"^n\d{8}$")


@cache
def wnid_list(name: str) -> tuple[str, ...]:
    """The shipped wnid list ``imagenet_1k`` (in class-index order), ``imagenet_r`` or ``imagenet_a``.

    Raises:
        KeyError: no such list.
        RuntimeError: the package data file is missing or damaged (a broken install).
    """
    if name not in _LISTS:
        raise KeyError(f"no shipped wnid list {name!r}; known: {', '.join(_LISTS)}")
    ref = resources.files("realfake.data").joinpath("ood_classes").joinpath(f"{name}.txt")
    try:
        wnids = ref.read_text(encoding="utf-8").split()
    except OSError as e:
        raise RuntimeError(f"package data file {ref} is missing ({e}); reinstall realfake") from e
    bad = [w for w in wnids if not WNID.match(w)]
    if bad or len(wnids) != _LISTS[name] or len(set(wnids)) != len(wnids):
        raise RuntimeError(
            f"package data file {ref} is damaged: expected {_LISTS[name]} unique WordNet ids (n########), found "
            f"{len(wnids)} ({len(set(wnids))} unique, {len(bad)} malformed, e.g. {bad[:3]}); reinstall realfake"
        )
    return tuple(wnids)


def class_folders(store: Store) -> list[str]:
    """The class folder name of every training label of a version (index = label), from its manifest.

    These are the names OOD folders are matched against: for ImageNet the wnids, even when the source's
    ``class_names.json`` gave the classes readable names.
    """
    samples = read_manifest(store)
    if not samples:
        raise ValueError(f"{store.uri('real', 'manifest.parquet')} has no rows: run the prepare stage first")
    folders: dict[int, set[str]] = {}
    if all(s.folder for s in samples):  # the manifest records each row's class folder
        for s in samples:
            folders.setdefault(s.label, set()).add(s.folder)
    else:  # a manifest written before the folder column: sample_id is {class}/... or {split}/{class}/...
        parts = [s.sample_id.split("/") for s in samples]
        presplit = all(len(p) >= 3 and p[0] == s.split for p, s in zip(parts, samples, strict=True))
        for p, s in zip(parts, samples, strict=True):
            folders.setdefault(s.label, set()).add(p[1] if presplit else p[0])
    labels = sorted(folders)
    if labels != list(range(len(labels))):
        raise ValueError(f"{store.uri('real', 'manifest.parquet')} has labels {labels[:10]}..., not 0..n-1")
    ambiguous = {k: sorted(v) for k, v in folders.items() if len(v) > 1}
    if ambiguous:
        raise ValueError(
            f"{store.uri('real', 'manifest.parquet')}: a label has several class folders {ambiguous}; "
            "re-run the prepare stage"
        )
    return [next(iter(folders[k])) for k in labels]


def _training_name(set_name: str, folder: str, index: dict[str, int]) -> str:
    """The training class key of an OOD class folder: the folder itself, or ImageNet-V2's index -> wnid."""
    if folder in index or set_name != "imagenet_v2" or not folder.isdigit():
        return folder
    k = int(folder)
    return wnid_list("imagenet_1k")[k] if k < 1000 else folder


class OODImages(torch.utils.data.Dataset):
    """The images of one OOD folder whose class is a training class, labelled in the training label space.

    Attributes:
        name: The OOD set (a key of :data:`OOD_SETS`).
        uri: The folder.
        samples: ``(image uri, training label)`` pairs in sorted path order.
        skipped_images: Images of classes the classifier was not trained on (left out).
        skipped_classes: Class folders of the OOD set that are not training classes, sorted.
    """

    def __init__(self, name: str, uri: str, samples: list[tuple[str, int]], skipped_classes: list[str],
                 skipped_images: int, storage_options: dict | None = None) -> None:
        self.name = name
        self.uri = uri
        self.samples = samples
        self.skipped_classes = skipped_classes
        self.skipped_images = skipped_images
        self.storage_options = dict(storage_options or {})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        from realfake.data.images import decode_image

        uri, label = self.samples[index]
        try:
            with fsspec.open(uri, "rb", **self.storage_options) as f:
                data = f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"OOD image {uri} (ood.{self.name}) disappeared during evaluation") from e
        except OSError as e:
            raise StorageError(f"cannot read OOD image {uri} (ood.{self.name}): {e}") from e
        try:
            return decode_image(data), label
        except ValueError as e:
            raise ValueError(f"OOD image {uri} (ood.{self.name}) cannot be decoded: {e}; remove it") from e


def ood_dataset(name: str, uri: str, class_names: Sequence[str], storage_options: dict | None = None) -> OODImages:
    """List one OOD folder and label its images by the training class they belong to.

    Args:
        name: The OOD set (a key of :data:`OOD_SETS`); ``imagenet_r`` / ``imagenet_a`` folders must only hold
            classes of that set's 200.
        uri: Folder (local path or fsspec URI) with one sub-folder per class.
        class_names: The training class folder names by label (:func:`class_folders`).
        storage_options: fsspec options for ``uri``.

    Raises:
        FileNotFoundError: the folder does not exist or has no class folders.
        ValueError: no class folder is a training class, or an -R / -A folder holds a class outside its 200.
    """
    from realfake.data.sources import scan_image_folder

    if name not in OOD_SETS:
        raise ValueError(f"unknown OOD set {name!r}; expected one of {', '.join(OOD_SETS)}")
    field = f"ood.{name}"
    try:
        # matched by folder, never by name: a wnid outside the 1000 (an -21k folder) needs no name here
        layout = scan_image_folder(uri, storage_options, keep_wnids=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field} = {uri}: {e}") from None
    except ValueError as e:  # a class_names.json that does not fit the folders
        raise ValueError(f"{field} = {uri}: {e}") from None
    if layout.presplit:
        raise ValueError(f"{field} = {uri} has train/ and test/ folders; point it at the folder of class folders")
    index = {c: i for i, c in enumerate(class_names)}
    allowed = set(wnid_list(name)) if name in _SUBSET_SETS else None
    samples: list[tuple[str, int]] = []
    skipped: list[str] = []
    skipped_images = 0
    for c in sorted(layout.classes, key=lambda c: c.folder):
        key = _training_name(name, c.folder, index)
        if allowed is not None and key not in allowed:
            raise ValueError(
                f"{field}: class folder {layout.root}/{c.folder} is not one of the 200 {OOD_SETS[name]} classes "
                f"(realfake/data/ood_classes/{name}.txt); point {field} at the {OOD_SETS[name]} folder"
            )
        if key not in index:
            skipped.append(c.folder)
            skipped_images += len(c.files)
            continue
        samples.extend((f, index[key]) for f in c.files)
    if not samples:
        shown = ", ".join(list(class_names)[:5])
        raise ValueError(
            f"{field} = {uri}: none of its {len(layout.classes)} class folders (e.g. "
            f"{', '.join(sorted(c.folder for c in layout.classes)[:3])}) holds images of a training class; folders "
            f"must be named like the training class folders ({shown}, ...), e.g. WordNet ids such as n01440764"
        )
    if skipped:
        log.info("%s: %d images of %d classes the classifier was not trained on are left out", field, skipped_images,
                 len(skipped))
    return OODImages(name, uri, samples, skipped, skipped_images, storage_options)


def subset_indices(name: str, class_names: Sequence[str]) -> list[int] | None:
    """Training labels the prediction is restricted to on ``name``: -R / -A's classes; ``None`` for all."""
    if name not in _SUBSET_SETS:
        return None
    allowed = set(wnid_list(name))
    return [i for i, c in enumerate(class_names) if c in allowed]


def _ood_config(cfg: BuildConfig | OODConfig) -> OODConfig:
    return cfg.ood if isinstance(cfg, BuildConfig) else cfg


def configured_sets(cfg: BuildConfig | OODConfig) -> list[tuple[str, str]]:
    """``(set name, folder)`` of every OOD set configured in ``cfg.ood``, in :data:`OOD_SETS` order."""
    ood = _ood_config(cfg)
    return [(name, getattr(ood, name)) for name in OOD_SETS if getattr(ood, name)]


def check_ood_folders(cfg: BuildConfig | OODConfig, class_names: Sequence[str] | None = None,
                      storage_options: dict | None = None) -> dict[str, int]:
    """Check the configured OOD folders before training, so a wrong path fails in seconds, not after training.

    Without ``class_names`` only their existence is checked; with them, each folder is listed and matched to
    the training classes as :func:`evaluate_ood` will do it (no image is decoded).

    Returns:
        Per configured set, the number of images that will be scored (0 when only existence was checked).

    Raises:
        FileNotFoundError: a folder does not exist (the message names the field and the folder).
        ValueError: as :func:`ood_dataset`.
    """
    counts: dict[str, int] = {}
    for name, uri in configured_sets(cfg):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.isdir(path):
            raise FileNotFoundError(f"ood.{name} = {uri} does not exist or is not a folder")
        counts[name] = len(ood_dataset(name, uri, class_names, storage_options)) if class_names is not None else 0
    return counts


def evaluate_ood(model: nn.Module, cfg: BuildConfig | OODConfig, class_names: Sequence[str],
                 device: str | torch.device = "cpu", storage_options: dict | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on every OOD folder configured in ``cfg.ood`` (none configured: ``{}``).

    Args:
        model: Returns logits over ``len(class_names)`` classes; PIL images get its ``eval_transform``.
        cfg: The build config (or its ``ood`` section).
        class_names: The training class folder names by label (:func:`class_folders`).
        device: Torch device.
        storage_options: fsspec options for the OOD folders.

    Returns:
        Per configured set: ``top1``, ``top5``, ``n`` (images scored), ``per_class`` (by training label,
        ``None`` where the set has no image), ``classes`` (training classes present), ``candidates`` (classes
        the argmax ranges over: 200 or fewer for -R / -A), ``skipped_images`` and ``skipped_classes`` (of
        classes outside the training label space) and ``uri``.
    """
    from realfake.classify import evaluate

    ood = _ood_config(cfg)
    out: dict[str, Any] = {}
    for name, uri in configured_sets(cfg):
        data = ood_dataset(name, uri, class_names, storage_options)
        subset = subset_indices(name, class_names)
        m = evaluate(model, data, len(class_names), device=device, class_subset=subset, batch_size=ood.batch_size)
        out[name] = {
            "uri": uri,
            "top1": m["top1"],
            "top5": m["top5"],
            "n": m["n"],
            "per_class": m["per_class"],
            "classes": len({label for _, label in data.samples}),
            "candidates": len(subset) if subset is not None else len(class_names),
            "skipped_images": data.skipped_images,
            "skipped_classes": len(data.skipped_classes),
        }
        log.info("%s (%s): top-1 %.4f top-5 %.4f on %d images", OOD_SETS[name], uri, m["top1"], m["top5"], m["n"])
    return out
