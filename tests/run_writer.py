"""Writes runs in the output layout (TFRecord via TensorFlow's writer, Parquet via pyarrow, index,
run_summary.json) on any Beam FileSystem, so reader tests need no pipeline."""

import datetime
import hashlib
import json
import os
import tempfile
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from run_format import (COLUMNS, DECODE, EMBEDDED, EMBEDDING, EMBEDDINGS_PREFIX, INDEX_GLOB,
                        INDEX_PREFIX, INDEX_SCHEMA, PARQUET_SUFFIX, SKIPPED, STAGES, SUMMARY_FILE,
                        RunSummary, embeddings_schema, tfrecord_suffix)

RECIPE = 'compute_dtype=float32;center_crop_fraction=1.0;jpeg_draft=0'
# What every Example has; the others are left out with full_schema=False, as for unknown values.
BASIC_COLUMNS = {'uri', 'sha256', 'height', 'width', 'model'}


class Row(NamedTuple):
  uri: str
  embedding: np.ndarray
  sha256: str = ''
  height: int = 10
  width: int = 20
  size_bytes: Optional[int] = 1234
  last_modified: Optional[datetime.datetime] = datetime.datetime(
      2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)


def rows(uris, dimension: int, seed: int) -> List[Row]:
  rng = np.random.default_rng(seed)
  return [Row(uri, rng.standard_normal(dimension).astype(np.float32),
              hashlib.sha256(f'{uri}{seed}'.encode()).hexdigest()) for uri in uris]


def _values(row: Row, model: str) -> dict:
  return {'uri': row.uri, 'sha256': row.sha256, 'height': row.height, 'width': row.width,
          'size_bytes': row.size_bytes, 'last_modified': row.last_modified, 'model': model,
          'weights': 'untrained', 'recipe': RECIPE, 'pipeline_version': '0.2.0'}


def _example(row: Row, model: str, full_schema: bool) -> bytes:
  features = {EMBEDDING: tf.train.Feature(float_list=tf.train.FloatList(value=row.embedding))}
  for column, value in zip(COLUMNS, _values(row, model).values()):
    if not full_schema and column.name not in BASIC_COLUMNS:
      continue
    if pa.types.is_timestamp(column.type):
      value = round(value.timestamp() * 1e6)
    if isinstance(value, int):
      features[column.feature] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    else:
      features[column.feature] = tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[value.encode()]))
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _table(shard: List[Row], model: str) -> pa.Table:
  vectors = np.stack([r.embedding for r in shard]).astype(np.float32)
  values = [_values(row, model) for row in shard]
  columns = {c.name: [v[c.name] for v in values] for c in COLUMNS}
  columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()),
                                                         vectors.shape[1])
  return pa.table(columns, schema=embeddings_schema(vectors.shape[1]))


def _put(path: str, data: bytes) -> None:
  if '://' not in path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)


def _parquet_bytes(table: pa.Table) -> bytes:
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink)
  return sink.getvalue().to_pybytes()


def run_summary(directory: str, model: str, embedded: int, embedding_size: int, finished_at: str,
                failed: int = 0, inputs=(), input_manifest=()) -> RunSummary:
  """A summary as the pipeline writes it, for a run of an untrained builtin."""
  return RunSummary(
      model=model, model_handle=model.split('@')[0], checkpoint=None, seed=0,
      weights='untrained', compute_dtype='float32', center_crop_fraction=1.0, jpeg_draft=False,
      recipe=RECIPE, pipeline_version='0.2.0',
      embedding_size=embedding_size, image_size=[64, 64],
      input=list(inputs), input_manifest=list(input_manifest), output=directory,
      output_format='tfrecord', runner='DirectRunner', started_at=finished_at,
      matched=embedded + failed, skipped=0, embedded=embedded, failed=failed,
      failed_by_stage=dict(dict.fromkeys(STAGES, 0), **{DECODE: failed}), example_failures=[],
      files=[], finished_at=finished_at, wall_time_seconds=1.0, images_per_second=None)


def _index_row(row: Row, model: str, outcome: str) -> dict:
  return {'uri': row.uri, 'size_bytes': row.size_bytes, 'last_modified': row.last_modified,
          'sha256': row.sha256 if outcome == EMBEDDED else None, 'model': model,
          'recipe': RECIPE, 'outcome': outcome}


def write_run(directory: str, run_rows: List[Row], model: str = 'builtin:test@untrained-seed0',
              output_format: str = 'tfrecord', compression: str = 'none', shard_rows: int = 0,
              finished_at: str = '2026-01-01T00:00:00Z', summary: bool = True,
              full_schema: bool = True, failed_uris=(), failed_stage: str = DECODE,
              skipped_rows: Sequence[Row] = (), inputs=(), input_manifest=(),
              embedding_size: Optional[int] = None) -> List[str]:
  """Writes the run (`summary`: finished); returns the embedding shard paths. The index has a row
  per embedded row, skipped row (the file version an earlier run finished with) and failed URI;
  the summary records `inputs` (--input) and `input_manifest`."""
  shard_rows = shard_rows or len(run_rows) or 1
  shards = [run_rows[i:i + shard_rows] for i in range(0, len(run_rows), shard_rows)]
  paths = []
  for number, shard in enumerate(shards):
    name = f'{directory}/{EMBEDDINGS_PREFIX}-{number:05d}-of-{len(shards):05d}'
    if output_format in ('tfrecord', 'both'):
      suffix = tfrecord_suffix(compression == 'gzip')
      with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, 'shard')
        options = tf.io.TFRecordOptions('GZIP' if compression == 'gzip' else '')
        with tf.io.TFRecordWriter(local, options) as writer:
          for row in shard:
            writer.write(_example(row, model, full_schema))
        with open(local, 'rb') as f:
          _put(name + suffix, f.read())
      paths.append(name + suffix)
    if output_format in ('parquet', 'both'):
      _put(name + PARQUET_SUFFIX, _parquet_bytes(_table(shard, model)))
      paths.append(name + PARQUET_SUFFIX)
  index = ([_index_row(r, model, EMBEDDED) for r in run_rows] +
           [_index_row(r, model, SKIPPED) for r in skipped_rows] +
           [{'uri': u, 'model': model, 'recipe': RECIPE, 'outcome': failed_stage}
            for u in failed_uris])
  _put(f'{directory}/{INDEX_PREFIX}-00000-of-00001{PARQUET_SUFFIX}', _parquet_bytes(
      pa.Table.from_pylist(index, INDEX_SCHEMA)))
  if summary:
    if embedding_size is None:
      embedding_size = len(run_rows[0].embedding) if run_rows else 0
    _put(f'{directory}/{SUMMARY_FILE}', run_summary(
        directory, model, len(run_rows), embedding_size, finished_at, len(failed_uris), inputs,
        input_manifest).to_json().encode())
  return paths


def write_summary_of_0_1(directory: str) -> None:
  """Makes the run look as 0.1.0 wrote it: a summary without finished_at or the model's options,
  and no index."""
  _put(f'{directory}/{SUMMARY_FILE}', json.dumps({
      'matched': 1, 'embedded': 1, 'failed': 0,
      'failed_by_stage': dict.fromkeys(STAGES, 0), 'model': 'builtin:test@untrained-seed0',
      'embedding_size': 4, 'image_size': [64, 64], 'input': [], 'output': directory,
      'runner': 'DirectRunner', 'wall_time_seconds': 1.0, 'images_per_second': 1.0}).encode())
  indexes = [m.path for m in FileSystems.match([f'{directory}/{INDEX_GLOB}'])[0].metadata_list]
  FileSystems.delete(indexes)
