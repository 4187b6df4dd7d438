"""Real datasets -> WebDataset tar shards (local disk or S3) -> batches.

``import_dataset`` reads a source format into :class:`InteractionData`,
``build_shards`` writes it as shards + ``manifest.json`` to any fsspec URL, and
``SequenceLoader`` streams them back split by rank and worker, deterministic and
resumable. See ``docs/data.md``.
"""
from .bundled import SAMPLE_DATASETS, ensure_sample_shards
from .config import ShardsConfig, StorageConfig
from .errors import BadRecords, DataError, ManifestError, ShardError, StorageError, one_line
from .features import FeatureFile, TextEncoder
from .importer import import_dataset
from .interactions import (
    DatasetMeta,
    InteractionData,
    Sequences,
    UserSequence,
    combine_domains,
)
from .items import ItemTable
from .loader import SequenceLoader
from .samples import collate, expand
from .shards import (
    ItemRows,
    ItemSource,
    build_shards,
    iter_sequences,
    load_item_rows,
    load_item_table,
    read_manifest,
    write_shard_set,
)
from .synthetic import build_synthetic

__all__ = [
    "SAMPLE_DATASETS",
    "BadRecords",
    "DataError",
    "DatasetMeta",
    "FeatureFile",
    "InteractionData",
    "ItemTable",
    "ManifestError",
    "SequenceLoader",
    "Sequences",
    "ShardError",
    "StorageError",
    "one_line",
    "ShardsConfig",
    "StorageConfig",
    "TextEncoder",
    "UserSequence",
    "build_shards",
    "build_synthetic",
    "collate",
    "combine_domains",
    "ensure_sample_shards",
    "expand",
    "import_dataset",
    "iter_sequences",
    "load_item_table",
    "load_item_rows",
    "ItemRows",
    "ItemSource",
    "read_manifest",
    "write_shard_set",
]
