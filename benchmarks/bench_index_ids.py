"""The index's ids table at scale: opening it and looking up a query's 10 result rows, the old way
(ids.parquet read whole into memory) against the index's (ids.arrow memory-mapped, its footer
read; the memory-mapped FAISS ids binary-searched), from an index's ids table repeated with new
ids; and finding a URI's or a SHA-256's row in an index (`--query` by URI or bytes, the browse
page's catalogue), a scan of the memory-mapped batches compared by Arrow (the way before the
lookup files) against NeighbourIndex.find_row (a binary search of the lookup file). Each way
runs in a process of its own, for its peak RSS.

    python -m benchmarks.bench_index_ids write --index /work/bench-data/index-100k-1GB \
        --copies 10 --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids old --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids new --scratch /work/bench-data/ids-1m
    python -m benchmarks.bench_index_ids find_scan --index /work/bench-data/index-1m
    python -m benchmarks.bench_index_ids find_lookup --index /work/bench-data/index-1m
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


def _scan(reader, column: str, value: str):
  """The first row whose column equals value, by a scan of the batches (the old find_row)."""
  import pyarrow.compute as pc
  for number in range(reader.num_record_batches):
    batch = reader.get_batch(number)
    found = pc.index(batch.column(column), value).as_py()
    if found >= 0:
      return batch.slice(found, 1).to_pylist()[0]
  return None


def _find(way: str, index_directory: str) -> None:
  """The last row's URI and SHA-256 (unique in a synthetic collection: a whole scan) and a URI
  not in the index, each looked up FINDS times after one untimed lookup (imports)."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  reader = neighbour_index.open_ids(index_directory)
  if way == 'find_scan':
    find = lambda column, value: _scan(reader, column, value)  # pylint: disable=unnecessary-lambda-assignment
  else:
    find = neighbour_index.NeighbourIndex(index_directory).find_row
  last = reader.get_batch(reader.num_record_batches - 1)
  wanted = [('uri', last.column('uri')[last.num_rows - 1].as_py(), 'the last row by URI'),
            ('sha256', last.column('sha256')[last.num_rows - 1].as_py(),
             'the last row by SHA-256'),
            ('uri', 'gs://nowhere/not-an-image.jpg', 'a missing URI')]
  find('uri', wanted[0][1])
  for column, value, name in wanted:
    started = time.perf_counter()
    for _ in range(FINDS):
      assert (find(column, value) is None) == (name == 'a missing URI')
    print(f'{way}: {name} found in {(time.perf_counter() - started) / FINDS * 1e3:.2f} ms')
  print(f'{way}: {neighbour_index.ids_rows(reader)} rows, peak RSS growth '
        f'{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e3:.0f} MB')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('way', choices=('write', 'old', 'new', 'find_scan', 'find_lookup'))
  parser.add_argument('--scratch', help='where the repeated tables are written (write, old, new)')
  parser.add_argument('--index', help='write: the index whose ids table is repeated; find_*: '
                      'the index to look values up in')
  parser.add_argument('--copies', type=int, default=10)
  args = parser.parse_args(argv)
  if args.way.startswith('find'):
    if not args.index:
      parser.error(f'{args.way} needs --index')
    _find(args.way, args.index)
  elif not args.scratch or (args.way == 'write' and not args.index):
    parser.error(f'{args.way} needs --scratch' + (' and --index' if args.way == 'write' else ''))
  elif args.way == 'write':
    _write(args.index, args.copies, args.scratch)
  else:
    _measure(args.way, args.scratch)


if __name__ == '__main__':
  main()
