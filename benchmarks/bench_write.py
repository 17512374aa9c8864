"""Microseconds to encode one 4320-d embedding record: tfx-bsl on whole batches vs protobufs
built one by one in Python (what a plain `beam.Map` would do).

    python -m benchmarks.bench_write [--batch 256] [--repeats 20]
"""

import argparse
import time

import numpy as np

from transforms.embed import Embedding
from transforms.provenance import Provenance
from transforms.write import embeddings_to_record_batch


def python_example(embedding: Embedding) -> bytes:
  import tensorflow as tf
  feature = tf.train.Feature
  return tf.train.Example(features=tf.train.Features(feature={
      'image/uri': feature(bytes_list=tf.train.BytesList(value=[embedding.uri.encode()])),
      'image/sha256': feature(bytes_list=tf.train.BytesList(value=[embedding.sha256.encode()])),
      'image/height': feature(int64_list=tf.train.Int64List(value=[embedding.height])),
      'image/width': feature(int64_list=tf.train.Int64List(value=[embedding.width])),
      'model': feature(bytes_list=tf.train.BytesList(value=[embedding.model.encode()])),
      'embedding': feature(float_list=tf.train.FloatList(value=embedding.embedding)),
  })).SerializeToString()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
  rng = np.random.default_rng(0)
  batch = [Embedding(f'gs://bucket/photos/{i:08d}.jpg', f'{i:064x}', 480, 640, 100_000, None,
                     'builtin:pnasnet_large', rng.random(4320, dtype=np.float32))
           for i in range(args.batch)]
  provenance = Provenance('builtin:pnasnet_large', 'untrained seed 0', 'compute_dtype=float32',
                          'benchmark')
  encoder = RecordBatchToExamplesEncoder()
  fast = encoder.encode(embeddings_to_record_batch(batch, provenance))
  assert fast[0] and len(fast) == args.batch
  for name, encode in (('tfx-bsl RecordBatchToExamplesEncoder',
                        lambda: encoder.encode(embeddings_to_record_batch(batch, provenance))),
                       ('tf.train.Example in Python', lambda: [python_example(e) for e in batch])):
    started = time.perf_counter()
    for _ in range(args.repeats):
      encode()
    micros = (time.perf_counter() - started) / (args.repeats * args.batch) * 1e6
    print(f'{name:<38} {micros:9.1f} us per record')


if __name__ == '__main__':
  main()
