"""The embeddings' columns, once: the TFRecord Example features, the Parquet schema, the readers'
metadata table and the index are all derived from COLUMNS."""

from typing import Dict, NamedTuple, Sequence, Tuple

import pyarrow as pa

TIMESTAMP = pa.timestamp('us', tz='UTC')  # an Example holds it as int64 microseconds


class Column(NamedTuple):
  name: str  # in Parquet, the index and the readers' metadata: SQL-friendly
  feature: str  # in a tf.train.Example: TF-Hub style
  type: pa.DataType  # in Parquet and the metadata


COLUMNS = (
    Column('uri', 'image/uri', pa.string()),
    Column('sha256', 'image/sha256', pa.string()),
    Column('height', 'image/height', pa.int64()),
    Column('width', 'image/width', pa.int64()),
    Column('size_bytes', 'image/size_bytes', pa.int64()),
    Column('last_modified', 'image/last_modified', TIMESTAMP),
    Column('model', 'model', pa.string()),
    Column('weights', 'model/weights', pa.string()),
    Column('recipe', 'embedding/recipe', pa.string()),
    Column('pipeline_version', 'pipeline/version', pa.string()),
)
EMBEDDING = 'embedding'  # the vector, last: a float list feature, a fixed-size float32 list column
# --embedding_dtype: the vectors are computed in float32 and stored rounded to this type. float16
# is a fixed-size halffloat list column in Parquet; tf.train.Example has no float16 list, so
# there the vector is one bytes value under EMBEDDING_FLOAT16 (little-endian IEEE half floats,
# `tf.io.decode_raw(x, tf.float16)`) instead of the float list EMBEDDING.
EMBEDDING_DTYPES = ('float32', 'float16')
EMBEDDING_FLOAT16 = 'embedding/float16'
_ARROW_DTYPES = {'float32': pa.float32(), 'float16': pa.float16()}
METADATA_COLUMNS = [column.name for column in COLUMNS]
RUN_COLUMN = 'run'  # added by readers: the run directory a row was read from
METADATA_SCHEMA = pa.schema([(c.name, c.type) for c in COLUMNS] + [(RUN_COLUMN, pa.string())])
_TYPES = {column.name: column.type for column in COLUMNS}

INDEX_SCHEMA = pa.schema(
    [(name, _TYPES[name]) for name in ('uri', 'size_bytes', 'last_modified')] +
    # The store's identity of the bytes: GCS `crc32c:...`, S3 `etag:...`; null on local disks.
    [('content_id', pa.string())] +
    [(name, _TYPES[name]) for name in ('sha256', 'model', 'recipe')] +
    [('outcome', pa.string()),  # layout.EMBEDDED, SKIPPED or the failed stage
     ('message', pa.string()),
     # A shard member's bytes inside its stored shard (uncompressed tar), so that one ranged read
     # fetches it (storage/members.py); null for files and other formats; absent from older
     # indexes.
     ('byte_offset', pa.int64()),
     ('byte_length', pa.int64())])


def embedding_type(feature_size: int, embedding_dtype: str = 'float32') -> pa.DataType:
  """The Parquet embedding column: a fixed-size list whose elements are required. Arrow decodes
  required elements without their definition levels, a third faster than optional ones."""
  return pa.list_(pa.field('element', _ARROW_DTYPES[embedding_dtype], nullable=False),
                  feature_size)


def embeddings_schema(feature_size: int, embedding_dtype: str = 'float32') -> pa.Schema:
  """The Parquet embedding shards' schema; every row has its whole vector."""
  return pa.schema([(c.name, c.type) for c in COLUMNS] +
                   [pa.field(EMBEDDING, embedding_type(feature_size, embedding_dtype),
                             nullable=False)])


def _is_integer(column: Column) -> bool:
  return pa.types.is_integer(column.type) or pa.types.is_timestamp(column.type)


def _half_bytes(vectors: pa.FixedSizeListArray) -> pa.ListArray:
  """Each float16 vector as one bytes value (its half floats, in Arrow's little-endian layout),
  in a list each."""
  rows, width = len(vectors), vectors.type.list_size
  halves = vectors.flatten()
  data = halves.buffers()[1].slice(halves.offset * 2, len(halves) * 2)
  offsets = pa.array(range(0, (rows + 1) * 2 * width, 2 * width), pa.int32())
  values = pa.Array.from_buffers(pa.binary(), rows, [None, offsets.buffers()[1], data])
  return pa.ListArray.from_arrays(pa.array(range(rows + 1), pa.int32()), values)


