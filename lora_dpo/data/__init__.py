"""Preference pairs: sources, the ties policy, the winner/loser swap, the pair transform, and unusable rows.

Flow: a source yields `PairRecord`s (a prompt, two image references, label_0 = the probability that image 0 is
preferred) without decoding any image; `prepare_pairs` applies the ties policy and orients every pair so that
`w` is the preferred image (`pairs.orient` is the only place in the project where labels are read);
`split_live` holds out whole prompts (or takes `[data].val_split`), so no held-out prompt or image is trained on;
`PreferenceDataset` decodes, makes RGB, resizes, crops and flips both images of a pair identically and computes
SDXL's micro-conditioning from what it really did.

At Pick-a-Pic scale (~850K pairs, ~335 GB) no list of pairs holds image bytes. A local parquet pair keeps two
`ParquetCell`s (file, row group, row): a loader worker reads that row group's image column when it needs it and
keeps a few in an LRU, and the sampler shuffles whole row groups and then the pairs within a window of
`shuffle_buffer` pairs, so one pass reads each row group about once instead of once per pair. A downloaded hub
split is memory-mapped Arrow, read by row (`HubCell`). A streamed hub split is an IterableDataset
(`StreamingPreferenceDataset`): each part (process x loader worker) reads its own files and shuffles windows of
pairs with seeded RNGs, so its place is a small JSON position that its items carry and a resume starts from.

Unusable rows never end a run unless `[data].strict`: what the metadata shows (a missing file, an empty caption,
a bad label, a malformed line) is dropped by `prepare_pairs`; what only decoding shows (a truncated or
undecodable image) is found in `__getitem__`, perhaps in a worker process. The item then falls
back to another pair chosen by its draw key, and carries the rows it skipped to the main process inside the batch
(`PreferenceBatch.stats`), where the trainer adds them up for the end-of-run summary.

Modules, each importing only those above it (and never `models`, `step` or the trainer):
  records    PairRecord, Pair, the image references (ParquetCell, HubCell), PairStats, HeldOut, DataError
  rows       one source row -> a PairRecord, in the path layout or Pick-a-Pic's; `[data].columns`
  hub        hub datasets: recognising an id, loading a split, reading a downloaded one by reference
  readers    JSONL, CSV, local parquet, the generated demo set; `read_records` picks one from `[data].source`
  pairs      the ties policy and orientation (orient), the held-out split by prompt, parquet row-group blocks
  images     ImageReader (fetches a reference), decode_image, to_rgb, decode_pair, open_image
  dataset    the pair transform, caption dropout, PreferenceDataset, PreferenceBatch, collate, StreamSampler
  streaming  a streamed hub split: held-out prompts by hash (stream_holdout), StreamingPreferenceDataset
  build      split_live, Datasets and build_datasets, what the trainer (and the cache) build from
This package re-exports the names the rest of lora-dpo uses, so `from lora_dpo import data; data.X` works.
"""

from lora_dpo.data.build import Datasets, build_datasets, split_live
from lora_dpo.data.dataset import (
    PreferenceBatch,
    PreferenceDataset,
    StreamSampler,
    caption_dropped,
    collate,
    transform_pair,
)
from lora_dpo.data.images import ImageReader, decode_pair, open_image, to_rgb
from lora_dpo.data.pairs import locality_blocks, orient, prepare_pairs, split_pairs
from lora_dpo.data.readers import read_records, synthetic_source
from lora_dpo.data.records import (
    HELD_OUT_PROMPT,
    POLICY_DROPS,
    DataError,
    HeldOut,
    HubCell,
    Pair,
    PairRecord,
    PairStats,
    ParquetCell,
)

__all__ = [
    "HELD_OUT_PROMPT",
    "POLICY_DROPS",
    "DataError",
    "Datasets",
    "HeldOut",
    "HubCell",
    "ImageReader",
    "Pair",
    "PairRecord",
    "PairStats",
    "ParquetCell",
    "PreferenceBatch",
    "PreferenceDataset",
    "StreamSampler",
    "build_datasets",
    "caption_dropped",
    "collate",
    "decode_pair",
    "locality_blocks",
    "open_image",
    "orient",
    "prepare_pairs",
    "read_records",
    "split_live",
    "split_pairs",
    "synthetic_source",
    "to_rgb",
    "transform_pair",
]
