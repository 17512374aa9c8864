"""Stage 4: embeddings as TFRecord of tf.train.Example, dead letters as JSON lines."""

from typing import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes

from transforms.embed import Embedding
from transforms.failures import Failure

METRICS_NAMESPACE = 'write'
COMPRESSIONS = {'none': CompressionTypes.UNCOMPRESSED, 'gzip': CompressionTypes.GZIP}
ENCODE_BATCH_SIZE = 256


def embeddings_to_record_batch(embeddings: Sequence[Embedding]) -> pa.RecordBatch:
  """One row per image; every column a list column, as tf.train.Example features are lists."""

  def singletons(values, value_type):
    return pa.array([[v] for v in values], pa.list_(value_type))

  vectors = np.stack([e.embedding for e in embeddings]).astype(np.float32)
  embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
  return pa.RecordBatch.from_arrays([
      singletons([e.uri.encode() for e in embeddings], pa.binary()),
      singletons([e.sha256.encode() for e in embeddings], pa.binary()),
      singletons([e.height for e in embeddings], pa.int64()),
      singletons([e.width for e in embeddings], pa.int64()),
      singletons([e.model.encode() for e in embeddings], pa.binary()),
      embedding.cast(pa.list_(pa.float32())),
  ], ['image/uri', 'image/sha256', 'image/height', 'image/width', 'model', 'embedding'])


class _EncodeExamples(beam.DoFn):
  """Whole batches through tfx-bsl's C++ encoder: ~25x faster than protobufs built in Python."""

  def __init__(self):
    self._written = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'embeddings')

  def setup(self):
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
    self._encoder = RecordBatchToExamplesEncoder()

  def process(self, batch: Sequence[Embedding]):
    examples = self._encoder.encode(embeddings_to_record_batch(batch))
    self._written.inc(len(examples))
    yield from examples


class WriteEmbeddings(beam.PTransform):
  """Writes `embeddings-SSSSS-of-NNNNN.tfrecord[.gz]` under the output directory."""

  def __init__(self, output_dir: str, num_shards: int = 0, compression: str = 'none'):
    super().__init__()
    self._prefix = output_dir.rstrip('/') + '/embeddings'
    self._num_shards = num_shards
    self._compression = compression

  def expand(self, embeddings):
    suffix = '.tfrecord' + ('.gz' if self._compression == 'gzip' else '')
    return (embeddings
            | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=ENCODE_BATCH_SIZE)
            | 'Encode' >> beam.ParDo(_EncodeExamples())
            | 'Write' >> beam.io.WriteToTFRecord(
                self._prefix, file_name_suffix=suffix, num_shards=self._num_shards,
                compression_type=COMPRESSIONS[self._compression]))


class _CountFailure(beam.DoFn):

  def process(self, failure: Failure):
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, f'failed_{failure.stage}').inc()
    yield failure.to_json()


class WriteFailures(beam.PTransform):
  """Writes `failures-SSSSS-of-NNNNN.jsonl`: one {"uri", "stage", "error", "message"} a line."""

  def __init__(self, output_dir: str, num_shards: int = 0):
    super().__init__()
    self._prefix = output_dir.rstrip('/') + '/failures'
    self._num_shards = num_shards

  def expand(self, failures):
    return (failures
            | 'ToJson' >> beam.ParDo(_CountFailure())
            | 'Write' >> beam.io.WriteToText(self._prefix, file_name_suffix='.jsonl',
                                             num_shards=self._num_shards))