def to_example_batch(columns: Dict[str, Sequence]) -> pa.RecordBatch:
  """Column name -> values (the embedding a FixedSizeListArray of float32 or float16) as
  tfx-bsl's Example encoder takes them: every column a list column named by its feature, as
  Example features are lists; a missing value (None) is an empty list: the Example has the
  feature, with no value."""
  arrays = []
  for column in COLUMNS:
    value_type = pa.int64() if _is_integer(column) else pa.binary()
    arrays.append(pa.array([[] if v is None else [v.encode() if isinstance(v, str) else v]
                            for v in columns[column.name]], pa.list_(value_type)))
  vectors = columns[EMBEDDING]
  if pa.types.is_float16(vectors.type.value_type):
    arrays.append(_half_bytes(vectors))
    embedding_feature = EMBEDDING_FLOAT16
  else:
    arrays.append(vectors.cast(pa.list_(pa.float32())))
    embedding_feature = EMBEDDING
  return pa.RecordBatch.from_arrays(arrays, [c.feature for c in COLUMNS] + [embedding_feature])


def example_vectors(batch: pa.RecordBatch) -> Tuple[pa.Array, pa.Array]:
  """tfx-bsl's decoded Examples -> (every vector's values end to end, float32 or float16; each
  Example's vector length), from the float list EMBEDDING or the bytes EMBEDDING_FLOAT16.
  ValueError if neither is there, or a float16 value is missing or not whole half floats."""
  import pyarrow.compute as pc
  if EMBEDDING in batch.schema.names:
    embedding = batch.column(EMBEDDING)
    return embedding.flatten(), pc.list_value_length(embedding)
  if EMBEDDING_FLOAT16 not in batch.schema.names:
    raise ValueError(f'no {EMBEDDING} or {EMBEDDING_FLOAT16} feature')
  values = _first_values(batch.column(EMBEDDING_FLOAT16))
  if values.null_count:
    raise ValueError(f'an Example without its {EMBEDDING_FLOAT16} value')
  lengths = pc.binary_length(values)
  if pc.any(pc.not_equal(pc.bit_wise_and(lengths, 1), 0)).as_py():
    raise ValueError(f'{EMBEDDING_FLOAT16} values of an odd number of bytes')
  offset_type = pa.int64() if pa.types.is_large_binary(values.type) else pa.int32()
  offsets = pa.Array.from_buffers(offset_type, len(values) + 1, [None, values.buffers()[1]],
                                  offset=values.offset)
  start, stop = offsets[0].as_py(), offsets[-1].as_py()
  halves = pa.Array.from_buffers(pa.float16(), (stop - start) // 2,
                                 [None, (values.buffers()[2] or pa.py_buffer(b'')).slice(
                                     start, stop - start)])
  return halves, pc.divide(lengths, 2)


def _first_values(lists: pa.Array) -> pa.Array:
  """Each list's first value; null for an empty or missing list."""
  import pyarrow.compute as pc
  has_value = pc.fill_null(pc.greater(pc.list_value_length(lists), 0), False)
  starts = pc.if_else(has_value, lists.offsets[:-1], pa.scalar(None, lists.offsets.type))
  return pc.take(lists.values, starts)


def from_example_batch(batch: pa.RecordBatch) -> Dict[str, pa.Array]:
  """tfx-bsl's decoded Examples -> metadata column name -> values (cast to the column's type by
  the reader), null where an Example has no value; a feature that no Example in the batch has is
  left out."""
  columns = {}
  for column in COLUMNS:
    if column.feature in batch.schema.names:
      values = _first_values(batch.column(column.feature))
      if pa.types.is_timestamp(column.type):
        values = values.cast(pa.int64()).cast(column.type)
      elif pa.types.is_large_binary(values.type) or pa.types.is_binary(values.type):
        values = values.cast(pa.large_string())
      columns[column.name] = values
  return columns
