"""Writes runs in the planned output layout (TFRecord via TensorFlow's writer, Parquet via
pyarrow, index, run_summary.json) on any Beam FileSystem, so reader tests need no pipeline."""

import datetime
import hashlib
import json
import os
import tempfile
from typing import List, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

RECIPE = 'compute_dtype=float32;center_crop_fraction=1.0;jpeg_draft=0'


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


def _micros(moment: datetime.datetime) -> int:
  return round(moment.timestamp() * 1e6)


def _example(row: Row, model: str, full_schema: bool) -> bytes:
  feature = tf.train.Feature
  features = {
      'image/uri': feature(bytes_list=tf.train.BytesList(value=[row.uri.encode()])),
      'image/sha256': feature(bytes_list=tf.train.BytesList(value=[row.sha256.encode()])),
      'image/height': feature(int64_list=tf.train.Int64List(value=[row.height])),
      'image/width': feature(int64_list=tf.train.Int64List(value=[row.width])),
      'model': feature(bytes_list=tf.train.BytesList(value=[model.encode()])),
      'embedding': feature(float_list=tf.train.FloatList(value=row.embedding)),
  }
  if full_schema:  # the features the first release did not write
    features.update({
        'image/size_bytes': feature(int64_list=tf.train.Int64List(value=[row.size_bytes])),
        'image/last_modified': feature(int64_list=tf.train.Int64List(
            value=[_micros(row.last_modified)])),
        'model/weights': feature(bytes_list=tf.train.BytesList(value=[b'untrained'])),
        'embedding/recipe': feature(bytes_list=tf.train.BytesList(value=[RECIPE.encode()])),
        'pipeline/version': feature(bytes_list=tf.train.BytesList(value=[b'0.2.0'])),
    })
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _table(shard: List[Row], model: str) -> pa.Table:
  dimension = len(shard[0].embedding)
  vectors = np.stack([r.embedding for r in shard]).astype(np.float32)
  return pa.table({
      'uri': [r.uri for r in shard], 'sha256': [r.sha256 for r in shard],
      'height': pa.array([r.height for r in shard], pa.int64()),
      'width': pa.array([r.width for r in shard], pa.int64()),
      'size_bytes': pa.array([r.size_bytes for r in shard], pa.int64()),
      'last_modified': pa.array([r.last_modified for r in shard], pa.timestamp('us', tz='UTC')),
      'model': [model] * len(shard), 'weights': ['untrained'] * len(shard),
      'recipe': [RECIPE] * len(shard), 'pipeline_version': ['0.2.0'] * len(shard),
      'embedding': pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dimension),
  })


def _put(path: str, data: bytes) -> None:
  if '://' not in path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)


def _parquet_bytes(table: pa.Table) -> bytes:
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink)
  return sink.getvalue().to_pybytes()


def write_run(directory: str, run_rows: List[Row], model: str = 'builtin:test@untrained-seed0',
              output_format: str = 'tfrecord', compression: str = 'none', shard_rows: int = 0,
              finished_at: Optional[str] = '2026-01-01T00:00:00Z', summary: bool = True,
              index: bool = False, full_schema: bool = True, failed_uris=()) -> List[str]:
  """Writes the run; returns the embedding shard paths."""
  shard_rows = shard_rows or len(run_rows)
  shards = [run_rows[i:i + shard_rows] for i in range(0, len(run_rows), shard_rows)]
  paths = []
  for number, shard in enumerate(shards):
    name = f'{directory}/embeddings-{number:05d}-of-{len(shards):05d}'
    if output_format in ('tfrecord', 'both'):
      suffix = '.tfrecord.gz' if compression == 'gzip' else '.tfrecord'
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
      _put(name + '.parquet', _parquet_bytes(_table(shard, model)))
      paths.append(name + '.parquet')
  if index:
    outcomes = [(r.uri, 'embedded') for r in run_rows] + [(u, 'decode') for u in failed_uris]
    _put(f'{directory}/index-00000-of-00001.parquet', _parquet_bytes(pa.table({
        'uri': [u for u, _ in outcomes], 'outcome': [o for _, o in outcomes],
        'model': [model] * len(outcomes)})))
  if summary:
    content = {'matched': len(run_rows), 'embedded': len(run_rows), 'failed': 0, 'model': model,
               'embedding_size': len(run_rows[0].embedding) if run_rows else None,
               'output': directory}
    if finished_at:
      content['finished_at'] = finished_at
    _put(f'{directory}/run_summary.json', json.dumps(content).encode())
  return paths
