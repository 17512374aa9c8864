"""One shard file (TFRecord plain or gzip, or Parquet) -> URIs, float32 matrix, metadata table.

Both formats come out alike: the metadata is an Arrow table with the columns of
run_format.METADATA_SCHEMA, null where the writer had no value (an Example then leaves the
feature out).
"""

import contextlib
import gzip
import struct
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

import storage
from run_format import (EMBEDDING, GZIP_SUFFIX, METADATA_COLUMNS, METADATA_SCHEMA, PARQUET_SUFFIX,
                        RUN_COLUMN, example_vectors, from_example_batch)

_MASK_DELTA = 0xa282ead8


class CorruptShardError(ValueError):
  """A shard's bytes are not what the pipeline writes (truncated, or not a TFRecord file)."""


class Shard(NamedTuple):
  path: str
  uris: List[str]
  vectors: np.ndarray  # float32 [rows, dimension]
  metadata: pa.Table  # run_format.METADATA_SCHEMA, one row per URI

  def select(self, keep: np.ndarray) -> 'Shard':
    """The rows where the boolean mask `keep` is set."""
    return Shard(self.path, [u for u, k in zip(self.uris, keep) if k], self.vectors[keep],
                 self.metadata.filter(pa.array(keep)))


def _masked_crc(data: bytes) -> int:
  import google_crc32c
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff


def _read_exactly(f, size: int, path: str) -> bytes:
  data = f.read(size)
  if len(data) != size:
    raise CorruptShardError(f'{path}: truncated record ({len(data)} of {size} bytes)')
  return data


def tfrecords(f, path: str) -> Iterator[bytes]:
  """The records of a TFRecord stream, checking both CRCs as TensorFlow's reader does."""
  while True:
    header = f.read(12)
    if not header:
      return
    if len(header) != 12:
      raise CorruptShardError(f'{path}: truncated record header')
    length, length_crc = struct.unpack('<QI', header)
    if _masked_crc(header[:8]) != length_crc:
      raise CorruptShardError(f'{path}: bad length checksum: not a TFRecord file?')
    data = _read_exactly(f, length, path)
    data_crc, = struct.unpack('<I', _read_exactly(f, 4, path))
    if _masked_crc(data) != data_crc:
      raise CorruptShardError(f'{path}: bad record checksum')
    yield data


def _metadata(columns: dict, rows: int, run: str) -> pa.Table:
  arrays = []
  for field in METADATA_SCHEMA:
    if field.name == RUN_COLUMN:
      arrays.append(pa.array([run] * rows, pa.string()))
    elif field.name in columns and columns[field.name] is not None:
      arrays.append(columns[field.name].cast(field.type))
    else:
      arrays.append(pa.nulls(rows, field.type))
  return pa.Table.from_arrays(arrays, schema=METADATA_SCHEMA)


def _matrix(values: pa.Array, sizes: np.ndarray, path: str) -> np.ndarray:
  if len(sizes) and (sizes.min() != sizes.max() or sizes[0] == 0):
    raise CorruptShardError(f'{path}: embeddings of different sizes {sorted(set(sizes))}')
  dimension = int(sizes[0]) if len(sizes) else 0
  return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(
      len(sizes), dimension)


def _read_tfrecord(path: str, run: str) -> Shard:
  from tfx_bsl.coders.example_coder import ExamplesToRecordBatchDecoder
  with storage.open_file(path) as raw:
    f = gzip.GzipFile(fileobj=raw) if path.endswith(GZIP_SUFFIX) else raw
    records = list(tfrecords(f, path))
  if not records:
    return Shard(path, [], np.zeros((0, 0), np.float32), _metadata({}, 0, run))
  batch = ExamplesToRecordBatchDecoder().DecodeBatch(records)
  del records
  try:
    values, sizes = example_vectors(batch)  # float32 or float16 (--embedding_dtype)
  except ValueError as exc:
    raise CorruptShardError(f'{path}: {exc}') from exc
  metadata = _metadata(from_example_batch(batch), batch.num_rows, run)
  return Shard(path, metadata.column('uri').to_pylist(),
               _matrix(values, sizes.to_numpy(zero_copy_only=False), path), metadata)


@contextlib.contextmanager
def _parquet_file(path: str):
  """A local file memory-mapped, read by Arrow without the GIL (twice as fast as through a
  Python file object); a remote one through Beam's FileSystems."""
  import pyarrow.parquet as pq
  if storage.is_remote(path):
    with storage.open_file(path) as f:
      yield pq.ParquetFile(f)
    return
  parquet = pq.ParquetFile(path[len('file://'):] if path.startswith('file://') else path,
                           memory_map=True)
  try:
    yield parquet
  finally:
    parquet.close()


def _read_parquet(path: str, run: str, columns: Optional[Sequence[str]]) -> Shard:
  with _parquet_file(path) as parquet:
    available = set(parquet.schema_arrow.names)
    wanted = [c for c in (columns or METADATA_COLUMNS + [EMBEDDING]) if c in available]
    table = parquet.read(columns=wanted)
  metadata = _metadata({c: table.column(c) for c in METADATA_COLUMNS if c in table.column_names},
                       table.num_rows, run)
  if EMBEDDING in table.column_names:
    embedding = table.column(EMBEDDING).combine_chunks()
    if pa.types.is_fixed_size_list(embedding.type):
      vectors = embedding_block(embedding, path)
    else:
      import pyarrow.compute as pc
      sizes = pc.list_value_length(embedding).to_numpy(zero_copy_only=False)
      vectors = _matrix(embedding.flatten(), sizes, path)
  else:
    vectors = np.zeros((table.num_rows, 0), np.float32)
  return Shard(path, metadata.column('uri').to_pylist(), vectors, metadata)


# float16 bit pattern -> float32 value: a table look-up converts faster than astype.
_HALF_TO_SINGLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def embedding_block(column: pa.Array, path: str) -> np.ndarray:
  """A fixed-size-list embedding column (float32 or float16) -> float32 [rows, dimension],
  without a Python object per row; a missing vector or element is a corrupt shard."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  if not pa.types.is_fixed_size_list(column.type):
    raise CorruptShardError(f'{path}: the embedding column is {column.type}, not a fixed-size list')
  values = column.flatten()
  if column.null_count or values.null_count:
    raise CorruptShardError(f'{path}: rows without a whole embedding')
  dimension = column.type.list_size
  if pa.types.is_float16(values.type):
    bits = np.frombuffer(values.buffers()[1], np.uint16, len(values), values.offset * 2)
    return np.take(_HALF_TO_SINGLE, bits).reshape(len(column), dimension)
  return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(
      len(column), dimension)


def is_parquet(path: str) -> bool:
  return path.endswith(PARQUET_SUFFIX)


def read_shard(path: str, run: str, columns: Optional[Sequence[str]] = None) -> Shard:
  """Reads a whole shard; `columns` (Parquet only) leaves the others out, e.g. ['uri']."""
  if is_parquet(path):
    return _read_parquet(path, run, columns)
  return _read_tfrecord(path, run)
