"""Seconds per million vectors for exact k-NN streamed from a collection, and for all-pairs
duplicates.

Over an existing collection (`--collection`, e.g. `collection import` of the 1M synthetic run of
benchmarks/synthetic_collection.py): `embeddings.neighbours.search_vectors` for 1 query, again (a
second pass: were the files cached?), and for a batch of queries in one pass; peak RSS at the end.
`--cold` drops the page cache (Linux, as root) before the first pass:

    python -m benchmarks.bench_neighbours --collection /work/bench-data/collection-1m \
        [--batch 16] [--k 8] [--cold]

Without --collection: writes a synthetic collection of Gaussian 4320-d vectors
(benchmarks/bench_load.py) to a scratch folder, times the search over it (files in the page
cache), the same scoring over vectors already in memory, and
`embeddings.duplicate_groups.find_groups` on a smaller set (its cost grows with the square):

    python -m benchmarks.bench_neighbours [--vectors 50000] [--fragment_rows 10000] [--k 8] \
        [--duplicates_vectors 10000] [--scratch /tmp]
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

DIMENSION = 4320


def _load() -> str:
  return 'load average %.2f %.2f %.2f' % os.getloadavg()


def _peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def drop_page_cache() -> None:
  """Linux, as root: the next reads come from the disk."""
  os.sync()
  with open('/proc/sys/vm/drop_caches', 'w') as f:
    f.write('1\n')


def bench_collection(uri: str, k: int, batch: int, cold: bool = False) -> None:
  """Two passes of 1 query and one of `batch` queries over an existing collection; `cold`: the
  page cache dropped before the first pass."""
  import embeddings
  from embeddings import neighbours
  from embeddings.runs import open_snapshot
  snapshot = open_snapshot(uri)
  first = next(embeddings.iter_shards(uri, batch_rows=max(batch, 256)))
  rows = np.random.default_rng(1).choice(len(first.uris), batch, replace=False)
  queries, excluded = first.vectors[rows], [{first.uris[r]} for r in rows]
  del first
  print(f'{uri} version {snapshot.version}: {len(snapshot.fragment_ids())} fragments, '
        f'{snapshot.num_rows} vectors, {snapshot.embedding_dtype}')
  if cold:
    drop_page_cache()
  per_million = 1e6 / snapshot.num_rows
  first_pass = '1 query, pass 1' + (' (page cache dropped)' if cold else '')
  for label, chosen in ((first_pass, 1), ('1 query, pass 2', 1),
                        (f'{batch} queries at once', batch)):
    started = time.perf_counter()
    found = neighbours.search_vectors(snapshot, queries[:chosen], k, excluded[:chosen])
    seconds = time.perf_counter() - started
    assert all(len(f) == k for f in found) and found[0][0].uri not in excluded[0]
    print(f'exact search, {label}: {seconds:.1f} s, {seconds * per_million:.1f} s per million '
          f'vectors ({_load()})')
  print(f'peak RSS {_peak_rss_gib():.2f} GiB')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', help='an existing collection to search')
  parser.add_argument('--batch', type=int, default=16, help='queries searched at once')
  parser.add_argument('--vectors', type=int, default=50000)
  parser.add_argument('--fragment_rows', type=int, default=10000)
  parser.add_argument('--k', type=int, default=8)
  parser.add_argument('--duplicates_vectors', type=int, default=10000)
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  parser.add_argument('--cold', action='store_true',
                      help='with --collection: drop the page cache (Linux, root) first')
  args = parser.parse_args()
  if args.collection:
    bench_collection(args.collection, args.k, args.batch, args.cold)
    return
  import embeddings
  from benchmarks.bench_load import write_synthetic_collection
  from embeddings import duplicate_groups, neighbours
  from embeddings.runs import open_snapshot
  from embeddings.similarity import nearest
  scratch = tempfile.mkdtemp(dir=args.scratch, prefix='bench_neighbours_')
  try:
    uri = os.path.join(scratch, 'collection')
    write_synthetic_collection(uri, args.vectors, DIMENSION, args.fragment_rows)
    print(f'{args.vectors} vectors of {DIMENSION} floats in nights of {args.fragment_rows}')
    query = np.random.default_rng(1).standard_normal(DIMENSION).astype(np.float32)
    snapshot = open_snapshot(uri)
    started = time.perf_counter()
    found = neighbours.search(snapshot, neighbours.Query('q', query, None, 'bench', None), args.k)
    seconds = time.perf_counter() - started
    assert len(found) == args.k
    print(f'streamed from the collection:     {seconds:7.2f} s, '
          f'{seconds * 1e6 / args.vectors:7.1f} s per million vectors ({_load()})')
    shards = list(embeddings.iter_shards(uri))
    started = time.perf_counter()
    nearest(iter(shards), query, args.k)
    seconds = time.perf_counter() - started
    print(f'scoring only (vectors in memory):  {seconds:7.2f} s, '
          f'{seconds * 1e6 / args.vectors:7.1f} s per million vectors')
    del shards
    count = min(args.duplicates_vectors, args.vectors)
    loaded = embeddings.load(uri)
    loaded = loaded._replace(uris=loaded.uris[:count], vectors=loaded.vectors[:count],
                             metadata=loaded.metadata.slice(0, count))
    started = time.perf_counter()
    duplicate_groups.find_groups(loaded, threshold=0.986)
    seconds = time.perf_counter() - started
    print(f'duplicates, all pairs of {count} vectors: {seconds:7.2f} s '
          f'(grows with the square of the count)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
