"""Compaction (`pnasnet-embeddings compact`): what night 11 and the readers read before and
after it, and what the job costs as the rows grow.

1. Ten nights of NIGHT_ROWS synthetic rows each (benchmarks/synthetic_collection.py: night 1
   lists the bucket, nights 2-10 embed delta manifests of new rows, which cover nothing earlier,
   so no night supersedes another): the state night 11 reads (transforms.incremental.state_runs:
   runs, index rows, index bytes), the index rows and shards `load` reads, then the same after
   compacting the ten into one run and deleting them.
2. The wall time, CPU time and peak RSS (the job's process, DirectRunner) of compacting one run
   of 100k and of 1M rows (the in-memory runner needs about 6 GB for 1M 64-d rows).

    python -m benchmarks.bench_compact [--night_rows 20000] [--nights 10] \
        [--rows 100000 1000000] [--dimension 64]

Vectors are --dimension wide (64 by default, so that 1M rows stay within a few GB on the
in-memory runner); the rule's work is per row, the copy per byte.
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.synthetic_collection import write_synthetic_run

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _index_cost(runs) -> tuple:
  import pyarrow.parquet as pq
  import storage
  rows = size = files = 0
  for run in runs:
    for info in storage.match(run.index_glob):
      rows += pq.ParquetFile(info.path).metadata.num_rows
      size += info.size_bytes
      files += 1
  return rows, size, files


def _reads(pattern: str) -> str:
  from embeddings import find_runs
  from transforms.incremental import state_runs
  runs = find_runs(pattern)
  state = state_runs(runs, runs[0].model, runs[0].summary.recipe)
  state_rows, state_bytes, _ = _index_cost(state)
  load_rows, _, _ = _index_cost(runs)
  shards = sum(len(run.shard_paths()) for run in runs)
  return (f'night 11 reads {len(state)} of {len(runs)} runs: {state_rows} index rows, '
          f'{state_bytes} bytes; load reads {load_rows} index rows and {shards} shards')


def _compact(runs: str, output: str) -> tuple:
  """(wall seconds, CPU seconds, peak RSS in MB) of the command in its own process: on a shared
  machine the CPU time is the steadier figure."""
  started = time.monotonic()
  process = subprocess.Popen([sys.executable, '-m', 'commands', 'compact', '--runs', runs,
                              '--output', output], cwd=PROJECT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  _, status, usage = os.wait4(process.pid, 0)
  seconds = time.monotonic() - started
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(process.stderr.read().decode()[-3000:])
  return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--night_rows', type=int, default=20_000)
  parser.add_argument('--nights', type=int, default=10)
  parser.add_argument('--rows', type=int, nargs='*', default=[100_000, 1_000_000])
  parser.add_argument('--dimension', type=int, default=64)
  parser.add_argument('--skip_nights', action='store_true', help='only the timings by rows')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench-compact-')
  try:
    nights = os.path.join(work, 'nights')
    start = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    for night in range(0 if args.skip_nights else args.nights):
      write_synthetic_run(os.path.join(nights, f'{night + 1:02d}'), args.night_rows,
                          dimension=args.dimension, first_row=night * args.night_rows,
                          shard_rows=args.night_rows,
                          finished_at=(start + datetime.timedelta(days=night)).isoformat())
    if not args.skip_nights:
      print(f'{args.nights} nights x {args.night_rows} rows, before compaction: '
            f'{_reads(nights + "/*")}', flush=True)
      seconds, cpu, peak = _compact(nights + '/*', os.path.join(work, 'compacted'))
      shutil.rmtree(nights)
      print(f'after compaction ({seconds:.1f} s, CPU {cpu:.1f} s, peak RSS {peak:.0f} MB) and '
            f'deleting the nights: {_reads(os.path.join(work, "compacted"))}', flush=True)
    for rows in args.rows:
      source = os.path.join(work, f'run-{rows}')
      write_synthetic_run(source, rows, dimension=args.dimension, shard_rows=100_000)
      seconds, cpu, peak = _compact(source, os.path.join(work, f'compacted-{rows}'))
      print(f'compact {rows} rows ({args.dimension}-d): {seconds:.1f} s wall, CPU {cpu:.1f} s '
            f'({rows / cpu:.0f} rows per CPU second), peak RSS {peak:.0f} MB', flush=True)
      shutil.rmtree(source)
      shutil.rmtree(os.path.join(work, f'compacted-{rows}'))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
