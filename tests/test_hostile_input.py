"""Broken and hostile input: every kind of bad image and dataset layout is normalised or rejected with a reason.

Each image kind of docs/input-handling.md is made here from real pixels with Pillow (no fixtures on disk), run
through :func:`realfake.data.ingest.decode` and through a whole :func:`ingest`, and checked for the outcome the
document promises: the image that comes out, or the reject category. Layout tests cover class names that are
not safe as paths, thousands of classes, mappings that disagree with the folders, duplicates and symlinks.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realfake.config import SourceConfig
from realfake.data.images import MAX_PIXELS, RejectedImage, decode, reject_category
from realfake.data.ingest import ingest
from realfake.data.manifest import MANIFEST, REJECTS, read_manifest
from realfake.data.sources import scan_image_folder
from realfake.data.storage import Store


def _rgb(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR is rewritten to claim ``width`` x ``height`` (CRC fixed): a bomb header."""
    data = bytearray(_save(Image.new("L", (8, 8), 0), "PNG"))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


# --------------------------------------------------------------------------------------------------------
# decode(): one image kind at a time
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "category"),
    [
        (b"", "empty file"),
        (b"this is a text file with a .jpg name", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
        (_save(_rgb(64, 64), "JPEG")[:400], "truncated"),
        (_save(_rgb(64, 64), "PNG")[:300], "truncated"),
        (_save(Image.new("RGB", (1, 1)), "PNG"), "too small"),
        (_save(Image.new("RGB", (4000, 1)), "PNG"), "too small"),
        (_png_claiming(20_000, 20_000), "decompression bomb"),
        (_png_claiming(7_000, 7_000), "decompression bomb"),
    ],
    ids=["zero-bytes", "text", "png-signature-only", "truncated-jpeg", "truncated-png", "1x1", "4000x1",
         "bomb-20000", "bomb-7000"],
)
def test_unusable_bytes_are_rejected_with_a_category(data, category):
    with pytest.raises(RejectedImage) as err:
        decode(data)
    assert err.value.category == category
    assert str(err.value).startswith(f"{category}: ")
    assert " at 0x" not in str(err.value), "reject reasons must be stable: no memory addresses"


