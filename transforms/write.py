"""Stage 4: embeddings (TFRecord and/or Parquet), dead letters (JSON lines) and the run's index;
with --collection, the night's new rows as fragments of the collection too.

Every sink returns the files it wrote, so that the run summary can wait for all of them. No sink
writes an empty shard: an empty file becomes a multipart upload with no parts on S3, which S3
refuses, so a run with no failures simply has no failures file (the summary lists what exists).
"""

import datetime
from typing import Dict, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io import filebasedsink, iobase
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import _ParquetSink
from apache_beam.io.textio import _TextSink
from apache_beam.io.tfrecordio import _TFRecordSink
from apache_beam.coders import coders

from collection import EMBEDDED_AT, write_fragment
from collection.table import BYTE_LENGTH, BYTE_OFFSET, CONTENT_ID
from collection.table import schema as collection_schema
from run_format import (EMBEDDED, EMBEDDING, EMBEDDINGS_PREFIX, FAILURES_PREFIX, FAILURES_SUFFIX,
                        INDEX_PREFIX, INDEX_SCHEMA, PARQUET_SUFFIX, RUN_COLUMN, SHARD_NAME, SKIPPED,
                        embeddings_schema, tfrecord_suffix, to_example_batch)
from transforms import heartbeat
from transforms.embed import Embedding
from transforms.failures import Failure
from transforms.provenance import Provenance

COMPRESSIONS = {'none': CompressionTypes.UNCOMPRESSED, 'gzip': CompressionTypes.GZIP}
OUTPUT_FORMATS = ('tfrecord', 'parquet', 'both')
ENCODE_BATCH_SIZE = 256
INDEX_BATCH_SIZE = 10_000
FRAGMENT_ROWS = 4_096  # rows a worker writes as one fragment of the collection (at most)


def _embedding_columns(embeddings: Sequence[Embedding], provenance: Provenance,
                       embedding_dtype: str = 'float32') -> dict:
  """`embedding_dtype`: the stored vectors' type, float32 or float16 (rounded to nearest)."""
  vectors = np.stack([e.embedding for e in embeddings]).astype(np.float32).astype(
      embedding_dtype, copy=False)
  count = len(embeddings)
  return {
      'uri': [e.uri for e in embeddings], 'sha256': [e.sha256 for e in embeddings],
      'height': [e.height for e in embeddings], 'width': [e.width for e in embeddings],
      'size_bytes': [e.size_bytes for e in embeddings],
      'last_modified': [e.last_modified for e in embeddings],
      'model': [e.model for e in embeddings], 'weights': [provenance.weights] * count,
      'recipe': [provenance.recipe] * count, 'pipeline_version': [provenance.version] * count,
      EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
  }


def embeddings_to_record_batch(embeddings: Sequence[Embedding], provenance: Provenance,
                               embedding_dtype: str = 'float32') -> pa.RecordBatch:
  """For tfx-bsl's Example encoder (see run_format.to_example_batch)."""
  return to_example_batch(_embedding_columns(embeddings, provenance, embedding_dtype))


def embeddings_to_table(embeddings: Sequence[Embedding], provenance: Provenance,
                        schema: pa.Schema) -> pa.Table:
  """`schema` (run_format.embeddings_schema) says the stored dtype."""
  columns = _embedding_columns(embeddings, provenance,
                               schema.field(EMBEDDING).type.value_type.to_pandas_dtype())
  return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


class _OpenOnFirstWrite(iobase.Writer):
  """A shard file is created only when its first record arrives; from then until it is closed
  (uploaded), its process keeps the run's claim fresh (transforms/heartbeat.py)."""

  def __init__(self, open_writer, run_directory: str):
    self._open_writer = open_writer
    self._run_directory = run_directory
    self._writer = None

  def write(self, value):
    if self._writer is None:
      heartbeat.hold(self._run_directory)
      try:
        self._writer = self._open_writer()
      except BaseException:
        heartbeat.release(self._run_directory)
        raise
    self._writer.write(value)

  def close(self):
    if self._writer is None:
      return None
    try:
      return self._writer.close()
    finally:
      heartbeat.release(self._run_directory)


class _NoEmptyShards:
  """Mixed into a FileBasedSink: shards that would be empty are never created, and the rest are
  numbered among themselves (`-of-N` counts the files that exist)."""

  skip_if_empty = True

  def open_writer(self, init_result, uid):
    run_directory = FileSystems.split(self.file_path_prefix.get())[0]
    return _OpenOnFirstWrite(
        lambda: filebasedsink.FileBasedSink.open_writer(self, init_result, uid), run_directory)

  def pre_finalize(self, init_result, writer_results):
    return super().pre_finalize(init_result, [r for r in writer_results if r is not None])

  def finalize_write(self, init_result, writer_results, pre_finalize_results):
    return super().finalize_write(init_result, [r for r in writer_results if r is not None],
                                  pre_finalize_results)


