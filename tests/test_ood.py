"""OOD evaluation: the shipped wnid lists, the -R / -A logit restriction on a hand case, and a version end to end.

The hand case runs the real path (folder scan, decode, the model's evaluation transform, the restricted
argmax) with a model whose logits are a fixed table looked up by the image's colour, so every number is
computed by hand. The end-to-end test ingests a wnid-named source folder with readable class names, trains
a tiny classifier on it, and checks that an OOD folder holding the version's own test images scores exactly
what the in-distribution evaluation of those images scores.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from realfake.classify import evaluate, train_classifier
from realfake.config import BuildConfig, ClassifierConfig, OODConfig, SourceConfig
from realfake.data.ingest import ingest
from realfake.data.loaders import LabelledImages, RealImages
from realfake.data.manifest import read_manifest
from realfake.data.storage import Store
from realfake.ood import (
    check_ood_folders,
    class_folders,
    evaluate_ood,
    ood_dataset,
    subset_indices,
    wnid_list,
)

# The first twelve ImageNet-1k classes; ImageNet-R holds seven of them (indices 1, 2, 4, 6, 8, 9, 11, as listed in
# the ImageNet-R evaluation script), ImageNet-A three (6, 11 and none of the others below 12).
IN12 = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668",
        "n01514859", "n01518878", "n01530575", "n01531178"]
R_OF_IN12 = [1, 2, 4, 6, 8, 9, 11]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module with one intra-op thread (conftest's ``one_thread``)."""


def test_shipped_lists_are_the_datasets_class_lists():
    in1k, r, a = wnid_list("imagenet_1k"), wnid_list("imagenet_r"), wnid_list("imagenet_a")
    assert (len(in1k), len(set(in1k)), len(r), len(set(r)), len(a), len(set(a))) == (1000, 1000, 200, 200, 200, 200)
    assert all(re.fullmatch(r"n\d{8}", w) for w in in1k + r + a)
    assert list(in1k) == sorted(in1k) and in1k[:12] == tuple(IN12) and in1k[-1] == "n15075141"
    assert set(r) <= set(in1k) and set(a) <= set(in1k)
    # class indices as the datasets' evaluation scripts list them (-R: [1, 2, 4, 6, ...]; -A: 6, 11, 13, 15, 17, ...)
    assert [i for i, w in enumerate(in1k) if w in set(r)][:7] == R_OF_IN12
    assert [i for i, w in enumerate(in1k) if w in set(a)][:5] == [6, 11, 13, 15, 17]
    # timm (a pinned dependency) ships the same lists: an independent copy
    import timm.data

    info = Path(timm.data.__file__).parent / "_info"
    assert sorted(r) == sorted((info / "imagenet_r_synsets.txt").read_text().split())
    assert sorted(a) == sorted((info / "imagenet_a_synsets.txt").read_text().split())
    assert list(in1k) == (info / "imagenet_synsets.txt").read_text().split()
    with pytest.raises(KeyError, match="imagenet_x"):
        wnid_list("imagenet_x")


def test_the_lists_are_package_data_of_the_wheel():
    # hatch packages every file under realfake/ (no .gitignore rule covers them), so the wheel carries the lists
    folder = Path(__file__).resolve().parents[1] / "realfake" / "data" / "ood_classes"
    assert sorted(p.name for p in folder.glob("*.txt")) == ["imagenet_1k.txt", "imagenet_a.txt", "imagenet_r.txt"]
    gitignore = (folder.parents[2] / ".gitignore").read_text().split()
    assert not any(p in gitignore for p in ("*.txt", "ood_classes", "realfake/data/ood_classes/"))


