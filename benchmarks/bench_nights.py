"""What a nightly run reads of the collection: after one earlier night against after ten.

A folder of COLLECTION small files stands for the photo bucket. A real run over a sample gives the
model id and recipe the launcher records; then a collection is written with a row for every file
(as night 1 would commit it), and, for the second case, nine more nights are committed, each
replacing a slice of the rows (collection.commit_night: new fragments, old rows removed), as
nights with changed files do. A real night through the launcher (--collection) then finds every
file unchanged, so it skips everything and the cost is the state it reads: the collection's small
columns at one version, one fragment per worker, however many nights committed before.

    python -m benchmarks.bench_nights [--collection 20000] [--nights 10]

Prints, for each case: the versions and fragments of the collection, the rows the night read,
what it skipped, and the wall time.
"""

import argparse
import datetime
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

import collection
from collection.table import schema
from pipeline.launcher import run
from transforms.listing import stat_object

TINY = '--model=builtin:pnasnet_tiny'
SLICE = 0.01  # of the rows each later night replaces


def _files(folder: str, count: int):
  os.makedirs(folder)
  for number in range(count):
    with open(os.path.join(folder, f'img{number:07d}.jpg'), 'wb') as f:
      f.write(b'not decoded: every night skips it' + str(number).encode())
  return [stat_object(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


def _rows(refs, summary: dict, run_dir: str) -> pa.Table:
  size = summary['embedding_size']
  table_schema = schema(summary['model'], size, summary['embedding_dtype'])
  vectors = np.random.default_rng(0).standard_normal((len(refs), size), dtype=np.float32)
  columns = {
      'uri': [r.uri for r in refs], 'size_bytes': [r.size_bytes for r in refs],
      'last_modified': [datetime.datetime.fromtimestamp(r.last_modified / 1e6,
                                                        datetime.timezone.utc) for r in refs],
      'model': [summary['model']] * len(refs), 'recipe': [summary['recipe']] * len(refs),
      'run': [run_dir] * len(refs),
      'embedding': pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), size)}
  return pa.table({name: columns.get(name, pa.nulls(len(refs), table_schema.field(name).type))
                   for name in table_schema.names}, schema=table_schema)


def _commit(uri: str, rows: pa.Table, run_dir: str, removed=()) -> int:
  read = collection.open_collection(uri).version
  fragments = collection.write_fragment(uri, rows, {})
  return collection.commit_night(uri, collection.NightChanges(run_dir, read, fragments,
                                                              list(removed)))


def _write_collection(uri: str, refs, summary: dict, nights: int) -> None:
  created = collection.create(uri, summary['model'], summary['embedding_size'],
                              summary['embedding_dtype'])
  _commit(created.uri, _rows(refs, summary, 'night-01'), 'night-01')
  step = max(1, int(len(refs) * SLICE))
  for night in range(2, nights + 1):
    chosen = refs[(night - 2) * step:(night - 1) * step]
    held = collection.open_collection(uri).lookup([r.uri for r in chosen], ['uri'])
    fragments = {}
    for fragment_id in collection.open_collection(uri).fragment_ids():
      for batch in collection.open_collection(uri).fragment_batches(fragment_id, ['uri']):
        fragments.update((row_id, fragment_id) for row_id in batch.column('_rowid').to_pylist())
    removed = [(fragments[row_id], row_id) for row_id in held.column('_rowid').to_pylist()]
    _commit(uri, _rows(chosen, summary, f'night-{night:02d}'), f'night-{night:02d}', removed)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', type=int, default=20_000)
  parser.add_argument('--nights', type=int, default=10)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench-nights-')
  try:
    photos = os.path.join(work, 'photos')
    refs = _files(photos, args.collection)
    sample = os.path.join(work, 'sample')
    os.makedirs(sample)
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'sample_images', 'camera.png'), sample)
    template = run([f'--input={sample}', TINY, f'--output={work}/sample_run'])
    for nights in (1, args.nights):
      uri = os.path.join(work, f'collection_after_{nights}')
      _write_collection(uri, refs, template, nights)
      found = collection.open_collection(uri)
      started = time.monotonic()
      summary = run([f'--input={photos}', TINY, f'--output={work}/night_after_{nights}',
                     f'--collection={uri}'])
      seconds = time.monotonic() - started
      print(f'after {nights} night(s): version {found.version}, {len(found.fragment_ids())} '
            f'fragments, {found.num_rows} rows; skipped {summary["skipped"]} of '
            f'{summary["matched"]}, committed {summary["collection_version"]}; wall time '
            f'{seconds:.1f} s', flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
