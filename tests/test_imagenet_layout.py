"""ImageNet as users have it: train/ + val/ trees, wnid folders, the Keras and LOC class-name files, the authors'
subsets, and the layouts that would otherwise be misread (split folders taken for classes, a flat val/)."""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realfake.conditioning import build_prompt
from realfake.config import BuildConfig, SourceConfig, load_config
from realfake.data.card import write_card
from realfake.data.class_names import imagenet_names, parse_class_names, subset_folders
from realfake.data.ingest import ingest
from realfake.data.manifest import MANIFEST, REJECTS, read_manifest
from realfake.data.sources import scan_image_folder
from realfake.data.storage import Store
from realfake.preflight import _class_folders

TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"
IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
              "n03425413", "n03445777", "n03888257"]  # the fast.ai Imagenette classes, sorted
_counter = iter(range(1 << 30))


def _png() -> bytes:
    """A 16x16 PNG no other call returns (no duplicate or label-conflict rejects)."""
    arr = np.random.default_rng(next(_counter)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path, spec: dict[str, int]) -> Path:
    """``{"train/n01440764": 3, ...}``: that many images in each folder."""
    for folder, n in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / folder / f"{i}.png").write_bytes(_png())
    return root


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def _prompts(store: Store, template: str = BuildConfig.model_fields["synthesis"].default.prompt_template) -> set[str]:
    """The prompts synthesis makes for the version's training images (its work plan + the prompt builder)."""
    from realfake.synthesize import plan_work

    cfg = load_config(data={"dataset": "x", "source": {"uri": "/unused"}})
    return {build_prompt(template, w.class_name) for w in plan_work(cfg, store)}


# --------------------------------------------------------------------------------------------------------
# train/ + val/, wnid folders, class-name files
# --------------------------------------------------------------------------------------------------------
def test_train_val_wnid_tree_with_a_keras_index(tmp_path):
    src = _tree(tmp_path / "imagenet", {f"{s}/{w}": n for s, n in (("train", 3), ("val", 2))
                                        for w in (TENCH, GOLDFISH, SHARK)})
    keras = {"0": [TENCH, "tench"], "1": [GOLDFISH, "goldfish"], "2": [SHARK, "great_white_shark"],
             "3": ["n01491361", "tiger_shark"]}  # a whole-ImageNet file: entries without a folder are fine
    (src / "imagenet_class_index.json").write_text(json.dumps(keras))
    store = Store(str(tmp_path / "out" / "in" / "v1"))
    res = ingest(SourceConfig(uri=str(src)), store)

    assert (res.train, res.test, res.rejects) == (9, 6, 0)  # val/ is the test split, nothing carved out of train/
    assert res.classes == ["tench", "goldfish", "great white shark"]  # Keras underscores read as spaces
    rows = read_manifest(store)
    assert {(r.label, r.folder, r.class_name) for r in rows} == {
        (0, TENCH, "tench"), (1, GOLDFISH, "goldfish"), (2, SHARK, "great white shark")}
    assert {r.sample_id.split("/")[0] for r in rows if r.split == "test"} == {"val"}
    assert _prompts(store) == {"photo of tench", "photo of goldfish", "photo of great white shark"}

    card = write_card(store, {"dataset": "in", "version": "v1"}, {})
    assert card["real"]["class_names"] == {"0": "tench", "1": "goldfish", "2": "great white shark"}
    assert card["real"]["class_folders"] == {"0": TENCH, "1": GOLDFISH, "2": SHARK}
    assert card["real"]["splits"] == {"test": {"0": 2, "1": 2, "2": 2}, "train": {"0": 3, "1": 3, "2": 3}}

    from realfake.ood import class_folders  # OOD sets are matched by the wnid, which the manifest now records

    assert class_folders(store) == [TENCH, GOLDFISH, SHARK]


