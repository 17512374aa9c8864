"""Seconds per million vectors for exact k-NN streamed from shards, and for all-pairs duplicates.

Over an existing run directory (e.g. the 1M synthetic collection of
benchmarks/synthetic_collection.py): the raw read throughput of its shard files, then
`embeddings.neighbours.search_vectors` for 1 query, again (a second pass: were the files
cached?), and for a batch of queries in one pass; peak RSS at the end. `--copy_dtype` first
writes a scratch copy of its first `--copy_shards` shards with the embedding column as float16 or
float32, as written (dictionary, snappy) or `--plain_embedding` (no dictionary, no compression),
times that copy and deletes it; `--cold` drops the page cache (Linux, as root) before the first
pass instead of measuring the raw read:

    python -m benchmarks.bench_neighbours --runs /work/bench-data/synthetic-1m-float32 \
        [--batch 16] [--k 8] [--cold]
    python -m benchmarks.bench_neighbours --runs /work/bench-data/synthetic-1m-float32 \
        --copy_dtype float16 --copy_shards 20 [--plain_embedding] [--scratch /work]

Without --runs: writes synthetic Gaussian 4320-d vectors as Parquet and as TFRecord shards (encoded
as the pipeline encodes them) to a scratch directory, times the search over each (files in the
page cache), the same scoring over vectors already in memory, and
`embeddings.duplicate_groups.find_groups` on a smaller set (its cost grows with the square):

    python -m benchmarks.bench_neighbours [--vectors 50000] [--shard_rows 2500] [--k 8] \
        [--duplicates_vectors 10000] [--scratch /tmp]
"""

import argparse
import json
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


def _load() -> str:
  return 'load average %.2f %.2f %.2f' % os.getloadavg()


def _peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_throughput(paths) -> tuple:
  """(seconds, bytes) to read the files' bytes, as `cat` would."""
  started, total = time.perf_counter(), 0
  for path in paths:
    with open(path, 'rb', buffering=0) as f:
      while True:
        chunk = f.read(1 << 24)
        if not chunk:
          break
        total += len(chunk)
  return time.perf_counter() - started, total


