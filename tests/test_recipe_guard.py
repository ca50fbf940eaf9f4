"""Committed output is never silently stale: a version's shards carry the recipe they were made under.

A miniature version is built (tiny models, three digit classes); then the class names are changed the way a user
does it, by rewriting the source's class-name file and re-running prepare. Prepare refuses and leaves the version as
it was; forced (mode=overwrite), the manifest changes, verify fails naming the two class maps, and synthesize and
finalize refuse naming ``class names`` until synthesize overwrites, after which the prompts read back from the index
use the new names. The same recipe resumes and writes nothing. The shard-level part (plan_pending with a recipe)
is tested on toy records, without models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import mini_config
from test_shards import item_key, items_for, mini_build

from realfake.config import ShardConfig
from realfake.data.card import read_card, verify_version
from realfake.data.shards import RECIPE_FILE, committed_shards, plan_pending, read_index, read_recipe
from realfake.data.storage import version_store
from realfake.recipe import RecipeMismatchError, recipe_diff

CLASSES = ("0", "1", "2")


# ---------------------------------------------------------------------------------------------------------
# recipe_diff
# ---------------------------------------------------------------------------------------------------------
def test_recipe_diff_names_each_field_and_counts_class_names() -> None:
    old = {"class names": {str(i): f"n0144{i:04d}" for i in range(10)}, "synthesis.steps": 30, "gone": 1}
    new = {"class names": {**old["class names"], "0": "tench", "1": "goldfish", "2": "shark", "3": "ray"},
           "synthesis.steps": 40}
    assert recipe_diff(old, new) == [
        "class names: 4 of 10 differ (0: 'n01440000' -> 'tench', 1: 'n01440001' -> 'goldfish', "
        "2: 'n01440002' -> 'shark', ...)",
        "synthesis.steps: 30 -> 40",
        "gone: 1 -> (not recorded)",
    ]
    assert recipe_diff(new, new) == []
    grown = {"class names": {**old["class names"], "10": "new"}, "synthesis.steps": 30, "gone": 1}
    assert recipe_diff(old, grown) == ["class names: 1 new (10: 'new')"]
    assert recipe_diff(old, grown, may_grow=("class names",)) == []  # an extension may add classes, not rename


# ---------------------------------------------------------------------------------------------------------
# plan_pending with a recipe, on toy records
# ---------------------------------------------------------------------------------------------------------
def _plan(store, items, recipe, mode="resume"):
    return plan_pending(store, items, item_key, 4, mode=mode, recipe=recipe,
                        may_grow=("class names",))


def test_plan_pending_records_the_recipe_and_refuses_committed_shards_made_under_another(tmp_path: Path) -> None:
    store = version_store(str(tmp_path), "toy", "v1")
    items = items_for(3)
    a = {"class names": {"0": "n01440764", "1": "n01443537", "2": "n01484850"}, "synthesis.steps": 30}
    plans = _plan(store, items, a)
    assert json.loads(Path(store.path("synthetic", RECIPE_FILE)).read_bytes()) == a
    before = Path(store.path("synthetic", RECIPE_FILE)).read_bytes()
    assert [p.name for p in _plan(store, items, a)] == [p.name for p in plans]  # same bytes, any number of calls
    assert Path(store.path("synthetic", RECIPE_FILE)).read_bytes() == before
    mini_build(store, items, ShardConfig(format="webdataset", max_count=4))  # commits the plan (no recipe given)
    assert _plan(store, items, a) == []  # same recipe: resume, nothing left

    b = {**a, "class names": {**a["class names"], "0": "tench"}}
    with pytest.raises(RecipeMismatchError, match=r"class names: 1 of 3 differ \(0: 'n01440764' -> 'tench'\).*"
                                                  r"--set mode=overwrite.*--set version=v2"):
        _plan(store, items, b)
    with pytest.raises(RecipeMismatchError, match="class names"):
        _plan(store, items, b, mode="extend")  # a renamed class is no extension
    assert read_recipe(store) == a and len(committed_shards(store)) == 3  # the refusal changed nothing

    assert len(_plan(store, items, b, mode="overwrite")) == 3  # deleted: everything to rebuild under b
    assert committed_shards(store) == [] and read_recipe(store) == b


def test_overwrite_keeps_shards_already_made_under_this_recipe(tmp_path: Path) -> None:
    """A re-run of an interrupted overwrite (or a second shard group of the same build) resumes it."""
    store = version_store(str(tmp_path), "toy", "v1")
    items = items_for(3)
    recipe = {"class names": {"0": "circle", "1": "square", "2": "triangle"}}
    _plan(store, items, recipe)
    mini_build(store, items, ShardConfig(format="webdataset", max_count=4))
    kept = [(c.name, c.sha256) for c in committed_shards(store)]
    assert _plan(store, items, recipe, mode="overwrite") == []
    assert [(c.name, c.sha256) for c in committed_shards(store)] == kept


def test_shards_without_a_recorded_recipe_are_refused(tmp_path: Path) -> None:
    store = version_store(str(tmp_path), "toy", "v1")
    items = items_for(2)
    mini_build(store, items, ShardConfig(format="webdataset", max_count=4))  # as an earlier realfake did
    with pytest.raises(RecipeMismatchError, match="no recipe recorded"):
        _plan(store, items, {"class names": {"0": "circle", "1": "square", "2": "triangle"}})


# ---------------------------------------------------------------------------------------------------------
# A miniature build: prepare, synthesize, finalize and verify under a changed class map
# ---------------------------------------------------------------------------------------------------------
def _source(digits_folder: str, dest: Path) -> Path:
    dest.mkdir()
    for cls in CLASSES:
        (dest / cls).mkdir()
        for f in sorted((Path(digits_folder) / cls).iterdir())[:3]:
            shutil.copy(f, dest / cls / f.name)
    (dest / "class_names.json").write_text(json.dumps({c: f"digit {c}" for c in CLASSES}))
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base, digits_folder):
    """A finished version (adapter, guidance, shards, card), its baseline and its source, built once; tests work on
    copies."""
    from realfake.build import baseline_config, build_version

    base = tmp_path_factory.mktemp("recipe")
    src = _source(digits_folder, base / "src")
    cfg = mini_config(str(base / "out"), tiny_base, str(src), source__test_fraction=0.0)
    build_version(cfg)
    build_version(baseline_config(cfg))
    return cfg, base


@pytest.fixture
def version(built, tmp_path):
    """A private copy of the built version and of its source folder: (config, source folder)."""
    cfg, base = built
    shutil.copytree(base / "out", tmp_path / "out")
    shutil.copytree(base / "src", tmp_path / "src")
    data = cfg.model_dump(mode="json")
    data["root"], data["source"]["uri"] = str(tmp_path / "out"), str(tmp_path / "src")
    return type(cfg).model_validate(data), tmp_path / "src"


def _with(cfg, **fields):
    data = cfg.model_dump(mode="json")
    data.update(fields)
    return type(cfg).model_validate(data)


def _rename_class_zero(src: Path) -> None:
    names = json.loads((src / "class_names.json").read_text())
    (src / "class_names.json").write_text(json.dumps({**names, "0": "zero"}))


def test_the_built_version_records_its_recipe_in_the_shard_folder_and_the_card(version) -> None:
    from realfake.build import store_of

    cfg, _ = version
    store = store_of(cfg)
    recipe = read_recipe(store)
    assert recipe["class names"] == {c: f"digit {c}" for c in CLASSES}
    assert recipe["synthesis.prompt_template"] == cfg.synthesis.prompt_template
    assert list(recipe["adapters (weights sha256)"]) == ["all"] and recipe["guidance.enabled"] is True
    assert "synthesis.batch_size" not in recipe and "synthesis.seed" in recipe
    assert read_card(store)["synthetic"]["recipe"] == recipe
    assert verify_version(store) == []


def test_same_recipe_resumes_and_writes_nothing(version) -> None:
    from realfake.build import prepare, store_of, synthesize

    cfg, _ = version
    store = store_of(cfg)
    files = {p: p.stat().st_mtime_ns for p in Path(store.path("synthetic")).rglob("*")}
    prepare(cfg)
    assert synthesize(cfg)["shards_written"] == []
    assert {p: p.stat().st_mtime_ns for p in Path(store.path("synthetic")).rglob("*")} == files


def test_new_class_names_are_refused_until_the_images_are_rebuilt(version) -> None:
    from realfake.build import build_version, finalize, prepare, store_of, synthesize
    from realfake.recipe import manifest_class_map

    cfg, src = version
    store = store_of(cfg)
    manifest = Path(store.path("real", "manifest.parquet")).read_bytes()
    _rename_class_zero(src)

    # prepare refuses and writes nothing: the manifest still matches the shards
    with pytest.raises(RecipeMismatchError, match=r"prepare: .*class names: 1 of 3 differ \(0: 'digit 0' -> 'zero'\)"
                                                  r".*--set mode=overwrite.*--set version=v2"):
        prepare(cfg)
    assert Path(store.path("real", "manifest.parquet")).read_bytes() == manifest
    assert verify_version(store) == []

    # forced, prepare writes the new names; the version's parts now disagree, and verify says so
    overwrite = _with(cfg, mode="overwrite")
    prepare(overwrite)
    assert manifest_class_map(store)["0"] == "zero"
    problems = verify_version(store)
    assert any(p.startswith("class names differ between synthetic/_recipe.json and real/manifest.parquet: 1 of 3 "
                            "differ (0: 'digit 0' -> 'zero')") for p in problems), problems
    assert any("synthetic/index.parquet" in p and "class names" in p for p in problems), problems

    # synthesize and finalize refuse under the old recipe, naming the field
    with pytest.raises(RecipeMismatchError, match=r"class names: 1 of 3 differ \(0: 'digit 0' -> 'zero'\)"):
        synthesize(cfg)
    with pytest.raises(RecipeMismatchError, match="finalize: .*class names"):
        finalize(cfg)

    # overwrite needs the adapter trained on the new prompts first; refused before anything is deleted
    with pytest.raises(RecipeMismatchError, match=r"adapter .* is not the one this config trains \(.*prompts.*\): "
                                                  "run the finetune stage first"):
        synthesize(overwrite)
    assert len(committed_shards(store)) == 1

    # the build retrains the adapter on the new prompts, then every image is made again with them
    before = read_recipe(store)
    out = build_version(overwrite)
    assert len(out["synthesis"]["shards_written"]) == 1 and not out["adapters"][0]["skipped"]
    prompts = {r["label"]: r["prompt"] for r in read_index(store).to_pylist()}
    assert prompts[0].startswith("photo of zero") and prompts[1].startswith("photo of digit 1")
    after = read_recipe(store)
    assert {d.split(":")[0] for d in recipe_diff(before, after)} == {"class names", "adapters (weights sha256)"}
    assert verify_version(store) == []
    assert build_version(cfg)["synthesis"]["shards_written"] == []  # and the plain re-run resumes


def test_images_per_real_grows_only_with_extend(version) -> None:
    from realfake.build import finalize, store_of, synthesize

    cfg, _ = version
    store = store_of(cfg)
    more = _with(cfg, synthesis={**cfg.synthesis.model_dump(mode="json"), "images_per_real": 2})
    with pytest.raises(RecipeMismatchError, match=r"synthesis.images_per_real: 1 -> 2\. Add the new images to this "
                                                  r"version \(mode=extend, e.g. --set mode=extend\)"):
        synthesize(more)
    first = [(c.name, c.sha256) for c in committed_shards(store)]
    extended = _with(more, mode="extend")
    assert synthesize(extended)["images"] == 9
    assert [(c.name, c.sha256) for c in committed_shards(store)][: len(first)] == first
    finalize(extended)
    assert read_recipe(store)["synthesis.images_per_real"] == 2 and verify_version(store) == []


def test_verify_fails_a_card_with_two_class_maps(version) -> None:
    from realfake.build import store_of

    cfg, _ = version
    store = store_of(cfg)
    card = read_card(store)
    card["real"]["class_names"]["2"] = "n01484850"
    store.write_json(card, "dataset.json")
    problems = verify_version(store)
    assert "class names differ between the card's real classes and real/manifest.parquet: 1 of 3 differ " \
           "(2: 'n01484850' -> 'digit 2')" in problems, problems

    card["real"]["class_names"]["2"] = "digit 2"
    card["synthetic"]["recipe"]["synthesis.steps"] = 99
    store.write_json(card, "dataset.json")
    assert any(p.startswith("card: its recipe differs") and "synthesis.steps: 99 ->" in p
               for p in verify_version(store))


def test_mode_is_a_validated_config_field(version) -> None:
    from realfake.config import ConfigError, load_config

    cfg, _ = version
    data = cfg.model_dump(mode="json")
    assert load_config(data=data, overrides=["mode=overwrite"]).mode == "overwrite"
    with pytest.raises(ConfigError, match="mode"):
        load_config(data=data, overrides=["mode=replace"])


def test_an_overwrite_split_over_shard_groups_writes_the_bytes_of_one_run(version, tmp_path) -> None:
    """A Prefect build plans once (plan_synthesis: the stale shards go) and then runs shard groups, each of which
    synthesizes with mode=overwrite too: a later group must keep what an earlier one wrote under the new recipe, and
    the version must end byte-identical to an overwrite run in one call."""
    from realfake.build import build_version, finalize, finetune, plan_synthesis, prepare, store_of, synthesize

    cfg, src = version
    _rename_class_zero(src)
    shards = {**cfg.shards.model_dump(mode="json"), "max_count": 4}
    over = _with(cfg, mode="overwrite", shards=shards)
    one_call = _with(over, root=str(tmp_path / "one-call"))
    shutil.copytree(cfg.root, one_call.root)
    build_version(one_call)

    prepare(over)
    finetune(over)
    names = plan_synthesis(over)
    assert names == ["shard-000000", "shard-000001", "shard-000002"] and committed_shards(store_of(over)) == []
    store = store_of(over)
    assert synthesize(over, names[:1])["shards_written"] == names[:1]
    first = committed_shards(store)
    assert synthesize(over, names[1:])["shards_written"] == names[1:]
    assert committed_shards(store)[:1] == first  # the first group's shard was kept, not rewritten
    finalize(over)
    assert [(c.name, c.sha256) for c in committed_shards(store)] == \
        [(c.name, c.sha256) for c in committed_shards(store_of(one_call))]
    assert read_recipe(store) == read_recipe(store_of(one_call)) and verify_version(store) == []


def test_the_baseline_version_is_guarded_the_same_way(version) -> None:
    from realfake.build import baseline_config, build_version, prepare, store_of

    cfg, src = version
    base = baseline_config(cfg)
    assert read_recipe(store_of(base))["adapters (weights sha256)"] is None  # text-to-image: no adapter
    _rename_class_zero(src)
    with pytest.raises(RecipeMismatchError, match=r"class names: 1 of 3 differ \(0: 'digit 0' -> 'zero'\)"):
        prepare(base)
    rebuilt = baseline_config(_with(cfg, mode="overwrite"))  # the switch carries over to the baseline
    assert rebuilt.mode == "overwrite"
    assert build_version(rebuilt)["synthesis"]["shards_written"] == ["shard-000000"]
    prompts = {r["label"]: r["prompt"] for r in read_index(store_of(base)).to_pylist()}
    assert prompts[0].startswith("photo of zero") and verify_version(store_of(base)) == []


def test_the_flows_stage_caches_see_a_renamed_class(version) -> None:
    """The Prefect prepare and finetune tasks are cached by content: a class renamed to a name of the same length
    (the class-name file keeps its size) must miss both caches, or the flow would skip prepare and keep the old
    names everywhere."""
    from realfake.build import prepare
    from tasks.cache import finetune_cache_key, source_fingerprint

    cfg, src = version
    source, adapter = source_fingerprint(cfg), finetune_cache_key(None, {"cfg": cfg, "scope": "all"})
    size = (src / "class_names.json").stat().st_size
    names = json.loads((src / "class_names.json").read_text())
    (src / "class_names.json").write_text(json.dumps({**names, "0": "digit 9"}))
    assert (src / "class_names.json").stat().st_size == size
    assert source_fingerprint(cfg) != source
    prepare(_with(cfg, mode="overwrite"))
    assert finetune_cache_key(None, {"cfg": cfg, "scope": "all"}) != adapter


def test_a_source_image_changed_in_place_is_named(version) -> None:
    """Same file name, other pixels: the manifest keeps the sample id, the recipe's per-class image hash moves."""
    from PIL import Image

    from realfake.build import prepare, synthesize

    cfg, src = version
    path = sorted((src / "1").iterdir())[0]
    img = Image.open(path).convert("RGB")
    img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    img.save(path)
    prepare(cfg)  # the class names did not change: prepare goes on
    with pytest.raises(RecipeMismatchError, match=r"real images \(sha256 per class\): 1 of 3 differ \(1: .*\)\. "
                                                  "Rebuild them with this one"):
        synthesize(_with(cfg, mode="extend"))  # not an extension either


def test_a_source_left_with_no_usable_image_is_refused_naming_the_reasons(version) -> None:
    from realfake.build import prepare, store_of

    cfg, src = version
    store = store_of(cfg)
    manifest = Path(store.path("real", "manifest.parquet")).read_bytes()
    for image in src.rglob("*.png"):
        image.write_bytes(b"not an image")
    with pytest.raises(FileNotFoundError) as e:
        prepare(cfg)
    message = str(e.value)
    assert "no usable image" in message and "not an image" in message and "nothing was written" in message
    assert "realfake-prepare-" not in message  # no pointer into the scratch folder, which is gone
    assert Path(store.path("real", "manifest.parquet")).read_bytes() == manifest
