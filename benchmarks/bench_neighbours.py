"""Seconds per million vectors for exact k-NN streamed from shards, and for all-pairs duplicates.

Writes synthetic 4320-d vectors as Parquet and as TFRecord shards (encoded as the pipeline encodes
them) to a scratch directory, then times `embeddings.neighbours.search` over each (the files are
in the page cache: storage throughput is not measured), the same scoring over vectors already in
memory, and `embeddings.duplicates.find_groups` on a smaller set (its cost grows with the square).

    python -m benchmarks.bench_neighbours [--vectors 50000] [--shard_rows 2500] [--k 8] \
        [--duplicates_vectors 10000] [--scratch /tmp]
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIMENSION = 4320
MODEL = 'builtin:pnasnet_large@untrained-seed0'


def _shard_vectors(rng, rows: int) -> np.ndarray:
  return rng.standard_normal((rows, DIMENSION), dtype=np.float32)


def write_runs(scratch: str, vectors: int, shard_rows: int) -> dict:
  import tensorflow as tf
  from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
  from run_format import SUMMARY_FILE
  from tests.run_writer import run_summary
  from transforms.embed import Embedding
  from transforms.provenance import Provenance
  from transforms.write import embeddings_to_record_batch
  provenance = Provenance(MODEL, 'untrained seed 0', 'compute_dtype=float32', 'benchmark')
  encoder = RecordBatchToExamplesEncoder()
  rng = np.random.default_rng(0)
  shards = -(-vectors // shard_rows)
  runs = {}
  for output_format in ('parquet', 'tfrecord'):
    runs[output_format] = os.path.join(scratch, output_format)
    os.makedirs(runs[output_format])
  for number in range(shards):
    rows = min(shard_rows, vectors - number * shard_rows)
    matrix = _shard_vectors(rng, rows)
    uris = [f'gs://bucket/photos/{number:05d}/{i:06d}.jpg' for i in range(rows)]
    name = f'embeddings-{number:05d}-of-{shards:05d}'
    pq.write_table(pa.table({
        'uri': uris, 'sha256': [f'{hash(u) & (2**64 - 1):064x}' for u in uris],
        'height': pa.array([480] * rows, pa.int64()), 'width': pa.array([640] * rows, pa.int64()),
        'model': [MODEL] * rows,
        'embedding': pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), DIMENSION),
    }), os.path.join(runs['parquet'], name + '.parquet'))
    batch = embeddings_to_record_batch([Embedding(u, '0' * 64, 480, 640, 100_000, None, MODEL, v)
                                        for u, v in zip(uris, matrix)], provenance)
    with tf.io.TFRecordWriter(os.path.join(runs['tfrecord'], name + '.tfrecord')) as writer:
      for example in encoder.encode(batch):
        writer.write(example)
  for directory in runs.values():
    with open(os.path.join(directory, SUMMARY_FILE), 'w') as f:
      f.write(run_summary(directory, MODEL, vectors, DIMENSION, '2026-01-01T00:00:00Z').to_json())
  return runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--vectors', type=int, default=50000)
  parser.add_argument('--shard_rows', type=int, default=2500)
  parser.add_argument('--k', type=int, default=8)
  parser.add_argument('--duplicates_vectors', type=int, default=10000)
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  args = parser.parse_args()
  import embeddings
  from embeddings import duplicates, neighbours
  from embeddings.shards import read_shard
  from embeddings.similarity import nearest
  scratch = tempfile.mkdtemp(dir=args.scratch, prefix='bench_neighbours_')
  try:
    runs = write_runs(scratch, args.vectors, args.shard_rows)
    print(f'{args.vectors} vectors of {DIMENSION} floats in shards of {args.shard_rows}')
    query = np.random.default_rng(1).standard_normal(DIMENSION).astype(np.float32)
    for output_format, directory in runs.items():
      found_runs = embeddings.find_runs(directory)
      read_shard(found_runs[0].shard_paths()[0], directory)  # imports and first calls
      started = time.perf_counter()
      found = neighbours.search(found_runs, neighbours.Query('q', query, None, 'bench', None),
                                args.k)
      seconds = time.perf_counter() - started
      assert len(found) == args.k
      print(f'streamed from {output_format:<8} shards: {seconds:7.2f} s, '
            f'{seconds * 1e6 / args.vectors:7.1f} s per million vectors')
    shards = list(embeddings.iter_shards(runs['parquet']))
    started = time.perf_counter()
    nearest(iter(shards), query, args.k)
    seconds = time.perf_counter() - started
    print(f'scoring only (vectors in memory):  {seconds:7.2f} s, '
          f'{seconds * 1e6 / args.vectors:7.1f} s per million vectors')
    del shards
    count = min(args.duplicates_vectors, args.vectors)
    collection = embeddings.load(runs['parquet'])
    collection = collection._replace(uris=collection.uris[:count],
                                     vectors=collection.vectors[:count],
                                     metadata=collection.metadata.slice(0, count))
    started = time.perf_counter()
    duplicates.find_groups(collection, threshold=0.986)
    seconds = time.perf_counter() - started
    print(f'duplicates, all pairs of {count} vectors: {seconds:7.2f} s '
          f'(grows with the square of the count)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
