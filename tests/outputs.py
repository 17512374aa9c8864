"""Reading a run's files back as a user would (TensorFlow's TFRecord reader, JSON lines), for the
end-to-end tests."""

import json
import os

import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from run_format import FAILURES_GLOB, TFRECORD_EMBEDDINGS_GLOB


def read_examples(output: str, tmp_path) -> list:
  """Every tf.train.Example in the run's TFRecord shards (copied to `tmp_path` to read)."""
  examples = []
  shards = FileSystems.join(output, TFRECORD_EMBEDDINGS_GLOB)
  for match in FileSystems.match([shards])[0].metadata_list:
    local = tmp_path / os.path.basename(match.path)
    with FileSystems.open(match.path, compression_type='uncompressed') as f:
      local.write_bytes(f.read())
    compression = 'GZIP' if match.path.endswith('.gz') else ''
    for record in tf.data.TFRecordDataset(str(local), compression_type=compression):
      examples.append(tf.train.Example.FromString(record.numpy()))
  return examples


def read_failures(output: str) -> list:
  """Every dead-letter record of the run, as dicts."""
  lines = []
  for match in FileSystems.match([FileSystems.join(output, FAILURES_GLOB)])[0].metadata_list:
    with FileSystems.open(match.path) as f:
      lines += [json.loads(line) for line in f.read().decode().splitlines() if line]
  return lines