def test_loc_synset_mapping_names_classes_by_the_first_lemma(tmp_path):
    src = _tree(tmp_path / "src", {f"train/{w}": 2 for w in (TENCH, GOLDFISH)})
    (src / "LOC_synset_mapping.txt").write_text(f"{TENCH} tench, Tinca tinca\n{GOLDFISH} goldfish, Carassius "
                                                "auratus\nn01484850 great white shark, white shark, man-eater\n")
    layout = scan_image_folder(str(src))
    assert [c.class_name for c in layout.classes] == ["tench", "goldfish"]
    assert layout.class_names_file == str(src / "LOC_synset_mapping.txt")

    # a file elsewhere, named by source.class_names, beats the one in the root
    elsewhere = tmp_path / "devkit" / "synsets.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text(f"{TENCH} Tinca tinca\n{GOLDFISH} Carassius auratus\n")
    store = Store(str(tmp_path / "v"))
    ingest(SourceConfig(uri=str(src), class_names=str(elsewhere), test_fraction=0.5), store)
    assert {r.class_name for r in read_manifest(store)} == {"Tinca tinca", "Carassius auratus"}
    with pytest.raises(FileNotFoundError, match="source.class_names = .*nope.txt does not exist"):
        scan_image_folder(str(src), class_names=str(tmp_path / "nope.txt"))
    problem, _ = _class_folders(SourceConfig(uri=str(src), class_names=str(tmp_path / "nope.txt")), None)
    assert problem == f"source.class_names = {tmp_path / 'nope.txt'} does not exist; point it at the class-name " \
                      "file or remove it"
    elsewhere.write_text("n01440764\n")
    problem, _ = _class_folders(SourceConfig(uri=str(src), class_names=str(elsewhere)), None)
    assert problem.startswith(f"{elsewhere} line 1: expected '<folder> <name>")


def test_a_keras_index_copied_in_as_class_names_json_is_read_as_one(tmp_path):
    src = _tree(tmp_path / "src", {TENCH: 2, GOLDFISH: 2})
    (src / "class_names.json").write_text(json.dumps({"0": [TENCH, "tench"], "1": [GOLDFISH, "goldfish"]}))
    assert [c.class_name for c in scan_image_folder(str(src)).classes] == ["tench", "goldfish"]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("class_names.json", '[["n01440764", "tench"]]', "must map folder names to non-empty class-name strings"),
    ("class_names.json", '{"0": ["n01440764", "tench"], "1": "goldfish"}', "or be a Keras class index"),
    ("imagenet_class_index.json", "{'0': ['n01440764', 'tench']}", "is not valid JSON"),
    ("LOC_synset_mapping.txt", "n01440764 tench, Tinca tinca\nn01443537\n", "line 2: expected '<folder> <name>"),
    ("LOC_synset_mapping.txt", "n01440764 tench\nn01440764 tinca\n", "line 2: the folder 'n01440764' is listed twice"),
])
def test_a_malformed_class_name_file_is_one_line_naming_the_file_and_the_format(tmp_path, name, content, expected):
    src = _tree(tmp_path / "src", {TENCH: 1, GOLDFISH: 1})
    (src / name).write_text(content)
    with pytest.raises(ValueError) as e:
        scan_image_folder(str(src))
    text = _one_line(e)
    assert text.startswith(str(src / name)) and expected in text


def test_wnid_folders_without_a_name_file_take_the_shipped_names(tmp_path):
    src = _tree(tmp_path / "src", {f"train/{w}": 2 for w in (TENCH, GOLDFISH)} | {f"val/{w}": 1 for w in (TENCH,
                                                                                                           GOLDFISH)})
    store = Store(str(tmp_path / "v"))
    ingest(SourceConfig(uri=str(src)), store)
    assert _prompts(store) == {"photo of tench", "photo of goldfish"}
    assert not any("n0" in p for p in _prompts(store, "photo of {class_name}, {caption}"))

    # a wnid outside the 1000 has no name: an error naming the folder and both fixes, not 'photo of n09999999'
    _tree(src, {"train/n09999999": 1})
    with pytest.raises(ValueError) as e:
        scan_image_folder(str(src))
    text = _one_line(e)
    assert "['n09999999']" in text and "class_names.json" in text and "source.keep_wnids=true" in text
    # ... unless the user asks for wnids
    store = Store(str(tmp_path / "v2"))
    ingest(SourceConfig(uri=str(src), keep_wnids=True), store)
    assert _prompts(store) == {f"photo of {w}" for w in (TENCH, GOLDFISH, "n09999999")}


