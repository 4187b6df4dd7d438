"""Real datasets -> WebDataset tar shards (local disk or S3) -> batches.

``import_dataset`` reads a source format into :class:`InteractionData`,
``build_shards`` writes it as shards + ``manifest.json`` to any fsspec URL, and
``SequenceLoader`` streams them back split by rank and worker, deterministic and
resumable. See ``docs/data.md``.
"""
from .config import ShardsConfig, StorageConfig
from .errors import BadRecords, DataError, ManifestError, ShardError
from .features import FeatureFile, TextEncoder
from .importer import import_dataset
from .interactions import DatasetMeta, InteractionData, Sequences, UserSequence, combine_domains
from .items import ItemTable
from .loader import SequenceLoader
from .samples import collate, expand
from .shards import build_shards, iter_sequences, load_item_table, read_manifest
from .bundled import SAMPLE_DATASETS, ensure_sample_shards

__all__ = [
    "import_dataset", "combine_domains", "InteractionData", "Sequences", "UserSequence", "DatasetMeta",
    "ItemTable", "FeatureFile", "TextEncoder",
    "build_shards", "read_manifest", "load_item_table", "iter_sequences",
    "ShardsConfig", "StorageConfig", "SequenceLoader", "collate", "expand",
    "ensure_sample_shards", "SAMPLE_DATASETS",
    "DataError", "ShardError", "ManifestError", "BadRecords",
]
