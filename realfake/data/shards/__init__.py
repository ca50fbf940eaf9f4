"""Synthetic-image shards: the on-disk format of a version's generated images.

A shard is the unit of work, retry and resume. :class:`ShardWriter` (``writer``) encodes the images of one
:class:`ShardPlan` and writes them as a WebDataset tar (``{key}.jpg|png|webp`` + ``{key}.cls`` + ``{key}.json``,
``tar``) or a Parquet file (the Hugging Face ``Image`` struct plus provenance columns, ``parquet``), then the
shard's index part, then its commit record (``_commits/{name}.json``, through :mod:`realfake.data.commit`).
Readers (``reader``) look only at committed shards, so a shard truncated by a crash is never read as data; a re-run
(``plan``) skips committed shards, sweeps what no record names and rewrites the rest. The version's
``index.parquet`` and ``_info.json`` come from ``index``; records, errors and keys from ``records``. The version
lease lives in :mod:`realfake.data.lease` and the retry policy in :mod:`realfake.data.storage`; both are
re-exported here for older imports.

Every byte written derives from the records alone (fixed tar headers, sorted JSON), so the same plan gives the same
files whatever the number or order of workers.
"""

from realfake.data.lease import LEASE_FILE, LeaseHeldError, LeaseLostError, VersionLease
from realfake.data.shards.index import committed_keys, read_index, write_index, write_wds_info
from realfake.data.shards.plan import plan_pending, read_recipe
from realfake.data.shards.reader import (
    check_file_size,
    committed_shards,
    iter_shard,
    iter_synthetic,
    partial_shards,
    remove_partial_shards,
    verify_shard,
)
from realfake.data.shards.records import (
    COMMITS_DIR,
    INDEX_FILE,
    INDEX_PARTS_DIR,
    INDEX_SCHEMA,
    PLAN_FILE,
    RECIPE_FILE,
    WDS_INFO_FILE,
    WDS_SPLIT,
    CommitRecord,
    ShardExistsError,
    ShardFile,
    ShardIntegrityError,
    ShardPlan,
    ShardSample,
    SyntheticRecord,
    encode_image,
    make_key,
    plan_shards,
)
from realfake.data.shards.writer import ShardWriter
from realfake.data.storage import io_retry

__all__ = [
    "COMMITS_DIR", "INDEX_FILE", "INDEX_PARTS_DIR", "INDEX_SCHEMA", "LEASE_FILE", "PLAN_FILE", "RECIPE_FILE",
    "WDS_INFO_FILE", "WDS_SPLIT", "CommitRecord", "LeaseHeldError", "LeaseLostError", "ShardExistsError", "ShardFile",
    "ShardIntegrityError", "ShardPlan", "ShardSample", "ShardWriter", "SyntheticRecord", "VersionLease",
    "committed_keys", "committed_shards", "encode_image", "check_file_size", "iter_shard", "io_retry",
    "iter_synthetic", "make_key", "partial_shards", "plan_pending", "plan_shards", "read_index", "read_recipe",
    "remove_partial_shards", "verify_shard", "write_index", "write_wds_info"
]
