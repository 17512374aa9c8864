"""Peak memory of reading a collection, streamed: iter_shards and exact search over collections of
growing size, each measured in a fresh process (peak RSS is a process's high-water mark).

Writes synthetic collections (Gaussian vectors, `--dimension`, nights of `--fragment_rows` rows
committed as a night commits them) of each `--rows` count to a scratch folder, then, per count,
in a child process: the peak RSS of a pass of `embeddings.iter_shards`, and of one exact search
(`search_vectors`, the embedding column and row ids only). Flat in the count is what readers
promise: memory bounded by a batch, not the collection.

    python -m benchmarks.bench_load [--rows 10000 100000] [--dimension 4320] \
        [--fragment_rows 10000] [--scratch /tmp]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MODEL = 'builtin:pnasnet_large@untrained-seed0'
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_synthetic_collection(uri: str, rows: int, dimension: int, fragment_rows: int,
                               seed: int = 0) -> int:
  """A collection of `rows` Gaussian vectors, one night per `fragment_rows` (no process holds
  more than one night's rows); its last version."""
  import collection
  from tests.collection_writer import Row, commit
  rng = np.random.default_rng(seed)
  version = 0
  for first in range(0, rows, fragment_rows):
    count = min(fragment_rows, rows - first)
    vectors = rng.standard_normal((count, dimension), dtype=np.float32)
    night = [Row(f'gs://bench/photos/{first + i:09d}.jpg', vectors[i], f'{first + i:064x}')
             for i in range(count)]
    version = commit(uri, night, f'gs://bench/runs/{first // fragment_rows}', model=MODEL)
  assert collection.open_collection(uri).num_rows == rows
  return version


def _peak_rss_mb() -> float:
  """This process's high-water mark (VmHWM: unlike getrusage's ru_maxrss, not inherited from
  the parent that forked it)."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1e3


def _child(uri: str, what: str) -> dict:
  """Runs in a fresh process: one pass of `what`, its seconds and the peak RSS."""
  import embeddings
  from embeddings.neighbours import search_vectors
  from embeddings.runs import open_snapshot
  before = _peak_rss_mb()
  start = time.perf_counter()
  if what == 'iter_shards':
    rows = sum(len(shard.uris) for shard in embeddings.iter_shards(uri))
  else:
    snapshot = open_snapshot(uri)
    query = np.random.default_rng(1).standard_normal(snapshot.feature_size, dtype=np.float32)
    rows = snapshot.num_rows
    search_vectors(snapshot, query, 8)
  return {'rows': rows, 'seconds': time.perf_counter() - start, 'rss_before_mb': before,
          'peak_rss_mb': _peak_rss_mb()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', type=int, nargs='+', default=[10_000, 100_000])
  parser.add_argument('--dimension', type=int, default=4320)
  parser.add_argument('--fragment_rows', type=int, default=10_000)
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(*args.child)))
    return
  scratch = tempfile.mkdtemp(prefix='bench_load_', dir=args.scratch)
  try:
    for rows in args.rows:
      uri = os.path.join(scratch, f'collection-{rows}')
      start = time.perf_counter()
      write_synthetic_collection(uri, rows, args.dimension, args.fragment_rows)
      gigabytes = rows * args.dimension * 4 / 1e9
      print(f'{rows} rows ({gigabytes:.2f} GB of float32 vectors) written in '
            f'{time.perf_counter() - start:.1f} s')
      for what in ('iter_shards', 'search'):
        output = subprocess.run([sys.executable, '-m', 'benchmarks.bench_load', '--child', uri,
                                 what], cwd=PROJECT, capture_output=True, text=True, check=True)
        figures = json.loads(output.stdout.strip().splitlines()[-1])
        print(f'  {what}: {figures["rows"]} rows in {figures["seconds"]:.1f} s, peak RSS '
              f'{figures["peak_rss_mb"]:.0f} MB (after imports {figures["rss_before_mb"]:.0f} MB)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
