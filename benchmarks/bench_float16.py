"""What `--embedding_dtype float16` changes: bytes per vector on disk, and exact neighbour rankings.

Writes one synthetic collection (benchmarks/synthetic_collection.py: clustered non-negative 4320-d
vectors) twice, as float32 and as float16 Parquet runs, plus a sample encoded as the pipeline's
TFRecord Examples in both dtypes; then, for queries drawn from the collection, compares the top
k by exact cosine over the float16 run (read back by `embeddings.iter_shards`, as float32 arrays)
with the top k over the float32 run: recall@k, for a float32 query (a new image embedded) and for
the query's own float16 vector (a stored URI as the query). Each query's own URI is left out.
Memory: one shard plus the scores of every query against every row (queries x vectors float32).

    python -m benchmarks.bench_float16 [--vectors 100000] [--queries 200] [--k 10] \
        [--shard_rows 10000] [--scratch /tmp]
"""

import argparse
import fnmatch
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.synthetic_collection import DIMENSION, synthetic_vectors, write_synthetic_run
from run_format import EMBEDDING_DTYPES, PARQUET_EMBEDDINGS_GLOB

TFRECORD_SAMPLE = 2000
TFRECORD_FRAMING = 16  # per record: length (8), its CRC (4), the data's CRC (4)


def tfrecord_bytes_per_vector(embedding_dtype: str, seed: int) -> float:
  """Bytes per Example record as the pipeline writes them (uncompressed), over a sample."""
  from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
  from benchmarks.synthetic_collection import MODEL_ID, uri_of
  from transforms.embed import Embedding
  from transforms.provenance import Provenance, project_version, recipe
  from transforms.write import embeddings_to_record_batch
  provenance = Provenance(MODEL_ID, f'synthetic-seed{seed}',
                          recipe('float32', 1.0, False, embedding_dtype=embedding_dtype),
                          project_version())
  _, vectors, _ = next(synthetic_vectors(TFRECORD_SAMPLE, seed))
  batch = [Embedding(uri_of(n), '0' * 64, 480, 640, 150_000, 1_767_225_600_000_000, MODEL_ID, v)
           for n, v in enumerate(vectors)]
  records = RecordBatchToExamplesEncoder().encode(
      embeddings_to_record_batch(batch, provenance, embedding_dtype))
  return sum(len(r) + TFRECORD_FRAMING for r in records) / len(records)


def _unit(vectors: np.ndarray) -> np.ndarray:
  from embeddings.similarity import unit_rows
  return unit_rows(np.asarray(vectors, np.float32))


def scores_over(run: str, queries: np.ndarray) -> tuple:
  """(cosine [queries, rows] in collection order, uris, seconds reading and scoring)."""
  import embeddings
  started = time.perf_counter()
  parts, uris = [], []
  for shard in embeddings.iter_shards(run):
    assert shard.vectors.dtype == np.float32
    parts.append(queries @ _unit(shard.vectors).T)
    uris += shard.uris
  return np.concatenate(parts, axis=1), uris, time.perf_counter() - started


def top_k(scores: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """Each query's k best columns, its own row left out."""
  scores = scores.copy()
  scores[np.arange(len(own)), own] = -np.inf
  return np.argpartition(-scores, k, axis=1)[:, :k]


def _gap(scores: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """Per query, the k-th best score minus the (k+1)-th, its own row left out."""
  scores = scores.copy()
  scores[np.arange(len(own)), own] = -np.inf
  best = -np.sort(-np.partition(-scores, k + 1, axis=1)[:, :k + 1], axis=1)
  return best[:, k - 1] - best[:, k]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
  return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--vectors', type=int, default=100_000)
  parser.add_argument('--queries', type=int, default=200)
  parser.add_argument('--k', type=int, default=10)
  parser.add_argument('--shard_rows', type=int, default=10_000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--scratch', default=None, help='where to write the runs (deleted after)')
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench_float16-', dir=args.scratch)
  try:
    runs = {}
    for dtype in EMBEDDING_DTYPES:
      started = time.perf_counter()
      runs[dtype] = write_synthetic_run(os.path.join(scratch, dtype), args.vectors, args.seed,
                                        shard_rows=args.shard_rows, embedding_dtype=dtype).directory
      on_disk = sum(os.path.getsize(os.path.join(runs[dtype], name))
                    for name in fnmatch.filter(os.listdir(runs[dtype]), PARQUET_EMBEDDINGS_GLOB))
      print(f'{dtype}: Parquet {on_disk / args.vectors:,.0f} bytes/vector (snappy, with the '
            f'metadata columns; written in {time.perf_counter() - started:.0f} s); TFRecord '
            f'{tfrecord_bytes_per_vector(dtype, args.seed):,.0f} bytes/vector (uncompressed)')
    own = np.random.default_rng([args.seed, 5]).choice(args.vectors, args.queries, replace=False)
    full = {}
    for start, block, _ in synthetic_vectors(args.vectors, args.seed):
      for row in own[(own >= start) & (own < start + len(block))]:
        full[int(row)] = block[row - start]
    queries32 = _unit(np.stack([full[int(row)] for row in own]))
    queries16 = _unit(np.stack([full[int(row)] for row in own]).astype(np.float16))
    exact_scores, uris32, seconds32 = scores_over(runs['float32'], queries32)
    exact = top_k(exact_scores, own, args.k)
    half_scores, uris16, seconds16 = scores_over(runs['float16'], queries32)
    assert uris16 == uris32, 'the runs must hold the same rows in the same order'
    print(f'read and scored {args.vectors} vectors x {args.queries} queries: float32 '
          f'{seconds32:.1f} s, float16 {seconds16:.1f} s (shared machine: indicative only)')
    print(f'recall@{args.k} float16-stored vs float32, float32 query: '
          f'{recall(top_k(half_scores, own, args.k), exact):.4f}')
    change = np.abs(np.take_along_axis(half_scores - exact_scores, exact, axis=1))
    print(f'cosine change of the exact top {args.k}: mean {change.mean():.2e}, max '
          f'{change.max():.2e}; gap between ranks {args.k} and {args.k + 1} (float32): median '
          f'{np.median(_gap(exact_scores, own, args.k)):.2e}')
    del half_scores
    own_scores, _, _ = scores_over(runs['float16'], queries16)
    print(f'recall@{args.k} float16-stored vs float32, the query\'s own float16 vector: '
          f'{recall(top_k(own_scores, own, args.k), exact):.4f}')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
