"""A build plans once; its shard groups read their own shards' part of that plan (benchmarks/results/scale.md,
finding 3: every group used to plan the whole version again, ~1 minute of CPU and 1.6 GB at ImageNet-1K's size).

On the miniature version of test_recipe_guard (tiny models, three digit classes): the build's plan task
(``plan_synthesis``) records the plan beside the recipe; a group (``synthesize`` with shard names) reads only its
own shards' rows and commit records, removes only its own leftovers, never uses a plan made under another recipe or
mode, and a build split over groups ends with the bytes of one call, for resume, extend and overwrite alike.
Finalize then streams the index (one part at a time) with the same rows as the parts hold, and removes the plan.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from test_recipe_guard import _with, built, version  # noqa: F401 - pytest fixtures

from realfake.data.card import read_card, verify_version
from realfake.data.shards import PLAN_FILE, committed_shards, read_index, read_recipe
from realfake.recipe import RecipeMismatchError, recipe_bytes


def _extended(cfg):
    """Twice the images per real image, four per shard: the new images go to new shards after the committed one."""
    more = _with(cfg, synthesis={**cfg.synthesis.model_dump(mode="json"), "images_per_real": 2},
                 shards={**cfg.shards.model_dump(mode="json"), "max_count": 4}, mode="extend")
    return more


def test_an_extend_split_over_shard_groups_reads_only_its_own_records_and_writes_the_bytes_of_one_run(
        version, tmp_path: Path) -> None:  # noqa: F811
    from realfake.build import finalize, plan_synthesis, store_of, synthesize

    cfg, _ = version
    ext = _extended(cfg)
    one_call = _with(ext, root=str(tmp_path / "one-call"))
    shutil.copytree(cfg.root, one_call.root)
    assert synthesize(one_call)["shards_written"] == ["shard-000001", "shard-000002", "shard-000003"]
    finalize(one_call)

    store = store_of(ext)
    names = plan_synthesis(ext)
    assert names == ["shard-000000", "shard-000001", "shard-000002", "shard-000003"]
    assert store.exists("synthetic", PLAN_FILE)
    # a crashed earlier try of the second group left a temp file; the first group must not remove it
    leftover = Path(store.path("synthetic", "shard-000002.tar.tmp-0a1b2c3d"))
    leftover.write_bytes(b"partial")
    assert synthesize(ext, names[1:2])["shards_written"] == ["shard-000001"]
    assert leftover.exists(), "a group removed another group's file"
    # the committed shard-000000's record is unreadable: a group that reads only its own records does not notice
    record = Path(store.path("synthetic", "_commits", "shard-000000.json"))
    good = record.read_bytes()
    record.write_bytes(b"{not json")
    assert synthesize(ext, names[2:])["shards_written"] == ["shard-000002", "shard-000003"]
    assert not leftover.exists(), "the group's own leftover was kept"
    record.write_bytes(good)

    card = finalize(ext)
    assert not store.exists("synthetic", PLAN_FILE), "finalize leaves the spent plan behind"
    assert [(c.name, c.sha256) for c in committed_shards(store)] == \
        [(c.name, c.sha256) for c in committed_shards(store_of(one_call))]
    assert read_index(store).equals(read_index(store_of(one_call)))
    assert card["synthetic"]["index"] == read_card(store_of(one_call))["synthetic"]["index"]
    assert read_recipe(store) == read_recipe(store_of(one_call)) and verify_version(store) == []


def test_a_group_never_uses_a_plan_made_under_another_recipe_or_mode(version) -> None:  # noqa: F811
    from realfake.build import plan_synthesis, store_of, synthesize

    cfg, _ = version
    ext = _extended(cfg)
    names = plan_synthesis(ext)  # the plan of an extension, recorded
    store = store_of(ext)
    before = [c.name for c in committed_shards(store)]
    # the same shards asked with mode=resume: the extend plan is not used, and the group's own plan refuses
    with pytest.raises(ValueError, match=r"mode='extend'"):
        synthesize(_with(ext, mode="resume"), names[1:2])
    # another recipe (a new seed) in extend mode: refused too, not written from the recorded plan
    reseeded = _with(ext, synthesis={**ext.synthesis.model_dump(mode="json"), "seed": ext.synthesis.seed + 1})
    with pytest.raises(RecipeMismatchError, match=r"synthesis.seed"):
        synthesize(reseeded, names[1:2])
    assert [c.name for c in committed_shards(store)] == before, "a stale plan was used"
    # the recorded recipe changed after the plan was made (another build's plan task): the plan is stale
    recorded = read_recipe(store)
    first = min(recorded["real images (sha256 per class)"])
    recorded["real images (sha256 per class)"][first] = "0" * 16
    store.write_bytes(recipe_bytes(recorded), "synthetic", "_recipe.json")
    with pytest.raises(RecipeMismatchError, match=r"real images"):
        synthesize(ext, names[1:2])
    assert [c.name for c in committed_shards(store)] == before


def test_the_plan_holds_one_row_group_per_pending_shard(version) -> None:  # noqa: F811
    """What lets a group read its own shards' rows only: the plan's row groups are its pending shards in order."""
    import pyarrow.parquet as pq

    from realfake.build import plan_synthesis, store_of

    cfg, _ = version
    ext = _extended(cfg)
    plan_synthesis(ext)
    store = store_of(ext)
    pf = pq.ParquetFile(store.path("synthetic", PLAN_FILE))
    shards = [pf.read_row_group(k).column("shard").unique().to_pylist() for k in range(pf.num_row_groups)]
    assert shards == [["shard-000001"], ["shard-000002"], ["shard-000003"]]
    rows = pq.read_table(store.path("synthetic", PLAN_FILE))
    assert rows.num_rows == 9 and rows.column("replica").to_pylist() == [1] * 9  # the new images only
    assert rows.schema.field("label").type == pa.int32()


def test_finalize_counts_and_the_recipe_read_the_manifest_by_column_with_the_row_by_row_results(tmp_path) -> None:
    """Finalize's real-image counts (card) and the recipe's per-class digests are computed on the manifest's columns
    (its rows as Python objects were ~1 GB at ImageNet-1K's size); they must equal the row-by-row results, on a
    shuffled manifest with unhashed images, empty and missing folders and two names for one label."""
    import hashlib
    import json
    import random
    from collections import Counter

    from realfake.data.card import _real_counts
    from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA, read_manifest
    from realfake.data.storage import Store
    from realfake.synthesize import _real_image_hashes

    rng = random.Random(0)
    rows = []
    for i in range(2000):
        label = rng.randrange(7)
        rows.append({"sample_id": f"s{rng.randrange(10**9)}-{i}", "split": rng.choice(["train", "train", "test"]),
                     "label": label, "class_name": f"c{label}-{rng.randrange(2)}", "uri": f"x/{i}", "width": 1,
                     "height": 1, "sha256": rng.choice([None, hashlib.sha256(str(i).encode()).hexdigest()]),
                     "folder": rng.choice([None, "", f"f{label}"])})
    store = Store(str(tmp_path))
    store.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), *MANIFEST)

    splits: dict[str, Counter] = {}
    names, folders = {}, {}
    for r in rows:
        splits.setdefault(r["split"], Counter())[r["label"]] += 1
        names[r["label"]] = r["class_name"]
        if r["folder"]:
            folders[r["label"]] = r["folder"]
    assert _real_counts(store) == {
        "num_images": 2000, "class_names": {str(k): names[k] for k in sorted(names)},
        "splits": {s: {str(k): c[k] for k in sorted(c)} for s, c in sorted(splits.items())},
        "class_folders": {str(k): folders[k] for k in sorted(folders)}}
    per_class: dict[int, list] = {}
    for s in read_manifest(store, "train"):
        per_class.setdefault(s.label, []).append([s.sample_id, s.sha256])
    expected = {str(k): hashlib.sha256(json.dumps(per_class[k]).encode()).hexdigest()[:16] for k in sorted(per_class)}
    assert _real_image_hashes(store) == expected and list(_real_image_hashes(store)) == list(expected)