class _TableModel(nn.Module):
    """Logits looked up in a fixed table by the image's red value / 10 (its row); transform included."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)
        self.eval_transform = lambda img: torch.tensor(img.getpixel((0, 0))[0] // 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def _solid(path: Path, row: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10 * row, 0, 0)).save(path)


# Twelve training classes (IN12). Row 0: true 1, a non-R class (0) leads, class 1 second. Row 1: true 2, five non-R
# classes lead, then 4, then 2 (7th overall, 2nd among R). Row 2: true 6, first everywhere. Row 3: true 11, last
# of the seven R classes (and 7th overall).
TABLE = [
    [9, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [9.5, 0, 6, 9.4, 7, 9.3, 0, 9.2, 0, 0, 9.1, 0],
    [0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0],
    [0, 8, 7, 0, 6, 0, 5, 0, 4, 3, 0, 1],
]
TRUE = [1, 2, 6, 11]


@pytest.fixture
def hand_folders(tmp_path):
    """An -R style folder (wnid folders, one training-foreign R class) and an -V2 style one (index folders)."""
    r = tmp_path / "imagenet-r"
    for row, label in enumerate(TRUE):
        _solid(r / IN12[label] / f"{row}.png", row)
    _solid(r / "n01534433" / "x.png", 0)  # an ImageNet-R class the classifier was not trained on: left out
    (r / "README.txt").write_text("not an image")
    v2 = tmp_path / "imagenetv2"
    for row, label in enumerate(TRUE):
        _solid(v2 / str(label) / f"{row}.jpeg", row)  # ImageNet-V2's release names folders by class index
    _solid(v2 / "999" / "y.png", 0)  # index 999 (n15075141) is no training class
    return r, v2


def test_restricting_to_the_200_classes_matches_the_hand_computed_case(hand_folders):
    r, v2 = hand_folders
    model = _TableModel(TABLE)
    assert subset_indices("imagenet_r", IN12) == R_OF_IN12 and subset_indices("imagenet_sketch", IN12) is None
    cfg = OODConfig(imagenet_r=str(r), imagenet_sketch=str(r), imagenet_v2=str(v2), batch_size=3)
    out = evaluate_ood(model, cfg, IN12)
    assert list(out) == ["imagenet_v2", "imagenet_sketch", "imagenet_r"]
    # all 12 classes: predictions 0, 3, 6, 1 -> one right; true class in the top 5 for rows 0 and 2 only
    assert out["imagenet_sketch"]["top1"] == pytest.approx(1 / 4)
    assert out["imagenet_sketch"]["top5"] == pytest.approx(2 / 4)
    # the 7 R classes: predictions 1, 4, 6, 1 -> rows 0 and 2 right; top 5 holds the truth for rows 0, 1, 2
    assert out["imagenet_r"]["top1"] == pytest.approx(2 / 4)
    assert out["imagenet_r"]["top5"] == pytest.approx(3 / 4)
    assert out["imagenet_r"]["candidates"] == 7 and out["imagenet_sketch"]["candidates"] == 12
    for name in ("imagenet_r", "imagenet_sketch"):
        assert (out[name]["n"], out[name]["classes"], out[name]["skipped_images"], out[name]["skipped_classes"]) == (
            4, 4, 1, 1)
    per_class = [None] * 12
    per_class[1], per_class[2], per_class[6], per_class[11] = 1.0, 0.0, 1.0, 0.0
    assert out["imagenet_r"]["per_class"] == per_class
    # index-named folders map through the ImageNet-1k list: the same images, the same unrestricted numbers
    assert (out["imagenet_v2"]["top1"], out["imagenet_v2"]["top5"], out["imagenet_v2"]["n"]) == (0.25, 0.5, 4)
    assert out["imagenet_v2"]["skipped_classes"] == 1
    assert evaluate_ood(model, OODConfig(), IN12) == {}


def test_a_training_space_without_some_r_classes_restricts_to_the_ones_it_has(hand_folders):
    r, _ = hand_folders
    # train on classes 0..6 only: R classes 1, 2, 4, 6; the row of class 11 is left out with the foreign class
    names, table = IN12[:7], [row[:7] for row in TABLE]
    out = evaluate_ood(_TableModel(table), OODConfig(imagenet_r=str(r)), names)["imagenet_r"]
    assert out["candidates"] == 4 and out["n"] == 3 and out["skipped_images"] == 2
    # rows 0, 1, 2 restricted to {1, 2, 4, 6}: predictions 1, 4, 6; top-4 (k = min(5, 4)) always holds the truth
    assert out["top1"] == pytest.approx(2 / 3) and out["top5"] == 1.0


def test_bad_ood_folders_are_refused_naming_the_field(tmp_path, hand_folders):
    r, _ = hand_folders
    model = _TableModel(TABLE)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"ood\.imagenet_a = .*nowhere"):
        check_ood_folders(BuildConfig(dataset="d", source=SourceConfig(uri="x"), ood={"imagenet_a": str(missing)}))
    with pytest.raises(FileNotFoundError, match=r"ood\.imagenet_sketch = .*nowhere"):
        evaluate_ood(model, OODConfig(imagenet_sketch=str(missing)), IN12)
    assert check_ood_folders(OODConfig(imagenet_r=str(r))) == {"imagenet_r": 0}  # it exists
    assert check_ood_folders(OODConfig(imagenet_r=str(r)), IN12) == {"imagenet_r": 4}  # 4 images to score
    with pytest.raises(ValueError, match="named like the training class folders"):
        check_ood_folders(OODConfig(imagenet_r=str(r)), ["tench", "goldfish"])  # matched before training

    # -R must only hold -R classes: n01440764 (tench) is not one of its 200
    _solid(r / "n01440764" / "z.png", 0)
    with pytest.raises(ValueError, match=r"ood\.imagenet_r: class folder .*n01440764 is not one of the 200 IN-R"):
        ood_dataset("imagenet_r", str(r), IN12)
    ood_dataset("imagenet_sketch", str(r), IN12)  # any ImageNet class is fine elsewhere

    # folders that match no training class (here: readable names instead of wnids)
    named = tmp_path / "named"
    _solid(named / "tench" / "a.png", 0)
    with pytest.raises(ValueError, match=r"ood\.imagenet_sketch = .*named: none of its 1 class folders \(e\.g\. "
                                         r"tench\).*named like the training class folders"):
        ood_dataset("imagenet_sketch", str(named), IN12)

    split = tmp_path / "split"
    _solid(split / "train" / IN12[0] / "a.png", 0)
    _solid(split / "test" / IN12[0] / "b.png", 0)
    with pytest.raises(ValueError, match="train/ and test/"):
        ood_dataset("imagenet_v2", str(split), IN12)
    with pytest.raises(ValueError, match="unknown OOD set"):
        ood_dataset("imagenet_c", str(r), IN12)

    broken = tmp_path / "broken"
    (broken / IN12[0]).mkdir(parents=True)
    (broken / IN12[0] / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"OOD image .*bad\.png \(ood\.imagenet_sketch\) cannot be decoded"):
        evaluate_ood(model, OODConfig(imagenet_sketch=str(broken)), IN12)


# Source classes: five wnids with readable names (class_names.json), two of them ImageNet-R classes.
SOURCE = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
          "n01491361": "tiger shark", "n01494475": "hammerhead"}


def _write_source(folder: Path, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(SOURCE):
        (folder / wnid).mkdir(parents=True)
        base = np.zeros((16, 16, 3), np.float64)
        base[..., k % 3] = 200.0
        base[: 4 * (k + 1) // 2] += 40.0
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / wnid / f"{i}.png")
    (folder / "class_names.json").write_text(json.dumps(SOURCE))


def test_an_ood_folder_of_the_versions_own_test_images_scores_what_the_test_split_scores(tmp_path):
    src, store = tmp_path / "src", Store(str(tmp_path / "out" / "d" / "v1"))
    _write_source(src)
    ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.25), store)
    folders = class_folders(store)
    assert folders == sorted(SOURCE)  # the wnids, not the readable names the manifest carries
    assert {s.class_name for s in read_manifest(store)} == set(SOURCE.values())

    cfg = ClassifierConfig(model="resnet18", model_kwargs={"channels": [8, 16, 32, 64]}, image_size=16, epochs=2,
                           batch_size=16, lr=0.05, hflip=0.0, workers=0, input_norm="model", sched="cosine",
                           decay_milestones=[100], crop_pct=1.0)
    model = train_classifier(RealImages(store, "train"), len(folders), cfg)
    test = RealImages(store, "test")

    # OOD folders made of the test images: wnid folders (sketch, -R) and ImageNet-V2 index folders
    sketch, r, v2 = tmp_path / "sketch", tmp_path / "r", tmp_path / "v2"
    r_classes = set(wnid_list("imagenet_r"))
    for s in test.samples:
        wnid = folders[s.label]
        name = Path(s.uri).name
        for dest in [sketch / wnid, v2 / str(wnid_list("imagenet_1k").index(wnid))] + (
                [r / wnid] if wnid in r_classes else []):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(s.uri, dest / name)
    out = evaluate_ood(model, BuildConfig(dataset="d", source=SourceConfig(uri=str(src)),
                                          ood={"imagenet_sketch": str(sketch), "imagenet_v2": str(v2),
                                               "imagenet_r": str(r), "batch_size": 4}), folders)
    full = evaluate(model, test, len(folders))
    for name in ("imagenet_sketch", "imagenet_v2"):
        assert out[name]["n"] == full["n"] == 10 and out[name]["skipped_images"] == 0
        assert (out[name]["top1"], out[name]["top5"], out[name]["per_class"]) == (
            full["top1"], full["top5"], full["per_class"])

    keep = subset_indices("imagenet_r", folders)
    assert [folders[i] for i in keep] == ["n01443537", "n01484850", "n01494475"]
    r_test = LabelledImages((img, y) for img, y in (test[i] for i in range(len(test))) if y in keep)
    restricted = evaluate(model, r_test, len(folders), class_subset=keep)
    assert (out["imagenet_r"]["top1"], out["imagenet_r"]["top5"], out["imagenet_r"]["n"]) == (
        restricted["top1"], restricted["top5"], restricted["n"])
    assert out["imagenet_r"]["n"] == 6 and out["imagenet_r"]["candidates"] == 3

    # the manifest's readable names are not what OOD folders are named by: a clear error, not zero accuracy
    readable = [SOURCE[w] for w in folders]
    with pytest.raises(ValueError, match="named like the training class folders"):
        evaluate_ood(model, OODConfig(imagenet_sketch=str(sketch)), readable)


def test_class_folders_of_a_presplit_source(tmp_path):
    src, store = tmp_path / "src", Store(str(tmp_path / "out"))
    for split, n, first in (("train", 3, 0), ("test", 2, 10)):
        for k, wnid in enumerate(["n01443537", "n01440764"]):
            for i in range(n):
                _solid(src / split / wnid / f"{i}.png", first + n * k + i)  # distinct images: no duplicates
    ingest(SourceConfig(kind="image_folder", uri=str(src)), store)
    assert {s.sample_id.split("/")[0] for s in read_manifest(store)} == {"train", "test"}
    assert class_folders(store) == ["n01440764", "n01443537"]
