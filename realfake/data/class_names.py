"""Class names and class subsets of a source folder, including ImageNet as its users have it.

A class folder's readable name (the ``{class_name}`` of every prompt) comes from a class-name file when one is
given: realfake's ``class_names.json`` (``{folder: name}``), the Keras ``imagenet_class_index.json``
(``{"0": ["n01440764", "tench"]}``; underscores in its names read as spaces) or ImageNet's
``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``: the first comma-separated lemma is the name).
Without one, a WordNet-id folder (``n01440764``) is named from the shipped ImageNet-1k list, which holds the
names the authors' code puts in its prompts, so a prompt never reads ``photo of n01440764`` unless the user
asks for it (``source.keep_wnids``). Named subsets (``imagenette``, ``in100``) are the authors' class lists,
shipped as wnid files; all lists live in ``realfake/data/imagenet/`` with their source in each file's header.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = [
    "CLASS_NAME_FILES",
    "FOLDER_MAP",
    "KERAS_INDEX",
    "SUBSETS",
    "SYNSET_MAPPING",
    "ClassNameFile",
    "imagenet_names",
    "is_wnid",
    "parse_class_names",
    "select_classes",
    "subset_folders",
]

FOLDER_MAP = "class_names.json"
KERAS_INDEX = "imagenet_class_index.json"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
# Looked for in the source root in this order; the first one found names the classes. realfake's own file
# first: a user who wrote it meant it, next to files that came with the dataset.
CLASS_NAME_FILES = (FOLDER_MAP, KERAS_INDEX, SYNSET_MAPPING)
SUBSETS = {"imagenette": "imagenette.txt", "in100": "in100.txt"}  # name -> file under realfake/data/imagenet/
_DATA = "imagenet"
_WNID = re.compile(r"^n\d{8}$")
_FORMATS = (
    f'{{"folder": "class name"}} ({FOLDER_MAP}), a Keras class index {{"0": ["n01440764", "tench"]}} '
    f"({KERAS_INDEX}) or lines 'n01440764 tench, Tinca tinca' ({SYNSET_MAPPING})"
)


@dataclass(frozen=True)
class ClassNameFile:
    """A parsed class-name file: where it came from, its format and ``{folder: name}`` (NFC keys).

    ``format`` is ``FOLDER_MAP`` (the folders' own list: must name exactly the folders) or one of the
    ImageNet formats ``KERAS_INDEX`` / ``SYNSET_MAPPING`` (whole-ImageNet lists: entries without a folder are
    expected, e.g. for a subset tree).
    """

    shown: str
    format: str
    names: dict[str, str]


def _nfc(name: str) -> str:
    # macOS writes decomposed (NFD) file names; a mapping typed by a person is composed (NFC)
    return unicodedata.normalize("NFC", name)


def is_wnid(folder: str) -> bool:
    """Whether a folder name is a WordNet id such as ``n01440764``."""
    return bool(_WNID.match(folder))


def _read_data(name: str) -> list[str]:
    ref = resources.files("realfake.data").joinpath(_DATA).joinpath(name)
    try:
        text = ref.read_text(encoding="utf-8")
    except OSError as e:
        raise RuntimeError(f"package data file {ref} is missing ({e}); reinstall realfake") from e
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@cache
def imagenet_names() -> dict[str, str]:
    """The shipped ImageNet-1k ``{wnid: name}``, in class-index order (the authors' prompt names)."""
    out: dict[str, str] = {}
    for line in _read_data("imagenet_1k.tsv"):
        wnid, _, name = line.partition("\t")
        out[wnid] = name.strip()
    if len(out) != 1000 or not all(is_wnid(w) and n for w, n in out.items()) or len(set(out.values())) != 1000:
        raise RuntimeError(f"package data file realfake/data/{_DATA}/imagenet_1k.tsv is damaged; reinstall realfake")
    return out


@cache
def subset_folders(name: str) -> tuple[str, ...]:
    """The wnids of a named subset (``imagenette``, ``in100``) in class-index order.

    Raises:
        KeyError: no such subset.
    """
    if name not in SUBSETS:
        raise KeyError(f"no named class subset {name!r}; known: {', '.join(SUBSETS)}")
    wnids = tuple(line.split("#", 1)[0].strip() for line in _read_data(SUBSETS[name]))
    known = imagenet_names()
    if not wnids or len(set(wnids)) != len(wnids) or any(w not in known for w in wnids):
        raise RuntimeError(f"package data file realfake/data/{_DATA}/{SUBSETS[name]} is damaged; reinstall realfake")
    return wnids


def select_classes(present: Iterable[str], classes: str | list[str], where: str) -> list[str]:
    """The class folders a ``source.classes`` setting selects, sorted; every one must be ``present``.

    Args:
        present: Class folder names of the training part of the tree.
        classes: A named subset (:data:`SUBSETS`) or a list of folder names.
        where: The folder the class folders are in, for the message.

    Raises:
        ValueError: a selected class has no folder (one line: how many, which, and the fix).
    """
    wanted = list(subset_folders(classes)) if isinstance(classes, str) else list(classes)
    have = {_nfc(p) for p in present}
    missing = [c for c in wanted if _nfc(c) not in have]
    if missing:
        what = f"source.classes = {classes}" if isinstance(classes, str) else "source.classes"
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"{what}: {len(missing)} of its {len(wanted)} classes have no folder in {where}: {missing[:10]}{more}; "
            "point source.uri at a tree that holds them, or list the class folders you have in source.classes"
        )
    return sorted(wanted)


def _text(data: bytes, shown: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text; expected {_FORMATS}") from None


def _keras_index(obj: dict, shown: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, entry in obj.items():
        wnid, name = entry
        name = name.replace("_", " ").strip()  # Keras writes names as identifiers: great_white_shark
        if not (isinstance(wnid, str) and wnid.strip() and name):
            raise ValueError(f"{shown}: entry {key!r} must be [folder, non-empty class name]; expected {_FORMATS}")
        if _nfc(wnid) in out:
            raise ValueError(f"{shown} lists the folder {wnid!r} twice; each folder needs exactly one entry")
        out[_nfc(wnid)] = name
    return out


def _parse_json(text: str, shown: str) -> ClassNameFile:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{shown} is not valid JSON ({e}); expected {_FORMATS}") from None
    if isinstance(obj, dict) and obj and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in obj.values()
    ):
        return ClassNameFile(shown, KERAS_INDEX, _keras_index(obj, shown))
    if not isinstance(obj, dict) or not all(isinstance(v, str) and v.strip() for v in obj.values()):
        raise ValueError(
            f"{shown} must map folder names to non-empty class-name strings ({{\"n01440764\": \"tench\"}}) "
            f"or be a Keras class index ({{\"0\": [\"n01440764\", \"tench\"]}})"
        )
    return ClassNameFile(shown, FOLDER_MAP, {_nfc(k): v.strip() for k, v in obj.items()})


def _parse_synsets(text: str, shown: str) -> ClassNameFile:
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        folder, _, rest = line.strip().partition(" ")
        name = rest.split(",", 1)[0].strip()  # 'tench, Tinca tinca': the first lemma is the everyday name
        if not name:
            raise ValueError(f"{shown} line {i}: expected '<folder> <name>[, <more names>]' as in {SYNSET_MAPPING} "
                             "('n01440764 tench, Tinca tinca')")
        if _nfc(folder) in out:
            raise ValueError(f"{shown} line {i}: the folder {folder!r} is listed twice; each needs exactly one line")
        out[_nfc(folder)] = name
    if not out:
        raise ValueError(f"{shown} is empty; expected {_FORMATS}")
    return ClassNameFile(shown, SYNSET_MAPPING, out)


def parse_class_names(data: bytes, shown: str) -> ClassNameFile:
    """Parse a class-name file in any of the three formats; the format is told by the content.

    A ``.json`` file (or text starting with ``{`` / ``[``) is read as JSON: a Keras class index when every
    value is a ``[folder, name]`` pair, else ``{folder: name}``. Anything else is read as lines
    ``<folder> <name>[, <more names>]`` (``LOC_synset_mapping.txt``).

    Raises:
        ValueError: the file is in none of the formats (one line naming the file and the formats).
    """
    text = _text(data, shown)
    if shown.lower().endswith(".json") or text.lstrip().startswith(("{", "[")):
        return _parse_json(text, shown)
    return _parse_synsets(text, shown)
