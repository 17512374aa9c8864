"""What the collection costs at scale, in one process on local disk: building it, a night of churn
(commit time, bytes written), the skip's read of the state columns (time, peak memory), the
changes a follower reads after 1, 10 and 30 nights (rows, time: flat in the history), streaming
every vector (peak memory), compaction and cleanup.

Each night removes `--churn` of the rows at random (a changed or deleted file) and adds as many
(a new version or a new file), as `embed --collection` commits it: fragments written apart, one
commit that removes rows by id.

    python -m benchmarks.bench_collection --rows 1000000 [--nights 30] [--churn 0.01]
        [--scratch /work/bench-data]
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

import collection
from collection.table import STATE_COLUMNS, schema

MODEL = 'builtin:pnasnet_large@untrained-seed0'
SIZE = 4320
DTYPE = 'float16'
CHUNK = 50_000


def _rows(first: int, count: int, night: int, rng) -> pa.Table:
  table_schema = schema(MODEL, SIZE, DTYPE)
  columns = {field.name: pa.nulls(count, field.type) for field in table_schema}
  columns['uri'] = pa.array([f'gs://photos/img{n:09d}.jpg' for n in range(first, first + count)])
  columns['size_bytes'] = pa.array(np.full(count, 100_000 + night, np.int64))
  columns['content_id'] = pa.array([f'crc32c:{night:08x}'] * count)
  columns['model'] = pa.array([MODEL] * count)
  columns['recipe'] = pa.array(['bilinear'] * count)
  columns['run'] = pa.array([f'gs://runs/night{night:03d}'] * count)
  vectors = rng.standard_normal((count, SIZE), dtype=np.float32).astype(np.float16)
  columns['embedding'] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), SIZE)
  return pa.table(columns, schema=table_schema)


def _write(uri: str, first: int, count: int, night: int, rng):
  fragments = []
  for start in range(first, first + count, CHUNK):
    fragments += collection.write_fragment(uri, _rows(start, min(CHUNK, first + count - start),
                                                      night, rng), {})
  return fragments


def _du(path: str) -> int:
  return int(subprocess.run(['du', '-sb', path], capture_output=True, text=True,
                            check=True).stdout.split()[0])


def _peak_mb() -> float:
  """This process's peak RSS (VmHWM: unlike ru_maxrss, not carried over from the parent that
  forked it)."""
  with open('/proc/self/status') as status:
    for line in status:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  raise OSError('no VmHWM in /proc/self/status')


def _in_child(argv) -> str:
  """Peak memory is per process: each measured read runs in its own."""
  return subprocess.run([sys.executable, '-m', 'benchmarks.bench_collection'] + argv,
                        capture_output=True, text=True, check=True).stdout.strip()


def _read_state(uri: str) -> str:
  coll = collection.open_collection(uri)
  start, rows = time.perf_counter(), 0
  for fragment_id in coll.fragment_ids():
    for batch in coll.fragment_batches(fragment_id, STATE_COLUMNS):
      rows += batch.num_rows
  return (f'{rows:,} rows in {time.perf_counter() - start:.1f} s, '
          f'peak RSS {_peak_mb():,.0f} MB')


def _stream(uri: str) -> str:
  coll = collection.open_collection(uri)
  start, rows, total = time.perf_counter(), 0, 0.0
  for batch in coll.batches(['uri', 'embedding']):
    vectors = np.stack(batch.column('embedding').to_numpy(zero_copy_only=False))
    rows += len(vectors)
    total += float(vectors[:, 0].astype(np.float32).sum())
  return (f'{rows:,} rows in {time.perf_counter() - start:.1f} s, '
          f'peak RSS {_peak_mb():,.0f} MB')


def _night(uri: str, night: int, next_row: int, churn: float, rng):
  """One night: `churn` of the rows removed at random, as many new ones. (version, seconds of the
  commit alone, bytes written, next free row number)."""
  coll = collection.open_collection(uri)
  count = max(1, int(coll.num_rows * churn))
  chosen = set(rng.choice(coll.num_rows, count, replace=False).tolist())
  removed, seen = [], 0
  for fragment_id in coll.fragment_ids():
    for batch in coll.fragment_batches(fragment_id, ['size_bytes']):
      ids = batch.column('_rowid').to_pylist()
      removed += [(fragment_id, ids[i]) for i in range(len(ids)) if seen + i in chosen]
      seen += len(ids)
  before = _du(uri)
  fragments = _write(uri, next_row, count, night, rng)
  start = time.perf_counter()
  version = collection.commit_night(uri, collection.NightChanges(f'night{night}', coll.version,
                                                                 fragments, removed))
  return version, time.perf_counter() - start, _du(uri) - before, next_row + count


def _sync(uri: str, since: int) -> str:
  coll = collection.open_collection(uri)
  start = time.perf_counter()
  inserted = sum(batch.num_rows for batch in coll.changes(since).inserted(['uri']))
  deleted = sum(len(ids) for ids in coll.changes(since).deleted_row_ids())
  return f'+{inserted:,} -{deleted:,} rows in {time.perf_counter() - start:.2f} s'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', type=int, default=100_000)
  parser.add_argument('--nights', type=int, default=30)
  parser.add_argument('--churn', type=float, default=0.01)
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  parser.add_argument('--measure', choices=['state', 'stream'], help=argparse.SUPPRESS)
  parser.add_argument('--uri', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure:
    print((_read_state if args.measure == 'state' else _stream)(args.uri))
    return
  uri = os.path.join(args.scratch, f'bench-collection-{args.rows}')
  shutil.rmtree(uri, ignore_errors=True)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  created = collection.create(uri, MODEL, SIZE, DTYPE)
  first = collection.commit_night(uri, collection.NightChanges(
      'night000', created.version, _write(uri, 0, args.rows, 0, rng), []))
  print(f'built {args.rows:,} rows of {SIZE}-d {DTYPE}: {time.perf_counter() - start:.0f} s, '
        f'{_du(uri) / 1e9:.2f} GB')
  print(f'skip read of {STATE_COLUMNS}: {_in_child(["--measure", "state", "--uri", uri])}')
  print(f'every vector streamed: {_in_child(["--measure", "stream", "--uri", uri])}')
  version, next_row = first, args.rows
  for night in range(1, args.nights + 1):
    previous = version
    version, seconds, written, next_row = _night(uri, night, next_row, args.churn, rng)
    if night in (1, 10, 30) or night == args.nights:
      print(f'night {night}: commit {seconds:.2f} s, {written / 1e6:,.0f} MB written; '
            f'sync of its changes: {_sync(uri, previous)}')
  start = time.perf_counter()
  compacted = collection.compact(uri)
  print(f'compaction: {time.perf_counter() - start:.0f} s, fragments -{compacted.fragments_removed}'
        f' +{compacted.fragments_added}; changes it leaves a follower: {_sync(uri, version)}')
  start = time.perf_counter()
  cleaned = collection.cleanup(uri, datetime.timedelta(0))
  print(f'cleanup: {time.perf_counter() - start:.1f} s, {cleaned.versions_removed} versions, '
        f'{cleaned.bytes_removed / 1e9:.2f} GB removed; {_du(uri) / 1e9:.2f} GB left')
  shutil.rmtree(uri)


if __name__ == '__main__':
  main()
