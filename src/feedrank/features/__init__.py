"""Point-in-time features: vocabularies, histories, counters, and the example builder.

``build_features`` turns the canonical event log into Parquet example shards that
``feedrank.data.stream`` reads and ``feedrank.data.collate`` packs into ``Batch``.
"""

from feedrank.features.build import (
    EXAMPLE_SCHEMA,
    BuildResult,
    FeatureBuildError,
    FeatureConfig,
    NotTrainableError,
    build_features,
    check_trainable,
    load_manifest,
    split_files,
)
from feedrank.features.counters import COUNTER_COLUMNS
from feedrank.features.vocab import ITEM_CAT_COLUMNS, OOV, PAD, USER_CAT_COLUMNS, Vocab, Vocabularies, VocabSpec

__all__ = [
    "COUNTER_COLUMNS",
    "EXAMPLE_SCHEMA",
    "ITEM_CAT_COLUMNS",
    "OOV",
    "PAD",
    "USER_CAT_COLUMNS",
    "BuildResult",
    "FeatureBuildError",
    "FeatureConfig",
    "NotTrainableError",
    "Vocab",
    "VocabSpec",
    "Vocabularies",
    "build_features",
    "check_trainable",
    "load_manifest",
    "split_files",
]
