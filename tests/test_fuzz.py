"""Fuzzing: the config parser, the table readers and the image decoder against arbitrary input.

- ``load_config`` with random nested dicts and ``a.b=c`` overrides either validates or raises ``ConfigError``.
- The manifest, guidance and index readers give back exactly what was written (hypothesis round trips), and
  fail loudly on bytes that are not Parquet.
- :func:`realfake.data.ingest.decode` over mutated bytes of real PNG / JPEG / GIF / WebP / TIFF / BMP files
  (bit flips, truncations, splices, zeroed and duplicated ranges) never crashes and never hangs: every case is
  an RGB image within the size limits or a reject with a known category. The number of cases run is printed
  (``-s``) and asserted; docs/input-handling.md records it.
"""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from realfake.config import BuildConfig, ConfigError, load_config
from realfake.data.images import MAX_PIXELS, MIN_SIDE, REJECT_CATEGORIES, RejectedImage, decode
from realfake.data.manifest import GUIDANCE, MANIFEST, MANIFEST_SCHEMA, guidance_table, read_guidance, read_manifest
from realfake.data.storage import Store

_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------------------------------------
# Config parser
# --------------------------------------------------------------------------------------------------------
_FIELDS = sorted({*BuildConfig.model_fields, *(f for sec in ("source", "models", "caption", "guidance", "finetune",
                  "synthesis", "shards", "classifier")
                  for f in BuildConfig.model_fields[sec].annotation.model_fields)})  # type: ignore[union-attr]
_keys = st.one_of(st.sampled_from(_FIELDS), st.text(max_size=12))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.sampled_from(["image_folder", "demo_digits", "webdataset", "1e-4", "no"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=5)), max_leaves=20)
_config_dicts = st.dictionaries(_keys, _values, max_size=8).map(
    lambda d: {"dataset": "fuzz", "source": {"kind": "demo_digits"}, **d}
)
_SECTION_FIELDS = sorted(f"{sec}.{f}" for sec in ("source", "models", "caption", "guidance", "finetune", "synthesis",
                         "shards", "classifier")
                         for f in BuildConfig.model_fields[sec].annotation.model_fields)  # type: ignore[union-attr]
_override = st.builds(
    lambda path, value: f"{'.'.join(path)}={value}",
    st.one_of(st.lists(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), min_size=1, max_size=3),
              st.sampled_from(_SECTION_FIELDS).map(lambda p: p.split("."))),  # real fields, so some validate
    st.one_of(st.text(max_size=15), st.integers(0, 64).map(str),
              st.sampled_from(["[", "{a: 1", "!!python/object:os.system", "*x", "&a [*a]", "1e999", "-1", "null",
                               "[1, 2]", "{}", "'", "true", "false", "no", "0.5", "png", "parquet", "rbf"])),
)


@_SETTINGS
@given(_config_dicts)
def test_config_from_random_dicts_validates_or_raises_config_error(data):
    try:
        cfg = load_config(data=data)
    except ConfigError as e:
        assert str(e).startswith("invalid configuration") and "\n" in str(e)
        return
    assert isinstance(cfg, BuildConfig)


@_SETTINGS
@given(st.lists(_override, max_size=4))
@example(["synthesis.steps=12", "shards.format=parquet", "finetune.mmd_kernel=rbf", "finetune.mixed_precision=no"])
def test_config_overrides_validate_or_raise_config_error(overrides):
    try:
        cfg = load_config(data={"dataset": "fuzz", "source": {"kind": "demo_digits"}}, overrides=overrides)
    except ConfigError as e:
        assert str(e).startswith(("invalid configuration", "override ")), str(e)
        return
    assert isinstance(cfg, BuildConfig)
    # what validated is a whole config: written out and loaded back, it is the same config
    dumped = cfg.model_dump(mode="json")
    assert load_config(data=dumped) == cfg
    # and every override of a field took effect (when no other override touches the same path)
    paths = [item.split("=", 1)[0].strip().split(".") for item in overrides]
    for item, path in zip(overrides, paths, strict=True):
        if sum(p[: len(path)] == path or path[: len(p)] == p for p in paths) > 1 or len(path) != 2:
            continue
        section, name = path
        if not isinstance(dumped.get(section), dict) or name not in dumped[section]:
            continue
        raw = item.split("=", 1)[1]
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()
        assert dumped[section][name] == value, item


@pytest.mark.parametrize("item", ["synthesis.steps=[", "source.uri={a: 1", "x=!!python/object:os.system",
                                  "synthesis.steps=*x", "a.b=\t"])
def test_overrides_that_are_not_yaml_are_config_errors(item):
    with pytest.raises(ConfigError, match="override"):
        load_config(data={"dataset": "fuzz", "source": {"kind": "demo_digits"}}, overrides=[item])


# --------------------------------------------------------------------------------------------------------
# Table readers
# --------------------------------------------------------------------------------------------------------
_text = st.text(max_size=30)
_manifest_rows = st.lists(
    st.fixed_dictionaries({
        "sample_id": _text, "split": st.sampled_from(["train", "test"]), "label": st.integers(0, 2**31 - 1),
        "class_name": _text, "uri": _text, "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
        "width": st.integers(1, 2**31 - 1), "height": st.integers(1, 2**31 - 1), "folder": _text,
    }),
    max_size=30, unique_by=lambda r: r["sample_id"],
)


@_SETTINGS
@given(_manifest_rows)
def test_manifest_round_trips_any_rows(tmp_path, rows):
    store = Store(str(tmp_path / "m"))
    store.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), *MANIFEST)
    got = read_manifest(store)
    assert [r.__dict__ for r in got] == sorted(rows, key=lambda r: r["sample_id"])
    assert [r.sample_id for r in read_manifest(store, "test")] == sorted(r["sample_id"] for r in rows
                                                                         if r["split"] == "test")


