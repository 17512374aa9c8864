"""What `pnasnet-embeddings export` costs over a collection: rows/s and peak memory of a whole
export of a synthetic collection to pgvector (a real PostgreSQL with pgvector, pgserver, on
127.0.0.1) and to Milvus Lite (in the exporting process), then syncs after nights of churn
(each night replacing a share of the rows: a removed row and an inserted one): rows read,
written and deleted and time of each sync, against the whole export; then a sync after a
compaction (nothing to write) and a rerun with nothing new.

    python -m benchmarks.synthetic_collection --collection DIR/collection --count 1000000 \
        --churn_nights 30 --churn 0.01                                            # once
    python -m benchmarks.bench_export --collection DIR/collection [--sync_after 1 10 30] \
        [--targets pgvector milvus-lite] [--work DIR]
    python -m benchmarks.bench_export [--count 100000] [--churn_nights 30] [--churn 0.01]

The whole export is of the collection's first version (the one the synthetic writer committed
before its churn nights); each sync brings the target to the version after that many nights (a
sync after 10 nights, following one after 1, applies 9 nights of changes). Each export runs as
its own process (`pnasnet-embeddings export`, DirectRunner, one worker), so its peak RSS is its
own (Milvus Lite runs inside it; PostgreSQL's server does not count).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from tests.export_servers import postgres_with_pgvector


def _export(uri: str, version: int, to: str) -> dict:
  """One export as a child process: wall seconds, its own peak RSS, its summary line."""
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    child = subprocess.Popen([sys.executable, '-m', 'commands', 'export', '--collection', uri,
                              '--version', str(version), '--to', to], stdout=out, stderr=err,
                             text=True)
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    if child.returncode:
      raise SystemExit(f'export failed ({child.returncode}): {err.read()[-2000:]}')
    return {'seconds': seconds, 'peak_rss_gb': usage.ru_maxrss / 1e6,  # ru_maxrss: KB
            'line': out.read().strip().splitlines()[-1]}


def _night_versions(uri: str) -> list:
  """The versions of the collection's commits of rows (the first, then each night's)."""
  import collection
  return [entry.version for entry in collection.history(uri) if entry.kind in ('night', 'import')]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', help='a collection written by benchmarks.'
                      'synthetic_collection --collection (default: one written here)')
  parser.add_argument('--count', type=int, default=100_000)
  parser.add_argument('--churn_nights', type=int, default=30)
  parser.add_argument('--churn', type=float, default=0.01)
  parser.add_argument('--sync_after', type=int, nargs='+', default=[1, 10, 30],
                      help='nights after the first version to sync to, in order')
  parser.add_argument('--work', help='folder for the collection and Milvus Lite (default: a '
                      'temp dir)')
  parser.add_argument('--targets', nargs='+', choices=('pgvector', 'milvus-lite'),
                      default=['pgvector', 'milvus-lite'])
  args = parser.parse_args(argv)
  work = args.work or tempfile.mkdtemp(prefix='bench-export-')
  uri = args.collection
  if uri is None:
    from benchmarks.synthetic_collection import write_synthetic_collection
    uri = os.path.join(work, 'collection')
    start = time.perf_counter()
    write_synthetic_collection(uri, args.count, churn_nights=args.churn_nights,
                               churn=args.churn)
    print(f'collection: {args.count} synthetic 4320-d vectors and {args.churn_nights} nights of '
          f'{args.churn:.0%} churn in {time.perf_counter() - start:.0f} s ({uri})', flush=True)
  versions = _night_versions(uri)
  with postgres_with_pgvector() as url:
    targets = {'pgvector': f'{url}?table=photos',
               'milvus-lite': f'milvus-lite:{os.path.join(work, "photos.db")}?collection=photos'}
    for name in args.targets:
      to = targets[name]
      full = _export(uri, versions[0], to)
      print(f'{name} whole export of version {versions[0]}: {full["seconds"]:.1f} s, peak RSS '
            f'{full["peak_rss_gb"]:.2f} GB\n  {full["line"]}', flush=True)
      for nights in args.sync_after:
        if nights >= len(versions):
          print(f'  (the collection has {len(versions) - 1} nights, not {nights})')
          break
        sync = _export(uri, versions[nights], to)
        print(f'{name} sync to version {versions[nights]} (after {nights} nights): '
              f'{sync["seconds"]:.1f} s, peak RSS {sync["peak_rss_gb"]:.2f} GB\n'
              f'  {sync["line"]}', flush=True)
      nothing = _export(uri, versions[min(args.sync_after[-1], len(versions) - 1)], to)
      print(f'{name} rerun with nothing new: {nothing["seconds"]:.1f} s\n  {nothing["line"]}',
            flush=True)


if __name__ == '__main__':
  main()
