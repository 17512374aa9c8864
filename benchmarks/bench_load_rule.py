"""What deciding a collection costs before any vector is read: seconds and peak memory of
`embeddings.collection.vector_sources` over nightly runs of one folder.

Night 1 embeds every file; each later night skips them all (as --incremental_from writes them,
with `vector_run` naming night 1, so each URI is decided at its newest row); the last night also
lost 1% of the files (deleted: decided gone from the inputs). Only the indexes and
summaries are written (the rule reads nothing else).

    python -m benchmarks.bench_load_rule [--files 200000] [--nights 10] [--scratch /tmp]
"""

import argparse
import datetime
import os
import resource
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from embeddings.collection import vector_sources
from run_format import EMBEDDED, INDEX_SCHEMA, SKIPPED, SUMMARY_FILE
from storage.run_dirs import find_runs
from tests.run_writer import RECIPE, run_summary

MODEL = 'builtin:pnasnet_large@untrained-seed0'
FOLDER = 'gs://photos/collection'


def write_nights(scratch: str, files: int, nights: int) -> None:
  modified = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
  vector_run = os.path.join(scratch, 'night001')  # where the later nights' rows name the vector
  for night in range(1, nights + 1):
    kept = files if night < nights else files - files // 100
    table = pa.Table.from_pydict({
        'uri': [f'{FOLDER}/img{n:08d}.jpg' for n in range(kept)],
        'size_bytes': pa.array([100_000 + n for n in range(kept)], pa.int64()),
        'last_modified': pa.array([modified] * kept, INDEX_SCHEMA.field('last_modified').type),
        'content_id': pa.nulls(kept, pa.string()),
        'sha256': pa.nulls(kept, pa.string()), 'model': [MODEL] * kept, 'recipe': [RECIPE] * kept,
        'outcome': [EMBEDDED if night == 1 else SKIPPED] * kept,
        'done_outcome': pa.array([None if night == 1 else EMBEDDED] * kept, pa.string()),
        'vector_run': pa.array([None if night == 1 else vector_run] * kept, pa.string()),
        'message': pa.nulls(kept, pa.string()), 'byte_offset': pa.nulls(kept, pa.int64()),
        'byte_length': pa.nulls(kept, pa.int64())}, INDEX_SCHEMA)
    directory = os.path.join(scratch, f'night{night:03d}')
    os.makedirs(directory)
    pq.write_table(table, os.path.join(directory, 'index-00000-of-00001.parquet'))
    finished = (modified + datetime.timedelta(days=night)).isoformat()
    summary = run_summary(directory, MODEL, kept if night == 1 else 0, 4320, finished,
                          inputs=[FOLDER])
    with open(os.path.join(directory, SUMMARY_FILE), 'w') as f:
      f.write(summary.to_json())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--files', type=int, default=200_000)
  parser.add_argument('--nights', type=int, default=10)
  parser.add_argument('--scratch', default=None)
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix='bench-load-rule-', dir=args.scratch)
  try:
    write_nights(scratch, args.files, args.nights)
    runs = find_runs(os.path.join(scratch, '*'))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    sources = vector_sources(runs)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    supplied = sum(len(uris) for uris in sources.values())
    print(f'{args.nights} nights x {args.files} files ({args.nights * args.files} index rows): '
          f'{supplied} URIs with a vector, all from night 1; decided in {seconds:.1f} s '
          f'({seconds / (args.nights * args.files) * 1e6:.2f} us per index row); peak RSS '
          f'{peak / 1024:.0f} MiB ({(peak - before) / 1024:.0f} MiB more than before deciding)')
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