@pytest.fixture
def pixel_decodes(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images whose pixels Pillow decoded (``ImageFile.load``) while the test ran."""
    from PIL import ImageFile

    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loads


def test_bomb_is_refused_from_the_header_before_any_pixel_is_decoded(pixel_decodes):
    # the bomb header carries pixel data for 8x8 only: decoding it would fail as "truncated", so the category
    # proves the size check ran first; and no pixel of the claimed 400 Mpx is decoded
    with pytest.raises(RejectedImage, match=r"decompression bomb: declares 400,000,000 pixels \(limit 40,000,000\)"):
        decode(_png_claiming(20_000, 20_000))
    assert pixel_decodes == []


def test_real_highly_compressed_bomb_is_rejected_without_decoding_it(pixel_decodes):
    # a genuine 1-bit 7000x7000 PNG (49 Mpx, above MAX_PIXELS) compresses to a few kB
    data = _save(Image.new("1", (7000, 7000), 0), "PNG", optimize=True)
    assert len(data) < 100_000 and 7000 * 7000 > MAX_PIXELS
    pixel_decodes.clear()
    with pytest.raises(RejectedImage, match="decompression bomb"):
        decode(data)
    assert pixel_decodes == []
    decode(_save(Image.new("RGB", (64, 64)), "PNG"))  # an ordinary image is decoded: the spy sees it
    assert set(pixel_decodes) == {(64, 64)}


def test_modes_are_normalised_to_rgb():
    cmyk = decode(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk.image.mode == "RGB" and "CMYK converted to RGB" in cmyk.notes
    r, g, b = cmyk.image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # C=0 M=1 Y=1 K=0 is red

    gray = decode(_save(Image.new("L", (16, 16), 77), "PNG"))
    assert gray.image.getpixel((3, 3)) == (77, 77, 77)

    pal = decode(_save(_rgb(16, 16).convert("P"), "PNG"))
    assert pal.image.mode == "RGB" and "palette converted to RGB" in pal.notes

    for fmt in ("BMP", "TIFF", "WEBP"):
        assert decode(_save(_rgb(), fmt)).image.size == (32, 24)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out = np.asarray(decode(_save(img, "PNG")).image)[..., 0]
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(out - expected).max() <= 1  # PIL's own convert would clip everything above 255 to white
    assert out.max() > 240 and len(np.unique(out)) == 64


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "PNG"), ("LA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF")])
def test_transparency_is_composited_on_white(mode, fmt):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 200  # red-ish under the alpha
    a[:, 8:, 3] = 255  # right half opaque, left half fully transparent
    img = Image.fromarray(a, "RGBA").convert(mode)
    out = decode(_save(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert "alpha composited on white" in out.notes
    assert out.image.getpixel((2, 2)) == (255, 255, 255)
    assert out.image.getpixel((12, 2)) != (255, 255, 255)


def test_palette_with_transparent_index_is_composited_on_white():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    out = decode(_save(img, "PNG", transparency=1))
    assert out.image.getpixel((0, 0)) == (255, 255, 255)


def test_opaque_alpha_channel_is_just_dropped():
    out = decode(_save(_rgb().convert("RGBA"), "PNG"))
    assert "alpha composited on white" not in out.notes
    assert out.image.tobytes() == _rgb().tobytes()


def test_exif_orientation_is_applied():
    img = _rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode(_save(img, "JPEG", exif=exif))
    assert out.image.size == (20, 40) and "exif orientation applied" in out.notes


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_keeps_its_first_frame_and_says_so(fmt):
    out = decode(_animated(fmt))
    assert "animated: first frame used" in out.notes
    r, g, b = out.image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # the first frame is red


# --------------------------------------------------------------------------------------------------------
# ingest(): the run goes on, every file is accounted for
# --------------------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_hostile_folder_is_ingested_with_every_file_accounted_for(tmp_path):
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        for i in range(4):
            _write(src / cls / f"{i}.png", _save(_rgb(seed=(100 if cls == "dog" else 0) + i), "PNG"))
    hostile = {
        "zero.jpg": b"",
        "text.png": b"hello",
        "trunc.jpg": _save(_rgb(64, 64), "JPEG")[:300],
        "tiny.png": _save(Image.new("RGB", (1, 1)), "PNG"),
        "bomb.png": _png_claiming(20_000, 20_000),
        "anim.gif": _animated("GIF"),
        "cmyk.jpg": _save(Image.new("CMYK", (16, 16)), "JPEG"),
        "alpha.png": _save(Image.new("RGBA", (16, 16), (9, 9, 9, 0)), "PNG"),
        "deep16.png": _save(Image.fromarray(np.full((16, 16), 4000, np.uint16)), "PNG"),
        "notes.txt": b"not an image extension",
    }
    for name, data in hostile.items():
        _write(src / "cat" / name, data)
    _write(src / "loose.png", _save(_rgb(), "PNG"))  # outside any class folder
    _write(src / "dog" / ".hidden.png", _save(_rgb(), "PNG"))
    _write(src / "dog" / ".DS_Store", b"\x00\x00")  # OS litter: ignored
    (src / "empty").mkdir()
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)

    rows = read_manifest(store)
    rejects = {Path(r["uri"]).name: r["reason"] for r in store.read_table(*REJECTS).to_pylist()}
    assert {Path(r.uri).name for r in rows} >= {"anim.gif", "cmyk.jpg", "alpha.png", "deep16.png"}
    want = {"zero.jpg": "empty file", "text.png": "not an image", "trunc.jpg": "truncated", "tiny.png": "too small",
            "bomb.png": "decompression bomb", "notes.txt": "skipped", "loose.png": "skipped",
            ".hidden.png": "skipped", "empty": "empty class"}
    assert {k: reject_category(v) for k, v in rejects.items()} == want
    # every file is either a manifest row, a reject, or OS litter
    files = [p for p in src.rglob("*") if p.is_file() and p.name != ".DS_Store"]
    assert len(rows) + len(rejects) - 1 == len(files)  # -1: the empty folder's row is not a file
    assert res.reject_reasons == {"decompression bomb": 1, "empty class": 1, "empty file": 1, "not an image": 1,
                                  "skipped": 3, "too small": 1, "truncated": 1}
    assert res.normalised["animated: first frame used"] == 1
    assert res.normalised["alpha composited on white"] == 1
    assert res.normalised["high bit depth scaled to 8-bit"] == 1
    assert res.classes == ["cat", "dog"] and res.train == len(rows)


def test_class_whose_every_image_is_rejected_gets_no_label(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "c"):
        _write(src / cls / "x.png", _save(_rgb(seed=ord(cls)), "PNG"))
    _write(src / "b" / "broken.png", b"\x89PNG broken")
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)
    assert res.classes == ["a", "c"]
    assert sorted(r.label for r in read_manifest(store)) == [0, 1]  # no gap where b would have been
    reasons = [r["reason"] for r in store.read_table(*REJECTS).to_pylist()]
    assert "empty class: every image was rejected" in reasons


def test_nothing_usable_fails_clearly_and_still_writes_the_rejects(tmp_path):
    _write(tmp_path / "src" / "a" / "x.png", b"")
    store = Store(str(tmp_path / "v"))
    with pytest.raises(FileNotFoundError, match="no usable image"):
        ingest(SourceConfig(kind="image_folder", uri=str(tmp_path / "src")), store)
    reasons = store.read_table(*REJECTS).column("reason").to_pylist()
    assert reasons == ["empty file: 0 bytes", "empty class: every image was rejected"]


def test_single_class_is_ingested_with_a_warning(tmp_path, caplog):
    for i in range(3):
        _write(tmp_path / "src" / "only" / f"{i}.png", _save(_rgb(seed=i), "PNG"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(tmp_path / "src")), Store(str(tmp_path / "v")))
    assert res.classes == ["only"]
    assert any("only one class" in w for w in res.warnings)
    assert "a classifier needs at least two classes" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Layout: names, mappings, duplicates, symlinks, scale
# --------------------------------------------------------------------------------------------------------
def test_unsafe_class_names_are_data_and_nothing_is_written_outside_the_version(tmp_path):
    src = tmp_path / "src"
    names = ["..", "...weird", "naïve café", "with space", "日本語", "a..b", "-dash", "%2e%2e"]
    folders = [n for n in names if n != ".."] + ["dotdot"]
    for i, f in enumerate(folders):
        _write(src / f / f"img {i}.png", _save(_rgb(seed=i), "PNG"))
    # class names may hold anything, even path syntax: they are labels, never paths
    visible = [f for f in folders if not f.startswith(".")]  # '...weird' is a hidden folder: skipped, recorded
    mapping = {f: (f"../../escape/{f}" if f == "dotdot" else f"/etc/{f}") for f in visible}
    (src / "class_names.json").write_text(json.dumps(mapping), encoding="utf-8")
    root = tmp_path / "out"
    store = Store(str(root / "ds" / "v1"))
    before = {p for p in tmp_path.rglob("*")}
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)
    after = {p for p in tmp_path.rglob("*")}
    version = root / "ds" / "v1"
    assert after - before and all(p.is_relative_to(version) or version.is_relative_to(p) for p in after - before)
    assert len(res.classes) == len(visible) and "../../escape/dotdot" in res.classes
    assert res.reject_reasons == {"skipped": 1}
    # the keys that name shard members and paths are sanitised, unique and free of path syntax
    from realfake.data.shards import make_key

    keys = [make_key(r.label, r.sample_id, 0) for r in read_manifest(store)]
    assert len(set(keys)) == len(keys)
    assert all("/" not in k and ".." not in k and not k.startswith(".") for k in keys)


def test_hidden_class_folders_are_skipped_and_recorded(tmp_path):
    src = tmp_path / "src"
    _write(src / "a" / "x.png", _save(_rgb(seed=1), "PNG"))
    _write(src / "b" / "x.png", _save(_rgb(seed=2), "PNG"))
    _write(src / ".ipynb_checkpoints" / "x.png", _save(_rgb(seed=3), "PNG"))
    layout = scan_image_folder(str(src))
    assert [c.folder for c in layout.classes] == ["a", "b"]
    assert [(Path(s.uri).parent.name, s.reason) for s in layout.skipped] == [
        (".ipynb_checkpoints", "skipped: hidden file or folder '.ipynb_checkpoints'")]


def test_mapping_that_disagrees_with_the_folders_is_an_error(tmp_path):
    src = tmp_path / "src"
    for f in ("a", "b"):
        _write(src / f / "x.png", _save(_rgb(seed=ord(f)), "PNG"))
    (src / "class_names.json").write_text(json.dumps({"a": "apple"}))
    with pytest.raises(ValueError, match=r"no class name for the folder\(s\) \['b'\]"):
        scan_image_folder(str(src))
    (src / "class_names.json").write_text(json.dumps({"a": "fruit", "b": "fruit"}))
    with pytest.raises(ValueError, match=r"'fruit' to \['a', 'b'\]"):
        scan_image_folder(str(src))
    (src / "class_names.json").write_text(json.dumps({"a": "apple", "b": ""}))
    with pytest.raises(ValueError, match="non-empty class-name strings"):
        scan_image_folder(str(src))
    (src / "class_names.json").write_text(json.dumps(["apple", "banana"]))
    with pytest.raises(ValueError, match="must map folder names"):
        scan_image_folder(str(src))
    # a decomposed (macOS) folder name matches a composed mapping key
    (src / "b").rename(src / "cafe\u0301")
    (src / "class_names.json").write_text(json.dumps({"a": "apple", "caf\u00e9": "coffee"}))
    assert sorted(c.class_name for c in scan_image_folder(str(src)).classes) == ["apple", "coffee"]


def test_duplicates_are_detected_by_content(tmp_path):
    src = tmp_path / "src"
    same = _save(_rgb(seed=42), "PNG")
    _write(src / "cat" / "a.png", same)
    _write(src / "cat" / "a-copy.png", same)  # duplicate within a class: one copy kept
    _write(src / "cat" / "b.png", _save(_rgb(seed=1), "PNG"))
    shared = _save(_rgb(seed=7), "PNG")
    _write(src / "cat" / "both.png", shared)  # the same bytes in two classes: no defined label
    _write(src / "dog" / "both.png", shared)
    _write(src / "dog" / "c.png", _save(_rgb(seed=2), "PNG"))
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)
    rejects = {r["uri"].split("src/")[1]: r["reason"] for r in store.read_table(*REJECTS).to_pylist()}
    assert rejects == {
        "cat/a.png": "duplicate: same bytes as cat/a-copy.png",
        "cat/both.png": "label conflict: the same bytes are in classes 'cat', 'dog'",
        "dog/both.png": "label conflict: the same bytes are in classes 'cat', 'dog'",
    }
    assert res.reject_reasons == {"duplicate": 1, "label conflict": 2}
    assert len({r.sha256 for r in read_manifest(store)}) == res.train == 3


def test_duplicates_across_a_split_realfake_made_are_removed_from_test(tmp_path):
    src = tmp_path / "src"
    img = _save(_rgb(seed=3), "PNG")
    for i in range(10):
        _write(src / "a" / f"{i}.png", img)  # ten copies: some would land in test
        _write(src / "b" / f"{i}.png", _save(_rgb(seed=100 + i), "PNG"))
    store = Store(str(tmp_path / "v"))
    ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.3), store)
    a_rows = [r for r in read_manifest(store) if r.class_name == "a"]
    assert [r.split for r in a_rows] == ["train"]


def test_duplicates_across_a_user_split_are_kept_with_a_warning(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _write(src / split / cls / "x.png", _save(_rgb(seed=ord(cls)), "PNG"))  # same image in both splits
    res = ingest(SourceConfig(kind="image_folder", uri=str(src)), Store(str(tmp_path / "v")))
    assert (res.train, res.test, res.rejects) == (2, 2, 0)
    assert any("in both train/ and test/" in w for w in res.warnings)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_symlinks_outside_the_source_are_refused_and_cycles_do_not_hang(tmp_path):
    outside = tmp_path / "private"
    _write(outside / "secret.png", _save(_rgb(seed=9), "PNG"))
    src = tmp_path / "src"
    _write(src / "a" / "x.png", _save(_rgb(seed=1), "PNG"))
    _write(src / "b" / "y.png", _save(_rgb(seed=2), "PNG"))
    (src / "a" / "leak.png").symlink_to(outside / "secret.png")
    (src / "a" / "leakdir").symlink_to(outside, target_is_directory=True)
    (src / "b" / "loop").symlink_to(src, target_is_directory=True)  # a cycle back to the root
    _write(src / "top.png", _save(_rgb(seed=3), "PNG"))  # outside any class folder: skipped itself
    (src / "b" / "inside.png").symlink_to(src / "top.png")  # a link that stays inside the source: followed
    (src / "b" / "dangling.png").symlink_to(tmp_path / "nope.png")
    store = Store(str(tmp_path / "v"))
    ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)
    ids = sorted(r.sample_id for r in read_manifest(store))
    assert ids == ["a/x.png", "b/inside.png", "b/y.png"]
    rejects = {Path(r["uri"]).name: r["reason"] for r in store.read_table(*REJECTS).to_pylist()}
    assert rejects["leak.png"].startswith("unsafe: symbolic link to a path outside")
    assert rejects["leakdir"].startswith("unsafe: ")
    assert rejects["dangling.png"] == "unreadable: broken symbolic link"
    assert rejects["top.png"] == "skipped: image outside any class folder"
    assert len(rejects) == 4  # the cycle was listed once, silently


def test_thousands_of_classes_scan_listing_each_folder_once(tmp_path, monkeypatch):
    src = tmp_path / "src"
    png = _save(Image.new("RGB", (8, 8)), "PNG")
    for i in range(2000):
        d = src / f"class_{i:04d}"
        d.mkdir(parents=True)
        (d / "0.png").write_bytes(png)
    listed: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (listed.append(os.fspath(path)), real_scandir(path))[1])
    layout = scan_image_folder(str(src))
    assert len(layout.classes) == 2000 and layout.classes[1234].class_name == "class 1234"
    # the work grows with the folders, not their square: the root and each class folder listed once
    assert len(listed) == 2001 and len(set(map(os.path.normpath, listed))) == 2001


def test_thousands_of_classes_ingest(tmp_path):
    src = tmp_path / "src"
    for i in range(2000):
        d = src / f"c{i:04d}"
        d.mkdir(parents=True)
        arr = np.full((8, 8, 3), i % 256, np.uint8)
        arr[0, 0] = (i // 256, 7, 7)  # every class its own bytes (no label conflicts)
        (d / "0.png").write_bytes(_save(Image.fromarray(arr), "PNG"))
    store = Store(str(tmp_path / "v"))
    res = ingest(SourceConfig(kind="image_folder", uri=str(src), test_fraction=0.0), store)
    assert len(res.classes) == 2000 and res.rejects == 0
    assert store.read_table(*MANIFEST).column("label").to_pylist() == list(range(2000))