def test_names_an_imagenet_file_gives_to_two_classes_fall_back_to_the_shipped_ones(tmp_path):
    crane_bird, crane_machine = "n02012849", "n03126707"  # both 'crane' in Keras' and LOC's files
    src = _tree(tmp_path / "src", {crane_bird: 2, crane_machine: 2})
    (src / "LOC_synset_mapping.txt").write_text(f"{crane_bird} crane\n{crane_machine} crane\n")
    layout = scan_image_folder(str(src))
    assert [c.class_name for c in layout.classes] == ["crane bird", "construction crane"]
    assert len(layout.warnings) == 1 and "'crane'" in layout.warnings[0]
    # realfake's own file is the user's word: one name for two folders stays an error there
    (src / "class_names.json").write_text(json.dumps({crane_bird: "crane", crane_machine: "crane"}))
    with pytest.raises(ValueError, match=r"'crane' to \['n02012849', 'n03126707'\]"):
        scan_image_folder(str(src))


# --------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("folders", "expected"), [
    (["train", "validation"], "rename validation/"),
    (["Train", "Val"], "rename Train/, Val/"),
    (["training", "testing"], "rename testing/, training/"),
    (["val"], "holds val/ but no train/"),
    (["val", "test"], "holds test/, val/ but no train/"),
    (["cat", "dog", "test"], "holds test/ but no train/"),
    (["train", "val", "test"], "set source.test_split to val or test"),
])
def test_split_folders_are_never_taken_for_classes(tmp_path, folders, expected):
    src = _tree(tmp_path / "src", {f"{f}/{c}": 1 for f in folders for c in ("a", "b")})
    with pytest.raises(ValueError) as e:
        scan_image_folder(str(src))
    assert expected in _one_line(e)
    # preflight reads the layout the same way, from two listings
    problem, _ = _class_folders(SourceConfig(uri=str(src)), None)
    assert problem is not None and expected in problem


def test_train_val_and_test_need_the_test_split_named(tmp_path):
    src = _tree(tmp_path / "src", {f"{s}/{c}": n for s, n in (("train", 2), ("val", 1), ("test", 3)) for c in "ab"})
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(uri=str(src), test_split="test"), store)
    assert (res.train, res.test) == (4, 6)
    skipped = store.read_table(*REJECTS).column("reason").to_pylist()
    assert skipped == ["skipped: outside the train/ and test/ folders"] * 2  # val/ left out, recorded
    (src / "val").rename(src / "old")
    with pytest.raises(ValueError, match=r"has no val/ next to train/ \(source.test_split = val\); set "
                                         r"source.test_split to auto or test"):
        scan_image_folder(str(src), test_split="val")


def test_train_alone_carves_the_test_split_out_of_it(tmp_path):
    src = _tree(tmp_path / "src", {"train/a": 10, "train/b": 10})
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(uri=str(src), test_fraction=0.2), store)
    assert (res.train, res.test, res.classes) == (16, 4, ["a", "b"])  # not one class named 'train'
    assert any("train/ has no val/ or test/ next to it: the real test split is carved out of it (0.2" in w
               for w in res.warnings)
    assert {r.sample_id.split("/")[0] for r in read_manifest(store)} == {"train"}
    assert _class_folders(SourceConfig(uri=str(src)), None) == (None, 2)


