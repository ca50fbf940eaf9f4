"""Tests of realfake.caption and realfake.models.captioner with a tiny BLIP-2 of the real architecture.

The captioner is a random-weight ``Blip2ForConditionalGeneration`` (ViT + Q-Former + OPT) with an offline
byte-level BPE tokenizer, saved with ``save_pretrained`` and loaded back through :func:`load_captioner`, so
the production code path runs end to end; its captions are noise, which is all these tests need.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from realfake.caption import CAPTION_PARTS, caption_settings, compute_captions
from realfake.config import load_config
from realfake.data.ingest import ingest
from realfake.data.manifest import CAPTIONS, CAPTIONS_SCHEMA, read_manifest
from realfake.data.storage import version_store
from realfake.models.captioner import build_opt_tokenizer, build_tiny_blip2, caption_images, load_captioner
from realfake.models.loading import ModelLoadError


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory) -> str:
    return str(build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "blip2"))


@pytest.fixture(scope="module")
def captioner(blip_folder):
    return load_captioner(blip_folder)


def small_folder(dest: Path, digits_folder: str, per_class: int = 3, classes: int = 4) -> str:
    """A private image folder (tests may damage it): the first images of a few digit classes."""
    src = Path(digits_folder)
    for label in range(classes):
        (dest / str(label)).mkdir(parents=True)
        for f in sorted((src / str(label)).glob("*.png"))[:per_class]:
            shutil.copy(f, dest / str(label) / f.name)
    return str(dest)


def make_version(tmp_path: Path, source: str, blip: str, **caption):
    cfg = load_config(data={
        "dataset": "caps", "root": str(tmp_path / "out"), "device": "cpu",
        "source": {"kind": "image_folder", "uri": source, "test_fraction": 0.34},
        "models": {"captioner": blip},
        "caption": {"enabled": True, "max_new_tokens": 6, "batch_size": 2, **caption},
    })
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    ingest(cfg.source, store, workers=2)
    return cfg, store


def test_tokenizer_merges_whole_words_and_round_trips_any_text():
    tok = build_opt_tokenizer()
    assert len(tok("a photo of digit").input_ids) == 4  # one token per word, with or without leading space
    text = "Zebra crossing, 7 µm! ∑"
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (2, 1, 2)  # OPT's ids


def test_load_captioner_round_trip(blip_folder, captioner):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model, processor = captioner
    assert isinstance(model, Blip2ForConditionalGeneration) and isinstance(processor, Blip2Processor)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert processor.num_query_tokens == model.config.num_query_tokens == 4
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    images = [Image.new("RGB", (40, 30), (i * 60, 255 - i * 60, 90)) for i in range(3)]
    plain = caption_images(model, processor, images, max_new_tokens=5)
    assert len(plain) == 3 and all(isinstance(c, str) and "\n" not in c for c in plain)
    assert caption_images(model, processor, images, max_new_tokens=5) == plain  # greedy decoding is deterministic
    prompted = caption_images(model, processor, images, prompt="a photo of", max_new_tokens=5)
    assert not any(c.startswith("a photo of") for c in prompted)  # only the continuation is kept
    assert caption_images(model, processor, []) == []


def test_processor_without_query_count_is_repaired(tmp_path, blip_folder):
    import json

    folder = tmp_path / "old-save"
    shutil.copytree(blip_folder, folder)
    cfg_file = folder / "processor_config.json"
    data = json.loads(cfg_file.read_text())
    data.pop("num_query_tokens")  # what saves from before the image-token processor look like
    cfg_file.write_text(json.dumps(data))
    _, processor = load_captioner(str(folder))
    assert processor.num_query_tokens == 4


def test_image_token_mismatch_is_rejected(tmp_path, blip_folder):
    import json

    folder = tmp_path / "mismatch"
    shutil.copytree(blip_folder, folder)
    data = json.loads((folder / "config.json").read_text())
    data["image_token_index"] = 5
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="image_token_index is 5"):
        load_captioner(str(folder))


@pytest.mark.parametrize("kind", ["missing_folder", "empty_folder", "hub_id"])
def test_bad_model_id_names_it(tmp_path, monkeypatch, kind):
    import huggingface_hub.constants

    # the hub library reads HF_HUB_OFFLINE at import; without it a hub id retries the network for minutes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_id = {"missing_folder": str(tmp_path / "nope"), "empty_folder": str(tmp_path),
                "hub_id": "nobody-here/no-such-blip2"}[kind]
    with pytest.raises(ModelLoadError) as err:
        load_captioner(model_id)
    msg = str(err.value)
    assert repr(model_id) in msg and "models.captioner" in msg
    assert ("not a complete BLIP-2 save" in msg) == (kind == "empty_folder")


def test_compute_captions_writes_train_rows(tmp_path, digits_folder, blip_folder, captioner):
    cfg, store = make_version(tmp_path, small_folder(tmp_path / "src", digits_folder), blip_folder)
    model, processor = captioner
    report = compute_captions(cfg, store, model, processor)
    train = read_manifest(store, "train")
    assert report["images"] == report["captioned"] == len(train) == 8 and report["reused"] == 0
    table = store.read_table(*CAPTIONS)
    assert table.schema.remove_metadata() == CAPTIONS_SCHEMA
    assert table.column("sample_id").to_pylist() == [s.sample_id for s in train]
    assert set(table.column("model").to_pylist()) == {blip_folder}
    assert not store.exists(*CAPTION_PARTS)
    # the rows are the captioner's output for those very images, in batches of caption.batch_size
    from realfake.caption import _read_image

    first = [_read_image(s, None) for s in train[:2]]
    assert table.column("caption").to_pylist()[:2] == caption_images(model, processor, first, max_new_tokens=6)
    # nothing left to do: a second call is skipped without decoding anything
    again = compute_captions(cfg, store, model, processor)
    assert again["skipped"] and again["captioned"] == 0


def test_compute_captions_loads_the_configured_model(tmp_path, digits_folder, blip_folder):
    cfg, store = make_version(tmp_path, small_folder(tmp_path / "src", digits_folder, per_class=2, classes=2),
                              blip_folder)
    report = compute_captions(cfg, store)
    assert report["captioned"] == len(read_manifest(store, "train")) == 2
    with pytest.raises(ValueError, match="both model and processor"):
        compute_captions(cfg, store, model=object())


def test_interrupted_run_resumes_where_it_stopped(tmp_path, digits_folder, blip_folder, captioner):
    model, processor = captioner
    source = small_folder(tmp_path / "src", digits_folder)
    cfg, store = make_version(tmp_path, source, blip_folder)
    train = read_manifest(store, "train")
    victim = Path(train[5].uri)  # in the third batch of two: two parts are written before the failure
    hidden = victim.with_suffix(".bak")
    victim.rename(hidden)
    with pytest.raises(RuntimeError, match=str(victim)):
        compute_captions(cfg, store, model, processor)
    assert len(store.listdir(*CAPTION_PARTS)) == 2 and not store.exists(*CAPTIONS)
    hidden.rename(victim)

    calls = []
    real_generate = model.generate

    def counting_generate(**kw):
        calls.append(kw["pixel_values"].shape[0])
        return real_generate(**kw)

    model.generate = counting_generate
    try:
        report = compute_captions(cfg, store, model, processor)
    finally:
        del model.generate
    assert (report["reused"], report["captioned"], sum(calls)) == (4, 4, 4)
    resumed = store.read_table(*CAPTIONS).to_pylist()

    # same captions as one uninterrupted run in a fresh version
    cfg2, store2 = make_version(tmp_path / "fresh", source, blip_folder)
    compute_captions(cfg2, store2, model, processor)
    assert store2.read_table(*CAPTIONS).to_pylist() == resumed


def test_changed_settings_recaption_everything(tmp_path, digits_folder, blip_folder, captioner):
    model, processor = captioner
    cfg, store = make_version(tmp_path, small_folder(tmp_path / "src", digits_folder, per_class=2, classes=2),
                              blip_folder)
    compute_captions(cfg, store, model, processor)
    prompted = cfg.model_copy(update={"caption": cfg.caption.model_copy(update={"prompt": "a photo of"})})
    assert caption_settings(prompted) != caption_settings(cfg)
    report = compute_captions(prompted, store, model, processor)
    assert report["captioned"] == report["images"] == 2 and report["reused"] == 0
    after = store.read_table(*CAPTIONS).column("caption").to_pylist()
    images = [Image.open(s.uri).convert("RGB") for s in read_manifest(store, "train")]
    assert after == caption_images(model, processor, images, prompt="a photo of", max_new_tokens=6)
