"""The Beam job behind `python -m embeddings.compact`: every URI's vector by the load rule over
many runs (embeddings/collection.py), written as one consolidated run.

    CollectionSources (jobs/collection_sources.py: index files ─ (uri, row) ─ GroupByKey ─ the
       │   SourceRule) ─ ((source run, uri), newest row) ──────────────────┐
       └ shards of the runs that supply a vector ─ ReadVectors ─ ((run, uri), vector) ─ CoGroupByKey
           ─ (shard, row) ─ GroupByKey ─ WriteShard: embeddings-S-of-N.parquet, index-S-of-N.parquet

A worker holds one block of a Parquet shard (about 1,000 rows) or one TFRecord shard while reading,
and one output shard's rows while writing (about `SHARD_ROWS`); nothing gathers the collection on
one machine, so it scales with the workers, as the embedding pipeline does. Undecodable files are
carried as `decode` rows (still done for later nights, no vector); files whose vector is in no
run given are left out (the next night embeds them again).
"""

import zlib
from typing import Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from storage.run_dirs import Run
from embeddings.shards import ParquetVectors, is_parquet, read_shard
from jobs.collection_sources import CollectionSources, IndexRow
from run_format import (DECODE, EMBEDDED, EMBEDDING, EMBEDDINGS_PREFIX, INDEX_PREFIX,
                        INDEX_SCHEMA, METADATA_COLUMNS, PARQUET_SUFFIX, embeddings_schema)

METRICS_NAMESPACE = 'compact'
SHARD_ROWS = 100_000  # about 1.7 GB of 4320-d float32 vectors a shard
_READ_BLOCK_ROWS = 1_000
_WRITE_BATCH_ROWS = 1_000


class _ReadVectors(beam.DoFn):
  """(run, shard path) -> ((run, uri), (metadata row, float32 vector)), a block at a time."""

  def process(self, shard: Tuple[str, str]):
    run, path = shard
    if is_parquet(path):
      vectors = ParquetVectors.open(path, run)
      for first, groups in vectors.blocks(_READ_BLOCK_ROWS):
        block = vectors.vectors(groups)
        metadata = vectors.metadata(np.arange(first, first + len(block)))
        yield from self._rows(run, metadata, block)
    else:
      whole = read_shard(path, run)
      yield from self._rows(run, whole.metadata, whole.vectors)

  @staticmethod
  def _rows(run: str, metadata: pa.Table, vectors: np.ndarray):
    for values, vector in zip(metadata.select(METADATA_COLUMNS).to_pylist(), vectors):
      yield (run, values['uri']), (values, vector)


def shard_of(uri: str, shards: int) -> int:
  return zlib.crc32(uri.encode('utf-8', 'surrogateescape')) % shards


def _index_row(uri: str, row: IndexRow, sha256: Optional[str], outcome: str) -> dict:
  size, modified, content_id, recipe = row.version
  return {'uri': uri, 'size_bytes': size, 'last_modified': modified, 'content_id': content_id,
          'sha256': sha256, 'model': row.model, 'recipe': recipe, 'outcome': outcome,
          'done_outcome': None, 'vector_run': None, 'message': None}


def _joined(keyed, shards: int):
  """((run, uri), {'kept': [row], 'vectors': [(metadata, vector)]}) -> (shard, (index row,
  metadata, vector))."""
  (_, uri), parts = keyed
  kept, vectors = list(parts['kept']), list(parts['vectors'])
  if not kept:
    return
  if not vectors:
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vectors_not_in_shards').inc()
    return
  metadata, vector = vectors[0]
  yield shard_of(uri, shards), (_index_row(uri, kept[0], metadata['sha256'], EMBEDDED),
                                metadata, vector)


class _WriteShard(beam.DoFn):
  """(shard, rows) -> the paths of embeddings-S-of-N.parquet (if it holds a vector) and
  index-S-of-N.parquet, rows sorted by URI."""

  def __init__(self, output: str, shards: int, dimension: int, embedding_dtype: str):
    self._output = output
    self._shards = shards
    self._dimension = dimension
    self._embedding_dtype = embedding_dtype

  def _path(self, prefix: str, shard: int) -> str:
    return storage.join(self._output,
                        f'{prefix}-{shard:05d}-of-{self._shards:05d}{PARQUET_SUFFIX}')

  def process(self, grouped):
    shard, rows = grouped
    rows = sorted(rows, key=lambda row: row[0]['uri'])
    schema = embeddings_schema(self._dimension, self._embedding_dtype)
    with_vectors = [row for row in rows if row[2] is not None]
    if with_vectors:
      path = self._path(EMBEDDINGS_PREFIX, shard)
      encoded = [name for name in schema.names if name != EMBEDDING]
      with storage.create(path) as f:
        writer = pq.ParquetWriter(f, schema, compression=dict(
            {name: 'snappy' for name in encoded}, **{EMBEDDING: 'none'}),
                                  use_dictionary=encoded, use_compliant_nested_type=False)
        for start in range(0, len(with_vectors), _WRITE_BATCH_ROWS):
          batch = with_vectors[start:start + _WRITE_BATCH_ROWS]
          vectors = np.stack([vector for _, _, vector in batch]).astype(self._embedding_dtype)
          columns = {name: [metadata[name] for _, metadata, _ in batch]
                     for name in METADATA_COLUMNS}
          columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(
              pa.array(vectors.ravel()), self._dimension)
          writer.write_table(pa.Table.from_pydict(columns, schema=schema))
        writer.close()
      yield path
    path = self._path(INDEX_PREFIX, shard)
    with storage.create(path) as f:
      pq.write_table(pa.Table.from_pylist([row[0] for row in rows], INDEX_SCHEMA), f)
    yield path


def build_compaction(pipeline: beam.Pipeline, runs: Sequence[Run], output: str, shards: int,
                     embedding_dtype: str):
  """Runs of one model, newest first (find_runs, select_model) -> the written files' paths."""
  decided = pipeline | 'Sources' >> CollectionSources(runs)
  shard_paths = {run.path: run.shard_paths() for run in runs}
  vectors = (decided.kept
             | 'SourceRuns' >> beam.Map(lambda kv: kv[0][0])
             | 'EachRunOnce' >> beam.Distinct()
             | 'Shards' >> beam.FlatMap(lambda run: [(run, path) for path in shard_paths[run]])
             | 'SpreadShards' >> beam.Reshuffle()
             | 'ReadVectors' >> beam.ParDo(_ReadVectors()))
  with_vectors = ({'kept': decided.kept, 'vectors': vectors}
                  | 'JoinVectors' >> beam.CoGroupByKey()
                  | 'Joined' >> beam.FlatMap(_joined, shards))
  undecodable = decided.decode | 'DecodeRows' >> beam.Map(
      lambda kv: (shard_of(kv[0], shards), (_index_row(kv[0], kv[1], None, DECODE), None, None)))
  dimension = runs[0].embedding_size
  return ((with_vectors, undecodable)
          | 'AllRows' >> beam.Flatten()
          | 'ByShard' >> beam.GroupByKey()
          | 'WriteShards' >> beam.ParDo(_WriteShard(output, shards, dimension, embedding_dtype)))
