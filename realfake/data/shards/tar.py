"""WebDataset tar bytes: the writer of one tar file and THE tar reader (verify, resume and training all use it).

The writer builds ustar headers itself, byte for byte what ``tarfile`` writes for the same members (a test compares
whole archives): every byte derives from the records alone (fixed mtime, mode and owner), so the same plan gives the
same files whatever the number or order of workers. The reader is a minimal sequential header parser: about ten
times less Python per member than ``tarfile``, which matters when a DataLoader worker must deliver thousands of
small images a second. It reads ustar members with PAX or GNU long names, skips anything that is not a regular
file, and refuses a malformed header or PAX record with :class:`ShardIntegrityError` instead of looping.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from realfake.data.shards.records import ShardIntegrityError, ShardSample

__all__ = ["TarPart", "iter_tar"]

_TAR_MTIME = 946684800  # 2000-01-01: fixed so that identical records give byte-identical tars
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_TAR_READ = 1 << 20


def _ustar_fields() -> tuple[bytes, bytes, bytes, int]:
    """The constant parts of the ustar header of a regular member with our fixed metadata, and their byte sum."""
    mode_ids = b"%07o\0" % 0o644 + b"%07o\0" % 0 + b"%07o\0" % 0  # mode, uid, gid
    mtime = b"%011o\0" % _TAR_MTIME
    tail = tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return mode_ids, mtime, tail, sum(mode_ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_USTAR_MODE_IDS, _USTAR_MTIME, _USTAR_TAIL, _USTAR_CONST_SUM = _ustar_fields()
_TAR_MAX_SIZE = 8**11  # ustar's 11 octal digits; larger members need tarfile's PAX headers


def _tar_header(name: str, size: int) -> bytes:
    """The header tarfile writes for a regular member ``name`` of ``size`` bytes with our fixed metadata.

    Byte for byte what ``TarInfo.tobuf(PAX_FORMAT)`` gives (a plain ustar block when the name is ASCII and at most
    100 bytes), built without tarfile's generic per-field machinery.
    """
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or size >= _TAR_MAX_SIZE or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    name_f = raw + b"\0" * (100 - len(raw))
    size_f = b"%011o\0" % size
    chksum = _USTAR_CONST_SUM + sum(name_f) + sum(size_f)
    return b"".join((name_f, _USTAR_MODE_IDS, size_f, _USTAR_MTIME, b"%06o\0 " % chksum, _USTAR_TAIL))


def _tar_pad(n: int) -> bytes:
    return b"\0" * (-n % _BLOCK)


class TarPart:
    """One WebDataset tar being written to ``dest`` (a local file or a spool), hashed as it is written.

    Each sample is three members, ``{key}.{ext}``, ``{key}.cls`` and ``{key}.json``; the file's sha256 and each
    image's sha256 are computed here from the very bytes written (plain ``hashlib``, on the caller's thread).
    """

    def __init__(self, dest: IO[bytes]) -> None:
        self.dest = dest
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.count = 0
        self.digests: list[str] = []

    def _write(self, piece: bytes) -> None:
        self.dest.write(piece)
        self.sha.update(piece)
        self.nbytes += len(piece)

    def add(self, key: str, label: int, image: bytes, ext: str, meta_json: bytes) -> None:
        """Append one sample."""
        cls = b"%d" % label
        self._write(_tar_header(f"{key}.{ext}", len(image)))
        self._write(image)
        self._write(b"".join((
            _tar_pad(len(image)),
            _tar_header(f"{key}.cls", len(cls)), cls, _tar_pad(len(cls)),
            _tar_header(f"{key}.json", len(meta_json)), meta_json, _tar_pad(len(meta_json)),
        )))
        self.digests.append(hashlib.sha256(image).hexdigest())
        self.count += 1

    @staticmethod
    def cost(image: bytes, meta_json: bytes) -> int:
        """Bytes a sample adds: three 512-byte headers (+ PAX slack) and padded payloads."""
        pad = lambda n: (n + 511) // 512 * 512  # noqa: E731
        return 3 * 512 + pad(len(image)) + 512 + pad(len(meta_json)) + 1024

    def close(self) -> tuple[int, str, list[str]]:
        """Finish the tar as tarfile does (two zero blocks, then zeros up to a whole record); returns its byte
        count, its sha256 and its images' sha256."""
        end = 2 * _BLOCK
        self._write(b"\0" * (end + (-(self.nbytes + end) % tarfile.RECORDSIZE)))
        return self.nbytes, self.sha.hexdigest(), self.digests

    def abandon(self) -> None:
        """Nothing to stop: the caller discards ``dest``."""