def test_a_flat_val_folder_is_a_clear_error(tmp_path):
    src = _tree(tmp_path / "src", {f"train/{w}": 1 for w in (TENCH, GOLDFISH)} | {"val": 4})
    (src / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(ValueError) as e:
        ingest(SourceConfig(uri=str(src)), Store(str(tmp_path / "v")))
    text = _one_line(e)
    assert f"{src}/val/ holds 4 image(s) directly, not in class folders" in text
    assert "valprep.sh" in text and "LOC_val_solution.csv" in text
    assert not (tmp_path / "v" / MANIFEST[0]).exists()  # refused before any image was read
    flat_train = _tree(tmp_path / "flat", {"train": 2, f"val/{TENCH}": 1})
    with pytest.raises(ValueError, match=r"train/ holds 2 image\(s\) directly, not in class folders: arrange them as "
                                         r"train/<class>/<image>; if 'train' is one of your classes, rename"):
        scan_image_folder(str(flat_train))
    empty_val = _tree(tmp_path / "empty", {f"train/{TENCH}": 1, "val": 0})
    with pytest.raises(FileNotFoundError, match=r"val/ holds no class folders: put its images in val/<class>/<image>, "
                                                r"or remove val/"):
        scan_image_folder(str(empty_val))


# --------------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------------
def test_imagenette_is_cut_from_a_wider_wnid_tree(tmp_path):
    others = ["n01491361", "n01494475"]  # two ImageNet classes outside Imagenette
    src = _tree(tmp_path / "imagenet", {f"{s}/{w}": n for s, n in (("train", 2), ("val", 1))
                                        for w in IMAGENETTE + others})
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(uri=str(src), classes="imagenette"), store)
    assert (res.train, res.test, res.rejects) == (20, 10, 0)  # the other classes are neither rows nor rejects
    rows = read_manifest(store)
    # labels in the authors' order (their list is ascending class indices = sorted wnids), names theirs
    assert sorted({(r.label, r.folder) for r in rows}) == list(enumerate(IMAGENETTE))
    assert res.classes == ["tench", "English Springer Spaniel", "cassette player", "chainsaw", "church",
                           "French horn", "garbage truck", "gas pump", "golf ball", "parachute"]
    assert not {r.folder for r in rows} & set(others)
    # `realfake plan` counts what ingest will keep
    from realfake.plan import build_plan

    cfg = load_config("imagenette", overrides=[f"source.uri={src}", "finetune.max_steps=4"])
    assert (lambda r: (r["train"], r["test"], r["classes"]))(build_plan(cfg)["real"]) == (20, 10, 10)
    # the same from a tree that holds only the subset
    only = _tree(tmp_path / "imagenette2", {f"{s}/{w}": 1 for s in ("train", "val") for w in IMAGENETTE})
    assert len(scan_image_folder(str(only), classes="imagenette").classes) == 20
    # an explicit list of folders
    two = scan_image_folder(str(src), classes=[TENCH, "n01491361"])
    assert sorted({c.folder for c in two.classes}) == [TENCH, "n01491361"]


def test_missing_subset_classes_are_one_line_naming_them(tmp_path):
    src = _tree(tmp_path / "src", {f"train/{w}": 1 for w in IMAGENETTE[:8]} | {f"val/{w}": 1 for w in IMAGENETTE})
    with pytest.raises(ValueError) as e:
        scan_image_folder(str(src), classes="imagenette")
    text = _one_line(e)
    assert text.startswith("source.classes = imagenette: 2 of its 10 classes have no folder in " + str(src / "train"))
    assert "['n03445777', 'n03888257']" in text
    problem, _ = _class_folders(SourceConfig(uri=str(src), classes="imagenette"), None)
    assert problem == text
    assert _class_folders(SourceConfig(uri=str(src), classes=IMAGENETTE[:3]), None) == (None, 3)


def test_presets_select_their_subsets():
    assert load_config("imagenette", overrides=["source.uri=/d"]).source.classes == "imagenette"
    assert load_config("in100", overrides=["source.uri=/d"]).source.classes == "in100"
    assert load_config("in1k", overrides=["source.uri=/d"]).source.classes is None
    with pytest.raises(ValueError, match="'in10' is not a named subset"):
        load_config("in1k", overrides=["source.uri=/d", "source.classes=in10"])


def test_the_shipped_lists_are_the_authors_and_agree_with_each_other():
    names = imagenet_names()
    wnids = resources.files("realfake.data").joinpath("ood_classes", "imagenet_1k.txt").read_text().split()
    assert list(names) == wnids  # class-index order, the same wnids as the OOD list
    assert len(set(names.values())) == 1000
    assert (names[TENCH], names[SHARK], names["n02012849"], names["n15075141"]) == (
        "tench", "great white shark", "crane bird", "toilet paper")
    assert list(subset_folders("imagenette")) == IMAGENETTE
    in100 = subset_folders("in100")
    assert len(in100) == 100 and list(in100) == sorted(in100)
    # the authors' indices (data/new_load_data.py line 201), first and last three
    assert [wnids.index(w) for w in in100[:3] + in100[-3:]] == [15, 45, 54, 960, 993, 994]


def test_parse_tells_the_format_by_content():
    assert parse_class_names(b'{"a": "apple"}', "x.json").format == "class_names.json"
    assert parse_class_names(b'{"0": ["n01440764", "tench"]}', "x").format == "imagenet_class_index.json"
    assert parse_class_names(b"n01440764 tench, Tinca tinca\r\n", "x.txt").names == {"n01440764": "tench"}
    assert parse_class_names("\ufeff{\"a\": \"apple\"}".encode(), "bom.json").names == {"a": "apple"}