class _SchemaPickledWhole:
  """Mixed into a sink that carries `_schema` to workers: pyarrow 25 pickles a fixed-size list
  type without its element field, so the embedding's required elements would arrive optional.
  Arrow IPC bytes keep the schema whole."""

  def __getstate__(self):
    return {**self.__dict__, '_schema': self._schema.serialize().to_pybytes()}

  def __setstate__(self, state):
    self.__dict__.update(state, _schema=pa.ipc.read_schema(pa.py_buffer(state['_schema'])))


class _TFRecordFiles(_NoEmptyShards, _TFRecordSink):
  pass


class _TextFiles(_NoEmptyShards, _TextSink):
  pass


class _ParquetFiles(_SchemaPickledWhole, _NoEmptyShards, _ParquetSink):
  """Snappy and dictionary pages for every column but the vectors, which are written plain:
  float vectors hardly repeat, so there both only cost. Measured on 10k random 4320-d rows: 14%
  larger and 3.5x slower to read back (docs/performance.md, Exact search)."""

  def open(self, temp_path):
    import pyarrow.parquet as pq
    self._file_handle = filebasedsink.FileBasedSink.open(self, temp_path)
    encoded = [name for name in self._schema.names if name != EMBEDDING]
    compression = {name: self._codec for name in encoded}
    if EMBEDDING in self._schema.names:
      compression[EMBEDDING] = 'none'
    return pq.ParquetWriter(self._file_handle, self._schema, compression=compression,
                            use_dictionary=encoded, use_compliant_nested_type=False)

  def write_record(self, writer, table):
    # A Table pickled between stages loses its element field as a schema does; the cast puts
    # it back (zero-copy: the vectors have no nulls).
    writer.write_table(table.cast(self._schema))


class _EncodeExamples(beam.DoFn):
  """Whole batches through tfx-bsl's C++ encoder: ~25x faster than protobufs built in Python."""

  def __init__(self, provenance: Provenance, embedding_dtype: str):
    self._provenance = provenance
    self._embedding_dtype = embedding_dtype

  def setup(self):
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
    self._encoder = RecordBatchToExamplesEncoder()

  def process(self, batch: Sequence[Embedding]):
    yield from self._encoder.encode(embeddings_to_record_batch(batch, self._provenance,
                                                               self._embedding_dtype))


class _ToParquetTable(beam.DoFn):

  def __init__(self, provenance: Provenance, schema: pa.Schema):
    self._provenance = provenance
    self._schema = schema

  def process(self, batch: Sequence[Embedding]):
    yield embeddings_to_table(batch, self._provenance, self._schema)


def parquet_files(prefix: str, schema: pa.Schema, num_shards: int) -> _ParquetFiles:
  """A sink of pyarrow Tables, snappy-compressed but for the vectors."""
  return _ParquetFiles(prefix, schema, 'snappy', False, False, PARQUET_SUFFIX, num_shards,
                       SHARD_NAME, 'application/x-parquet', None)


class WriteEmbeddings(beam.PTransform):
  """Writes `embeddings-SSSSS-of-NNNNN.tfrecord[.gz]` and/or `.parquet`, the vectors as
  `embedding_dtype`; returns their paths."""

  def __init__(self, output_dir: str, provenance: Provenance, feature_size: int,
               num_shards: int = 0, compression: str = 'none', output_format: str = 'tfrecord',
               embedding_dtype: str = 'float32'):
    super().__init__()
    self._prefix = output_dir.rstrip('/') + '/' + EMBEDDINGS_PREFIX
    self._provenance = provenance
    self._feature_size = feature_size
    self._num_shards = num_shards
    self._compression = compression
    self._output_format = output_format
    self._embedding_dtype = embedding_dtype

  def expand(self, embeddings):
    batches = embeddings | 'Batch' >> beam.BatchElements(min_batch_size=1,
                                                         max_batch_size=ENCODE_BATCH_SIZE)
    written = []
    if self._output_format in ('tfrecord', 'both'):
      sink = _TFRecordFiles(self._prefix, coders.BytesCoder(),
                            tfrecord_suffix(self._compression == 'gzip'), self._num_shards,
                            SHARD_NAME, COMPRESSIONS[self._compression], None)
      written.append(batches
                     | 'Encode' >> beam.ParDo(_EncodeExamples(self._provenance,
                                                                self._embedding_dtype))
                     | 'WriteTFRecord' >> iobase.Write(sink))
    if self._output_format in ('parquet', 'both'):
      schema = embeddings_schema(self._feature_size, self._embedding_dtype)
      written.append(batches
                     | 'ToTable' >> beam.ParDo(_ToParquetTable(self._provenance, schema))
                     | 'WriteParquet' >> iobase.Write(parquet_files(
                         self._prefix, schema, self._num_shards)))
    return tuple(written) | 'Written' >> beam.Flatten()


def write_text_files(prefix: str, suffix: str, num_shards: int):
  """A text sink (one element a line) that never writes an empty shard."""
  return iobase.Write(_TextFiles(prefix, suffix, True, num_shards, SHARD_NAME,
                                 coders.ToBytesCoder(), CompressionTypes.AUTO))