def _octal(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b" \0")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ShardIntegrityError(f"{where}: corrupt tar header (size field {field!r})") from None


def _pax_path(data: bytes, where: str = "tar") -> bytes | None:
    """The ``path`` record of a PAX extended header, if it has one; a malformed record (bad or non-positive
    length, one running past the header) raises :class:`ShardIntegrityError` instead of looping."""
    pos, path = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        if space <= pos or length <= space - pos or pos + length > len(data):
            raise ShardIntegrityError(f"{where}: corrupt PAX header record at byte {pos} (corrupt shard)")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value
        pos += length
    return path


def iter_tar(f: IO[bytes], uri: str, image_format: str, sums: Any = None, meta: bool = True) -> Iterator[ShardSample]:
    """Samples of a WebDataset tar, read sequentially from ``f``.

    Every byte read, the end-of-archive blocks included, goes to ``sums.update`` when given (a sha256 of the file,
    which then also stands for the header checksums); without it each header's own checksum is checked.
    ``meta=False`` leaves each sample's JSON unparsed (``meta`` empty): training needs only the image and label.
    """
    reader = f if isinstance(f, io.BufferedReader | io.BytesIO) else io.BufferedReader(f, _TAR_READ)  # type: ignore[arg-type]

    def read(n: int) -> bytes:
        data = reader.read(n)
        if len(data) != n:
            raise ShardIntegrityError(f"{uri}: truncated tar ({len(data)} of {n} bytes at the end)")
        if sums is not None:
            sums.update(data)
        return data

    current: dict[str, bytes] = {}
    key: str | None = None
    long_name: bytes | None = None

    def emit() -> ShardSample:
        missing = [e for e in (image_format, "cls", "json") if e not in current]
        if missing:
            raise ShardIntegrityError(f"{uri}: sample {key!r} lacks member(s) {missing}")
        return ShardSample(
            key=key,  # type: ignore[arg-type]
            label=int(current["cls"]),
            image=current[image_format],
            image_format=image_format,
            meta=json.loads(current["json"]) if meta else {},
        )

    while True:
        header = reader.read(_BLOCK)
        if sums is not None:
            sums.update(header)
        if not header or header == _ZERO_BLOCK:
            break
        if len(header) != _BLOCK:
            raise ShardIntegrityError(f"{uri}: truncated tar header")
        if sums is None and sum(header[:148]) + sum(header[156:]) + 8 * 32 != _octal(header[148:156], uri):
            raise ShardIntegrityError(f"{uri}: tar header checksum mismatch (corrupt shard)")
        size = _octal(header[124:136], uri)
        kind = header[156:157]
        data = read(size)
        if size % _BLOCK:
            read(_BLOCK - size % _BLOCK)
        if kind in (b"x", b"L"):
            long_name = _pax_path(data, uri) if kind == b"x" else data.rstrip(b"\0")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            raw, long_name = long_name, None
        else:
            raw = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                raw = header[345:500].split(b"\0", 1)[0] + b"/" + raw
        name = raw.decode("utf-8", "surrogateescape")
        k, _, ext = name.partition(".")
        if k != key and key is not None:
            yield emit()
            current = {}
        key = k
        current[ext] = data
    if key is not None:
        yield emit()
    if sums is not None:
        while chunk := reader.read(_TAR_READ):
            sums.update(chunk)