def copy_run(source, output: str, shards: int, dtype: str, plain: bool) -> str:
  """The first `shards` shards of `source` (a Run) rewritten with the embedding column as `dtype`,
  as the writer writes it (row groups of its batch, dictionary, snappy) or `plain` (no
  dictionary, no compression for that column), under a copy of its summary."""
  from run_format import EMBEDDING, SUMMARY_FILE, embedding_type
  from transforms.write import ENCODE_BATCH_SIZE
  os.makedirs(output)
  paths = source.shard_paths()[:shards]
  kind = embedding_type(source.embedding_size, dtype)
  names = pq.ParquetFile(paths[0]).schema_arrow.names
  options = {'compression': 'snappy'}
  if plain:
    options = {'use_dictionary': [c for c in names if c != EMBEDDING],
               'compression': {c: 'none' if c == EMBEDDING else 'snappy' for c in names}}
  copied = []
  for path in paths:
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index(EMBEDDING),
                             pa.field(EMBEDDING, kind, nullable=False),
                             table.column(EMBEDDING).cast(kind))
    copied.append(os.path.join(output, os.path.basename(path)))
    pq.write_table(table, copied[-1], row_group_size=ENCODE_BATCH_SIZE, **options)
  summary = json.loads(open(os.path.join(source.path, SUMMARY_FILE)).read())
  count = sum(pq.ParquetFile(p).metadata.num_rows for p in copied)
  summary.update(output=output, files=copied, matched=count, embedded=count,
                 embedding_dtype=dtype)
  with open(os.path.join(output, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=2)
  return output


def drop_page_cache() -> None:
  """Linux, as root: the next reads come from the disk."""
  os.sync()
  with open('/proc/sys/vm/drop_caches', 'w') as f:
    f.write('1\n')


def bench_run(directory: str, k: int, batch: int, cold: bool = False) -> None:
  """Raw read, then two passes of 1 query and one of `batch` queries over an existing run;
  `cold`: no raw read, the page cache dropped before the first pass."""
  import embeddings
  from embeddings import neighbours
  from embeddings.shards import read_shard
  runs = embeddings.select_model(embeddings.find_runs(directory))
  paths = [p for run in runs for p in run.shard_paths()]
  first = read_shard(paths[0], runs[0].path)
  count = sum(pq.ParquetFile(p).metadata.num_rows for p in paths) if paths[0].endswith(
      '.parquet') else None
  rows = np.random.default_rng(1).choice(len(first.uris), batch, replace=False)
  queries, excluded = first.vectors[rows], [{first.uris[r]} for r in rows]
  del first
  print(f'{directory}: {len(paths)} shards, {sum(os.path.getsize(p) for p in paths) / 1e9:.2f} '
        f'GB, {count} vectors')
  if cold:
    drop_page_cache()
  else:
    seconds, size = read_throughput(paths)
    print(f'raw read of the shard files: {seconds:.1f} s, {size / seconds / 1e9:.2f} GB/s '
          f'({_load()})')
  per_million = 1e6 / count if count else 1e6 / runs[0].summary.embedded
  first_pass = '1 query, pass 1' + (' (page cache dropped)' if cold else '')
  for label, chosen in ((first_pass, 1), ('1 query, pass 2', 1),
                        (f'{batch} queries at once', batch)):
    started = time.perf_counter()
    found = neighbours.search_vectors(runs, queries[:chosen], k, excluded[:chosen])
    seconds = time.perf_counter() - started
    assert all(len(f) == k for f in found) and found[0][0].uri not in excluded[0]
    print(f'exact search, {label}: {seconds:.1f} s, {seconds * per_million:.1f} s per million '
          f'vectors ({_load()})')
  print(f'peak RSS {_peak_rss_gib():.2f} GiB')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', help='an existing run directory to search')
  parser.add_argument('--batch', type=int, default=16, help='queries searched at once')
  parser.add_argument('--copy_dtype', choices=('float32', 'float16'),
                      help='with --runs: time a scratch copy with this embedding dtype')
  parser.add_argument('--copy_shards', type=int, default=20)
  parser.add_argument('--plain_embedding', action='store_true',
                      help='the copy\'s embedding column without dictionary or compression')
  parser.add_argument('--vectors', type=int, default=50000)
  parser.add_argument('--shard_rows', type=int, default=2500)
  parser.add_argument('--k', type=int, default=8)
  parser.add_argument('--duplicates_vectors', type=int, default=10000)
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  parser.add_argument('--cold', action='store_true',
                      help='with --runs: drop the page cache (Linux, root) before the first pass')
  args = parser.parse_args()
  if args.runs:
    if not args.copy_dtype:
      bench_run(args.runs, args.k, args.batch, args.cold)
      return
    import embeddings
    scratch = tempfile.mkdtemp(dir=args.scratch, prefix='bench_neighbours_')
    try:
      source = embeddings.find_runs(args.runs)[0]
      started = time.perf_counter()
      copy = copy_run(source, os.path.join(scratch, 'copy'), args.copy_shards, args.copy_dtype,
                      args.plain_embedding)
      print(f'copied {args.copy_shards} shards as {args.copy_dtype}'
            f'{" (plain embedding column)" if args.plain_embedding else ""} in '
            f'{time.perf_counter() - started:.0f} s')
      bench_run(copy, args.k, args.batch, args.cold)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return
  import embeddings
  from embeddings import duplicate_groups, neighbours
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
            f'{seconds * 1e6 / args.vectors:7.1f} s per million vectors ({_load()})')
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
    duplicate_groups.find_groups(collection, threshold=0.986)
    seconds = time.perf_counter() - started
    print(f'duplicates, all pairs of {count} vectors: {seconds:7.2f} s '
          f'(grows with the square of the count)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
