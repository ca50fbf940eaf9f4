"""Parquet shard bytes: the writer of one Parquet shard and its reader.

A Parquet shard holds the Hugging Face ``Image`` struct, the label and the provenance columns, with the
``huggingface`` schema metadata that makes ``datasets`` restore typed features (``Image``, ``ClassLabel``). Rows go
out in row groups of 64 images, small enough for light ``datasets`` streaming reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from realfake.data.shards.records import INDEX_SCHEMA, ShardSample

if TYPE_CHECKING:
    from realfake.data.shards.records import IndexColumns

__all__ = ["ParquetPart", "iter_parquet"]

log = logging.getLogger(__name__)

_ROW_GROUP = 64  # images per row group: small groups keep `datasets` streaming reads light
_PROVENANCE = ("class_name", "source_sample_id", "replica", "seed", "prompt", "negative_prompt")


def _hf_features(class_names: Sequence[str] | None) -> dict[str, Any]:
    label: dict[str, Any] = (
        {"_type": "ClassLabel", "names": list(class_names)} if class_names else {"_type": "Value", "dtype": "int64"}
    )
    string = {"_type": "Value", "dtype": "string"}
    return {
        "image": {"_type": "Image"},
        "label": label,
        "key": string,
        "class_name": string,
        "source_sample_id": string,
        "replica": {"_type": "Value", "dtype": "int32"},
        "seed": {"_type": "Value", "dtype": "int64"},
        "prompt": string,
        "negative_prompt": string,
        "image_sha256": string,
        "meta": string,
    }


def _parquet_schema(class_names: Sequence[str] | None) -> pa.Schema:
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
            ("key", pa.string()),
            *(INDEX_SCHEMA.field(n) for n in _PROVENANCE),  # typed as in the index
            ("image_sha256", pa.string()),
            ("meta", pa.string()),
        ]
    )
    # `datasets` restores typed features (Image, ClassLabel) from this exact metadata key.
    hf = {"info": {"features": _hf_features(class_names)}}
    return schema.with_metadata({b"huggingface": json.dumps(hf).encode()})


class _HashingSink(io.RawIOBase):
    """A write-only file for pyarrow: each write goes to ``dest`` and into the file's sha256."""

    def __init__(self, dest: IO[bytes]) -> None:
        self.dest = dest
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.abandoned = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if not self.abandoned:  # else the shard is being thrown away: pyarrow's closing writes go nowhere
            self.dest.write(b)
            self.sha.update(b)
            self.nbytes += len(b)
        return len(b)

    def tell(self) -> int:
        return self.nbytes


class ParquetPart:
    """One Parquet shard being written to ``dest`` (a local file or a spool), one row group at a time.

    The provenance columns come from the shard's :class:`~realfake.data.shards.records.IndexColumns` (rows
    ``start`` on), the lists its index part is built from; each row carries its image's sha256.
    """

    def __init__(self, dest: IO[bytes], class_names: Sequence[str] | None, cols: IndexColumns, start: int,
                 ext: str) -> None:
        self.schema = _parquet_schema(class_names)
        self.cols, self.start, self.ext = cols, start, ext
        # Images are already compressed: compressing them again costs CPU and saves nothing.
        compression = {name: "zstd" for name in self.schema.names}
        compression.update({"image.bytes": "none", "image.path": "zstd"})
        # Every image is unique, so dictionary-encoding them only hashes megabytes to give up at the page limit.
        dictionary = [name for name in self.schema.names if name != "image"] + ["image.path"]
        self.sink = _HashingSink(dest)
        self.writer = pq.ParquetWriter(
            self.sink, self.schema, compression=compression, use_dictionary=dictionary, write_statistics=False
        )
        self.images: list[bytes] = []  # rows written..count-1, not yet in the file
        self.digests: list[str] = []
        self.written = 0
        self.count = 0

    def add(self, image: bytes) -> None:
        """Append the row of the image whose index columns were just added to ``cols``."""
        self.images.append(image)
        self.digests.append(hashlib.sha256(image).hexdigest())
        self.count += 1
        if len(self.images) == _ROW_GROUP:
            self._write_rows()

    @staticmethod
    def cost(image: bytes, meta_json: bytes) -> int:
        return len(image) + len(meta_json) + 256

    def _write_rows(self) -> None:
        n = len(self.images)
        a = self.start + self.written
        b = a + n
        c = self.cols.cols
        keys = c["key"][a:b]
        image = pa.StructArray.from_arrays(
            [pa.array(self.images, pa.binary()), pa.array([f"{k}.{self.ext}" for k in keys], pa.string())],
            fields=list(self.schema.field("image").type),
        )
        values = (c["label"][a:b], keys, c["class_name"][a:b], c["source_sample_id"][a:b], c["replica"][a:b],
                  c["seed"][a:b], c["prompt"][a:b], c["negative_prompt"][a:b], self.digests[self.written:],
                  c["meta"][a:b])
        arrays = [image] + [pa.array(v, self.schema.field(i).type) for i, v in enumerate(values, start=1)]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=_ROW_GROUP)
        self.images = []
        self.written += n

    def close(self) -> tuple[int, str, list[str]]:
        """Finish the file; returns its byte count, its sha256 and its images' sha256."""
        if self.images:
            self._write_rows()
        self.writer.close()
        return self.sink.nbytes, self.sink.sha.hexdigest(), self.digests

    def abandon(self) -> None:
        self.sink.abandoned = True
        try:
            self.writer.close()  # now, quietly, rather than from the garbage collector
        except Exception as e:  # noqa: BLE001 - the shard is discarded; the original error is what matters
            log.debug("closing an abandoned Parquet writer: %s", e)


def iter_parquet(data: Any, image_format: str, meta: bool = True) -> Iterator[ShardSample]:
    """Samples of a Parquet shard held whole in ``data`` (bytes or a pyarrow buffer), row group by row group;
    ``meta=False`` leaves ``meta`` empty."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    # only what a sample carries: the typed provenance columns duplicate ``meta`` (for SQL-style readers)
    columns = ["key", "label", "image", "meta"] if meta else ["key", "label", "image"]
    for i in range(pf.num_row_groups):
        for row in pf.read_row_group(i, columns=columns, use_threads=False).to_pylist():
            yield ShardSample(
                key=row["key"],
                label=int(row["label"]),
                image=row["image"]["bytes"],
                image_format=image_format,
                meta=json.loads(row["meta"]) if meta else {},
            )
