"""What a nightly run reads of earlier nights: night 2 (one earlier run) against night 11 (ten).

A folder of COLLECTION small files stands for the photo bucket. Night 1 is a real run of the
pipeline over a sample of it, for the model id and recipe the launcher records; then ten earlier
nights are written as finished run directories with run_format's own names, index schema and
RunSummary: night 1 embedded every file, nights 2-10 each skipped them all (their index rows carry
the done version forward, as real incremental runs write them). Night 2 and night 11 are then
real runs through the launcher with --incremental_from over the earlier nights; every file is
unchanged, so both skip everything and the cost is the state they read.

    python -m benchmarks.bench_nights [--collection 20000] [--nights 10]

Prints, for night 2 and night 11: the runs read, the index rows and bytes those hold (what the
run's ReadDone step reads), the rows all earlier indexes hold (what reading every earlier run
would cost), and the wall time.
"""

import argparse
import dataclasses
import datetime
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.launcher import run
from run_format import (CLAIM_FILE, EMBEDDED, INDEX_SCHEMA, SKIPPED, SUMMARY_FILE, RunSummary)
from transforms.listing import stat_object

TINY = '--model=builtin:pnasnet_tiny'


def _collection(folder: str, count: int):
  os.makedirs(folder)
  for number in range(count):
    with open(os.path.join(folder, f'img{number:07d}.jpg'), 'wb') as f:
      f.write(b'not decoded: every night skips it' + str(number).encode())
  return [stat_object(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


def _write_night(path: str, refs, template: RunSummary, night: int, earlier: list) -> None:
  os.makedirs(path)
  outcome = EMBEDDED if night == 1 else SKIPPED
  first = os.path.join(os.path.dirname(path), '01')  # night 1 holds every vector
  rows = {'uri': [r.uri for r in refs], 'size_bytes': [r.size_bytes for r in refs],
          'last_modified': [r.last_modified for r in refs], 'content_id': [None] * len(refs),
          'sha256': [None] * len(refs), 'model': [template.model] * len(refs),
          'recipe': [template.recipe] * len(refs), 'outcome': [outcome] * len(refs),
          'done_outcome': [None if night == 1 else EMBEDDED] * len(refs),
          'vector_run': [None if night == 1 else first] * len(refs),
          'message': [None] * len(refs), 'byte_offset': [None] * len(refs),
          'byte_length': [None] * len(refs)}
  table = pa.Table.from_pydict(
      {name: pa.array(rows[name], INDEX_SCHEMA.field(name).type) for name in INDEX_SCHEMA.names},
      INDEX_SCHEMA)
  pq.write_table(table, os.path.join(path, 'index-00000-of-00001.parquet'))
  started = (datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) +
             datetime.timedelta(days=night)).isoformat(timespec='milliseconds')
  summary = dataclasses.replace(
      template, output=path, started_at=started, finished_at=started, matched=len(refs),
      embedded=len(refs) if night == 1 else 0, skipped=0 if night == 1 else len(refs),
      failed=0, example_failures=[], files=[os.path.join(path, 'index-00000-of-00001.parquet')],
      incremental_from=[f'{os.path.dirname(path)}/*'] if earlier else [],
      incremental_runs=earlier)
  with open(os.path.join(path, CLAIM_FILE), 'w') as f:
    f.write('{}')
  with open(os.path.join(path, SUMMARY_FILE), 'w') as f:
    f.write(summary.to_json())


def _index_cost(runs) -> tuple:
  rows = size = 0
  for path in runs:
    for name in os.listdir(path):
      if name.startswith('index-'):
        rows += pq.ParquetFile(os.path.join(path, name)).metadata.num_rows
        size += os.path.getsize(os.path.join(path, name))
  return rows, size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', type=int, default=20_000)
  parser.add_argument('--nights', type=int, default=10)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench-nights-')
  try:
    photos = os.path.join(work, 'photos')
    refs = _collection(photos, args.collection)
    sample = os.path.join(work, 'sample')
    os.makedirs(sample)
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'sample_images', 'camera.png'), sample)
    template = RunSummary.from_json(_as_json(run([f'--input={sample}', TINY,
                                                  f'--output={work}/sample_run'])))
    for count, label in ((1, 'night 2'), (args.nights, f'night {args.nights + 1}')):
      nights = os.path.join(work, f'before_{label.replace(" ", "")}')
      earlier = []
      for night in range(1, count + 1):
        path = os.path.join(nights, f'{night:02d}')
        _write_night(path, refs, template, night, earlier[-1:])
        earlier.append(path)
      started = time.monotonic()
      summary = run([f'--input={photos}', TINY, f'--output={work}/{label.replace(" ", "")}',
                     f'--incremental_from={nights}/*'])
      seconds = time.monotonic() - started
      read_rows, read_bytes = _index_cost(summary['incremental_runs'])
      all_rows, _ = _index_cost(earlier)
      print(f'{label}: {count} earlier runs; read {len(summary["incremental_runs"])} of them: '
            f'{read_rows} index rows, {read_bytes} bytes (all earlier indexes: {all_rows} rows); '
            f'skipped {summary["skipped"]} of {summary["matched"]}; wall time {seconds:.1f} s',
            flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _as_json(summary) -> str:
  import json
  return json.dumps(summary if isinstance(summary, dict) else summary.to_dict())


if __name__ == '__main__':
  main()
