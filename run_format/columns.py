"""The embeddings' columns, once: the TFRecord Example features, the Parquet schema, the readers'
metadata table and the index are all derived from COLUMNS."""

from typing import Dict, NamedTuple, Sequence

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
METADATA_COLUMNS = [column.name for column in COLUMNS]
RUN_COLUMN = 'run'  # added by readers: the run directory a row was read from
METADATA_SCHEMA = pa.schema([(c.name, c.type) for c in COLUMNS] + [(RUN_COLUMN, pa.string())])
_TYPES = {column.name: column.type for column in COLUMNS}

INDEX_SCHEMA = pa.schema(
    [(name, _TYPES[name]) for name in ('uri', 'size_bytes', 'last_modified', 'sha256', 'model',
                                       'recipe')] +
    [('outcome', pa.string()),  # layout.EMBEDDED, SKIPPED or the failed stage
     ('message', pa.string())])
# What an incremental run reads of earlier indexes: which file version, embedded how, and its fate.
INCREMENTAL_COLUMNS = ['uri', 'size_bytes', 'last_modified', 'model', 'recipe', 'outcome']


def embeddings_schema(feature_size: int) -> pa.Schema:
  """The Parquet embedding shards' schema."""
  return pa.schema([(c.name, c.type) for c in COLUMNS] +
                   [(EMBEDDING, pa.list_(pa.float32(), feature_size))])


def _is_integer(column: Column) -> bool:
  return pa.types.is_integer(column.type) or pa.types.is_timestamp(column.type)


def to_example_batch(columns: Dict[str, Sequence]) -> pa.RecordBatch:
  """Column name -> values (the embedding a FixedSizeListArray) as tfx-bsl's Example encoder
  takes them: every column a list column named by its feature, as Example features are lists; a
  missing value (None) is an empty list: the Example has the feature, with no value."""
  arrays = []
  for column in COLUMNS:
    value_type = pa.int64() if _is_integer(column) else pa.binary()
    arrays.append(pa.array([[] if v is None else [v.encode() if isinstance(v, str) else v]
                            for v in columns[column.name]], pa.list_(value_type)))
  arrays.append(columns[EMBEDDING].cast(pa.list_(pa.float32())))
  return pa.RecordBatch.from_arrays(arrays, [c.feature for c in COLUMNS] + [EMBEDDING])


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
