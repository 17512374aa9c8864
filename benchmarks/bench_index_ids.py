"""The index's ids table at scale: opening it and looking up a query's 10 result rows, the old way
(ids.parquet read whole into memory) against the index's (ids.arrow memory-mapped, its footer
read; the memory-mapped FAISS ids binary-searched), from an index's ids table repeated with new
ids; and finding a URI's row (`--query` by URI, the browse page's catalogue), the old way (the
whole uri column as Python strings) against NeighbourIndex.find_row (a scan of the
memory-mapped batches compared by Arrow). Each way runs in a process of its own, for its peak RSS.

    python -m benchmarks.bench_index_ids write --index /work/bench-data/index-100k-1GB \
        --copies 10 --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids old --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids new --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids find_old --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids find_new --scratch /work/bench-data/ids-1m
"""

import argparse
import os
import resource
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embeddings import neighbour_index

LOOKUPS = 100
FINDS = 3


def _write(index: str, copies: int, scratch: str) -> None:
  table = neighbour_index.open_ids(index).read_all()
  column = table.schema.get_field_index('id')
  whole = pa.concat_tables([table.set_column(column, 'id', pa.array(
      table.column('id').to_numpy() + (copy << 40))) for copy in range(copies)]).combine_chunks()
  os.makedirs(scratch, exist_ok=True)
  pq.write_table(whole, os.path.join(scratch, 'ids.parquet'))
  with pa.ipc.new_file(os.path.join(scratch, neighbour_index.IDS_FILE), whole.schema) as writer:
    writer.write_table(whole, max_chunksize=neighbour_index.IDS_BATCH_ROWS)
  whole.column('id').to_numpy().astype(np.int64).tofile(
      os.path.join(scratch, neighbour_index.FAISS_IDS_FILE))
  print(f'{whole.num_rows} rows: ' + ', '.join(
      f'{name} {os.path.getsize(os.path.join(scratch, name)) / whole.num_rows:.0f} bytes a row'
      for name in sorted(os.listdir(scratch))))


def _measure(way: str, scratch: str) -> None:
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  started = time.perf_counter()
  if way == 'old':
    table = pq.read_table(os.path.join(scratch, 'ids.parquet')).combine_chunks()
    ids = table.column('id').to_numpy()
    look = lambda positions: table.take(positions).to_pylist()  # pylint: disable=unnecessary-lambda-assignment
  else:
    reader = neighbour_index.open_ids(scratch)
    ids = neighbour_index.open_int64(os.path.join(scratch, neighbour_index.FAISS_IDS_FILE))
    holder = type('Opened', (), {'_ids_file': reader})()  # NeighbourIndex.table_rows's own code
    look = lambda positions: neighbour_index.NeighbourIndex.table_rows(  # pylint: disable=unnecessary-lambda-assignment
        holder, positions).to_pylist()
  opened = time.perf_counter() - started
  wanted = np.asarray(ids[np.sort(np.random.default_rng(0).choice(len(ids), 10, replace=False))])
  look(np.searchsorted(ids, wanted))  # imports on first use (timestamps) not counted
  started = time.perf_counter()
  for _ in range(LOOKUPS):
    look(np.searchsorted(ids, wanted))
  print(f'{way}: open {opened * 1e3:.0f} ms, 10 rows looked up '
        f'{(time.perf_counter() - started) / LOOKUPS * 1e3:.2f} ms, peak RSS growth '
        f'{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e3:.0f} MB')


def _find(way: str, scratch: str) -> None:
  """The last row's URI (a whole scan) and a URI not in the table, each looked up FINDS times."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  reader = neighbour_index.open_ids(scratch)
  last = reader.get_batch(reader.num_record_batches - 1)
  wanted = [last.column('uri')[last.num_rows - 1].as_py(), 'gs://nowhere/not-an-image.jpg']
  if way == 'find_old':
    def find(uri):
      uris = reader.read_all().column('uri').to_pylist()
      hits = np.flatnonzero(np.array(uris, dtype=object) == uri)
      return int(hits[0]) if len(hits) else None
  else:
    holder = type('Opened', (), {'_ids_file': reader})()  # NeighbourIndex.find_row's own code
    find = lambda uri: neighbour_index.NeighbourIndex.find_row(holder, 'uri', uri)  # pylint: disable=unnecessary-lambda-assignment
  for uri, name in zip(wanted, ('the last row', 'a missing URI')):
    started = time.perf_counter()
    for _ in range(FINDS):
      find(uri)
    print(f'{way}: {name} found in {(time.perf_counter() - started) / FINDS * 1e3:.0f} ms')
  print(f'{way}: {neighbour_index.ids_rows(reader)} rows, peak RSS growth '
        f'{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e3:.0f} MB')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('way', choices=('write', 'old', 'new', 'find_old', 'find_new'))
  parser.add_argument('--scratch', required=True, help='where the repeated tables are written')
  parser.add_argument('--index', help='write: the index whose ids table is repeated')
  parser.add_argument('--copies', type=int, default=10)
  args = parser.parse_args(argv)
  if args.way == 'write':
    if not args.index:
      parser.error('write needs --index')
    _write(args.index, args.copies, args.scratch)
  elif args.way.startswith('find'):
    _find(args.way, args.scratch)
  else:
    _measure(args.way, args.scratch)


if __name__ == '__main__':
  main()