class WriteFailures(beam.PTransform):
  """Writes `failures-SSSSS-of-NNNNN.jsonl` (one Failure as JSON a line); returns their paths."""

  def __init__(self, output_dir: str, num_shards: int = 0):
    super().__init__()
    self._prefix = output_dir.rstrip('/') + '/' + FAILURES_PREFIX
    self._num_shards = num_shards

  def expand(self, failures):
    return (failures
            | 'ToJson' >> beam.Map(Failure.to_json)
            | 'Write' >> write_text_files(self._prefix, FAILURES_SUFFIX, self._num_shards))


def _index_row(uri: str, size_bytes: Optional[int], last_modified: Optional[int],
               content_id: Optional[str], sha256: Optional[str], provenance: Provenance,
               outcome: str, message: Optional[str] = None,
               byte_offset: Optional[int] = None, byte_length: Optional[int] = None) -> dict:
  return {'uri': uri, 'size_bytes': size_bytes, 'last_modified': last_modified,
          'content_id': content_id, 'sha256': sha256, 'model': provenance.model,
          'recipe': provenance.recipe, 'outcome': outcome, 'message': message,
          'byte_offset': byte_offset, 'byte_length': byte_length}


def embedded_index_row(embedding: Embedding, provenance: Provenance) -> dict:
  return _index_row(embedding.uri, embedding.size_bytes, embedding.last_modified,
                    embedding.content_id, embedding.sha256, provenance, EMBEDDED,
                    byte_offset=embedding.byte_offset, byte_length=embedding.byte_length)


def failed_index_row(failure: Failure, provenance: Provenance) -> dict:
  return _index_row(failure.uri, failure.size_bytes, failure.last_modified, failure.content_id,
                    failure.sha256, provenance, failure.stage,
                    f'{failure.error}: {failure.message}')


def skipped_index_row(skipped, provenance: Provenance) -> dict:
  """transforms/incremental.py's SkippedFile: this listing's version, which the collection holds."""
  ref = skipped.ref
  return _index_row(ref.uri, ref.size_bytes, ref.last_modified, ref.content_id, None, provenance,
                    SKIPPED)


class _ToFragments(beam.DoFn):
  """A batch of Embeddings -> rows of the collection's schema, written as new fragments of the
  collection (visible once the night commits) -> their metadata as JSON. The schema is made on
  the worker: a pickled fixed-size list type would lose its required elements."""

  def __init__(self, collection_uri: str, options: Dict[str, str], provenance: Provenance,
               feature_size: int, embedding_dtype: str, run: str):
    self._uri = collection_uri
    self._options = options
    self._provenance = provenance
    self._feature_size = feature_size
    self._embedding_dtype = embedding_dtype
    self._run = run
    self._rows = beam.metrics.Metrics.counter('collection', 'rows_written')

  def setup(self):
    self._schema = collection_schema(self._provenance.model, self._feature_size,
                                     self._embedding_dtype)

  def process(self, batch: Sequence[Embedding]):
    columns = _embedding_columns(batch, self._provenance, self._embedding_dtype)
    now = datetime.datetime.now(datetime.timezone.utc)
    columns.update({
        CONTENT_ID: [e.content_id for e in batch],
        BYTE_OFFSET: [e.byte_offset for e in batch],
        BYTE_LENGTH: [e.byte_length for e in batch],
        RUN_COLUMN: [self._run] * len(batch), EMBEDDED_AT: [now] * len(batch)})
    rows = pa.Table.from_pydict({name: columns[name] for name in self._schema.names},
                                schema=self._schema)
    self._rows.inc(rows.num_rows)
    with heartbeat.beating(self._run):
      yield from write_fragment(self._uri, rows, self._options)


class WriteCollectionRows(beam.PTransform):
  """Embedding -> the fragments' JSON (collection.write_fragment) of up to FRAGMENT_ROWS rows
  each, for the night's commit; the vectors stay in the fragments."""

  def __init__(self, collection_uri: str, options: Dict[str, str], provenance: Provenance,
               feature_size: int, embedding_dtype: str, run: str):
    super().__init__()
    self._fragments = _ToFragments(collection_uri, options, provenance, feature_size,
                                   embedding_dtype, run)

  def expand(self, embeddings):
    return (embeddings
            | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=FRAGMENT_ROWS)
            | 'WriteFragments' >> beam.ParDo(self._fragments))


class WriteIndex(beam.PTransform):
  """Writes `index-SSSSS-of-NNNNN.parquet`: one row per matched file and what became of it.

  Small (no vectors), so that an incremental run or a reader can learn what a run holds without
  reading 17 KB per image.
  """

  def __init__(self, output_dir: str, provenance: Provenance, num_shards: int = 0):
    super().__init__()
    self._prefix = output_dir.rstrip('/') + '/' + INDEX_PREFIX
    self._provenance = provenance
    self._num_shards = num_shards

  def expand(self, rows):
    return (rows
            | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=INDEX_BATCH_SIZE)
            | 'ToTable' >> beam.Map(lambda batch: pa.Table.from_pylist(batch, INDEX_SCHEMA))
            | 'Write' >> iobase.Write(parquet_files(self._prefix, INDEX_SCHEMA,
                                                   self._num_shards)))
