"""Guidance vectors and captions follow the images' contents, not only their ids.

A training image edited in place keeps its path, so its sample_id, but the manifest's sha256 changes; the
guidance and caption stages must recompute that image's row and keep reusing the others. Runs the real
``prepare`` stage with the tiny CLIP tower of ``tiny_base`` and a tiny random-weight BLIP-2 (tests/test_caption.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import mini_config
from PIL import Image
from test_caption import make_version, small_folder

from realfake.build import prepare, store_of
from realfake.data.manifest import CAPTIONS, GUIDANCE, read_guidance, read_manifest


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    from realfake.models.captioner import build_tiny_blip2, load_captioner

    folder = str(build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "blip2"))
    return folder, *load_captioner(folder)


def _config(tmp_path: Path, tiny_base: str, digits_folder: str, blip_folder: str, **over):
    source = small_folder(tmp_path / "src", digits_folder, per_class=4, classes=2)
    return mini_config(str(tmp_path / "out"), tiny_base, source,
                       models={"base": tiny_base, "clip": tiny_base, "captioner": blip_folder},
                       caption={"enabled": True, "max_new_tokens": 6, "batch_size": 2}, **over)


def _captions(store) -> dict[str, str]:
    t = store.read_table(*CAPTIONS)
    return dict(zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist(), strict=True))


def _count_generate(model, calls: list[int]):
    real = model.generate

    def counting(**kw):
        calls.append(kw["pixel_values"].shape[0])
        return real(**kw)

    model.generate = counting


def _edit_in_place(path: str) -> None:
    """New pixels under the same file name: the inverted image, re-saved as PNG."""
    img = Image.open(path).convert("RGB")
    Image.fromarray(255 - np.asarray(img)).save(path, format="PNG")


def test_image_edited_in_place_is_recomputed_alone(tmp_path, tiny_base, digits_folder, blip, monkeypatch):
    from realfake.caption import _read_image
    from realfake.data.manifest import load_real_image
    from realfake.guidance import image_embeddings
    from realfake.models.captioner import caption_images
    from realfake.models.loading import load_clip_vision

    blip_folder, model, processor = blip
    calls: list[int] = []
    _count_generate(model, calls)
    # prepare loads the captioner itself: hand it the counted one
    monkeypatch.setattr("realfake.models.captioner.load_captioner", lambda *a, **k: (model, processor))
    try:
        cfg = _config(tmp_path, tiny_base, digits_folder, blip_folder)
        store = store_of(cfg)
        first = prepare(cfg)
        train = read_manifest(store, "train")
        n = len(train)
        assert n == 6 and first["captions"]["captioned"] == n and first["guidance"]["embedded"] == n
        assert sum(calls) == n
        old_vec, old_cap = read_guidance(store), _captions(store)

        # an unchanged manifest skips both stages: nothing decoded, nothing embedded
        again = prepare(cfg)
        assert again["captions"]["skipped"] and again["guidance"]["skipped"] and sum(calls) == n

        victim = train[2]
        _edit_in_place(victim.uri)
        res = prepare(cfg.model_copy(update={"mode": "overwrite"}))
        after = read_manifest(store, "train")
        assert [s.sample_id for s in after] == [s.sample_id for s in train]
        new_sha = {s.sample_id: s.sha256 for s in after}
        assert new_sha[victim.sample_id] != victim.sha256
        vec, cap = read_guidance(store), _captions(store)

        # the edited image: its guidance vector is the embedding of the new pixels, its caption the new image's
        clip, clip_proc = load_clip_vision(tiny_base)
        size = clip_proc.crop_size["height"]
        edited = after[2]
        fresh = image_embeddings(clip, clip_proc, [load_real_image(edited, max(size, edited.width, edited.height))],
                                 "cpu")[0]
        # float16 storage and another batch composition: ~5e-3 apart, while the old vector is ~0.7 away
        assert np.abs(vec[victim.sample_id] - fresh).max() < 2e-2 < np.abs(old_vec[victim.sample_id] - fresh).max()
        expect = caption_images(model, processor, [_read_image(edited, None)], max_new_tokens=6)
        assert cap[victim.sample_id] == expect[0]
        # every other row is the stored one, untouched
        others = [s.sample_id for s in train if s.sample_id != victim.sample_id]
        assert all(np.array_equal(vec[i], old_vec[i]) for i in others)
        assert all(cap[i] == old_cap[i] for i in others)
        assert (res["captions"]["captioned"], res["captions"]["reused"]) == (1, n - 1)
        assert (res["guidance"]["embedded"], res["guidance"]["reused"]) == (1, n - 1)
        # each table records the sha256 of the image each row was computed from
        for parts in (GUIDANCE, CAPTIONS):
            t = store.read_table(*parts)
            assert dict(zip(t.column("sample_id").to_pylist(), t.column("sha256").to_pylist(), strict=True)) == new_sha

        # and the new state is stable: a further run skips both stages again
        calls.clear()
        last = prepare(cfg)
        assert last["captions"]["skipped"] and last["guidance"]["skipped"] and sum(calls) == 0
    finally:
        del model.generate


def test_tables_without_sha256_are_recomputed(tmp_path, tiny_base, digits_folder, blip, monkeypatch):
    """Files written before the sha256 column existed cannot be matched to the images: every row is redone."""
    blip_folder, model, processor = blip
    monkeypatch.setattr("realfake.models.captioner.load_captioner", lambda *a, **k: (model, processor))
    cfg = _config(tmp_path, tiny_base, digits_folder, blip_folder)
    store = store_of(cfg)
    prepare(cfg)
    n = len(read_manifest(store, "train"))
    for parts in (GUIDANCE, CAPTIONS):
        t = store.read_table(*parts)
        store.write_table(t.drop_columns(["sha256"]).replace_schema_metadata(t.schema.metadata), *parts)
    res = prepare(cfg)
    assert (res["captions"]["captioned"], res["captions"]["reused"]) == (n, 0)
    assert (res["guidance"]["embedded"], res["guidance"]["reused"]) == (n, 0)
    want = {s.sample_id: s.sha256 for s in read_manifest(store, "train")}
    for parts in (GUIDANCE, CAPTIONS):
        t = store.read_table(*parts)
        assert dict(zip(t.column("sample_id").to_pylist(), t.column("sha256").to_pylist(), strict=True)) == want


def test_caption_parts_of_an_edited_image_are_not_reused(tmp_path, digits_folder, blip):
    """An interrupted captioning run leaves parts; an image they cover is edited before the resume."""
    from realfake.caption import CAPTION_PARTS, _read_image, compute_captions
    from realfake.data.ingest import ingest
    from realfake.models.captioner import caption_images

    blip_folder, model, processor = blip
    cfg, store = make_version(tmp_path, small_folder(tmp_path / "src", digits_folder), blip_folder)
    train = read_manifest(store, "train")
    victim = Path(train[5].uri)  # third batch of two: the parts of the first two batches are written first
    hidden = victim.with_suffix(".bak")
    victim.rename(hidden)
    with pytest.raises(RuntimeError, match=str(victim)):
        compute_captions(cfg, store, model, processor)
    hidden.rename(victim)
    assert len(store.listdir(*CAPTION_PARTS)) == 2  # covering train[0:4]
    _edit_in_place(train[1].uri)
    ingest(cfg.source, store, workers=2)
    calls: list[int] = []
    _count_generate(model, calls)
    try:
        report = compute_captions(cfg, store, model, processor)
    finally:
        del model.generate
    assert (report["reused"], report["captioned"], sum(calls)) == (3, 5, 5)
    edited = read_manifest(store, "train")[1]
    assert edited.sample_id == train[1].sample_id and edited.sha256 != train[1].sha256
    assert _captions(store)[edited.sample_id] == caption_images(model, processor, [_read_image(edited, None)],
                                                                max_new_tokens=6)[0]