@_SETTINGS
@given(st.lists(_text, max_size=20, unique=True), st.integers(1, 16), st.randoms(use_true_random=False))
def test_guidance_round_trips_any_ids_and_width(tmp_path, ids, dim, rnd):
    store = Store(str(tmp_path / "g"))
    emb = np.array([[rnd.uniform(-60000, 60000) for _ in range(dim)] for _ in ids], np.float32).reshape(len(ids), dim)
    store.write_table(guidance_table(ids, emb, "m"), *GUIDANCE)
    got = read_guidance(store)
    assert list(got) == ids
    for i, k in enumerate(ids):
        assert np.array_equal(got[k], emb[i].astype(np.float16).astype(np.float32))


@_SETTINGS
@given(st.binary(max_size=2000))
def test_tables_that_are_not_parquet_fail_loudly(tmp_path, blob):
    store = Store(str(tmp_path / "x"))
    store.write_bytes(blob, *MANIFEST)
    with pytest.raises((pa.ArrowInvalid, OSError, ValueError)):
        read_manifest(store)


def test_index_reader_round_trips_written_rows(tmp_path):
    from realfake.data.shards import INDEX_SCHEMA, read_index

    rng = random.Random(0)
    rows = [{f.name: (rng.randint(0, 2**31 - 1) if pa.types.is_integer(f.type) else
                      "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 12)))) for f in INDEX_SCHEMA}
            for _ in range(50)]
    store = Store(str(tmp_path / "v"))
    store.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), "synthetic", "index.parquet")
    assert read_index(store).to_pylist() == rows


# --------------------------------------------------------------------------------------------------------
# Image decoder over mutated real files
# --------------------------------------------------------------------------------------------------------
def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    smooth = np.clip(np.cumsum(rng.integers(-8, 9, (48, 64, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(smooth)
    out: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    save("rgb.png", rgb, "PNG")
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("palette.png", rgb.convert("P"), "PNG", transparency=3)
    save("gray16.png", Image.fromarray(smooth[..., 0].astype(np.uint16) * 257), "PNG")
    save("baseline.jpg", rgb, "JPEG", quality=90, exif=exif)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    frames = [rgb, rgb.transpose(Image.FLIP_LEFT_RIGHT), rgb.rotate(180)]
    save("anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    save("lossy.webp", rgb, "WEBP", quality=80)
    save("lossless.webp", rgb.convert("RGBA"), "WEBP", lossless=True)
    save("anim.webp", frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    save("lzw.tiff", rgb, "TIFF", compression="tiff_lzw")
    save("rgb.bmp", rgb, "BMP")
    return out


def _mutations(seeds: dict[str, bytes], n: int, rng: random.Random):
    blobs = list(seeds.values())
    for i in range(n):
        data = bytearray(rng.choice(blobs))
        kind = i % 5
        if kind == 0:  # bit flips
            for _ in range(rng.randint(1, 12)):
                p = rng.randrange(len(data))
                data[p] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # splice two files
            other = rng.choice(blobs)
            data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]
        elif kind == 3:  # zero or random bytes over a range (header fields included)
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randint(1, 64))
            fill = rng.choice([0x00, 0xFF, None])
            data[a:b] = bytes(rng.randrange(256) if fill is None else fill for _ in range(b - a))
        else:  # duplicate a chunk (repeated markers, chunk-length confusion)
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randint(1, 256))
            data = data[:b] + data[a:b] * rng.randint(1, 4) + data[b:]
        yield bytes(data)


def _fuzz_decode(n: int, seed: int) -> dict[str, int]:
    seeds = _seed_files()
    for name, blob in seeds.items():  # the unmutated files all decode
        assert decode(blob).image.mode == "RGB", name
    outcome: dict[str, int] = {}
    slowest = 0.0
    for data in _mutations(seeds, n, random.Random(seed)):
        t = time.thread_time()  # CPU time of this thread: what a pathological file costs, whatever the load
        try:
            img = decode(data).image
            assert img.mode == "RGB" and min(img.size) >= MIN_SIDE and img.width * img.height <= MAX_PIXELS
            key = "accepted"
        except RejectedImage as e:
            assert e.category in REJECT_CATEGORIES and " at 0x" not in str(e)
            key = e.category
        slowest = max(slowest, time.thread_time() - t)
        outcome[key] = outcome.get(key, 0) + 1
    assert sum(outcome.values()) == n
    assert slowest < 5.0, f"one mutated file took {slowest:.1f} CPU s to decode"
    print(f"\nfuzzed decode(): {n} cases from {len(seeds)} real files, slowest {slowest * 1000:.0f} ms: {outcome}")
    return outcome


def test_decode_survives_mutated_real_images():
    outcome = _fuzz_decode(10_000, seed=1)
    assert outcome.get("accepted", 0) > 100 and len(outcome) >= 3  # both sides of the decision are exercised


@pytest.mark.slow
def test_decode_survives_many_mutated_real_images():
    _fuzz_decode(100_000, seed=2)


def test_ingest_survives_a_folder_of_mutated_images(tmp_path):
    from realfake.config import SourceConfig
    from realfake.data.ingest import ingest
    from realfake.data.manifest import REJECTS

    seeds = _seed_files()
    src = tmp_path / "src"
    for i, data in enumerate(_mutations(seeds, 300, random.Random(3))):
        d = src / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        ext = list(seeds)[i % len(seeds)].rsplit(".", 1)[1]
        (d / f"{i:04d}.{ext}").write_bytes(data)
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.2), store)
    assert res.train + res.test + res.rejects == 300
    assert all(r["reason"].partition(":")[0] in REJECT_CATEGORIES for r in store.read_table(*REJECTS).to_pylist())
