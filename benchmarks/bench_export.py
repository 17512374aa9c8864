"""What `pnasnet-embeddings export` costs against each target's own bulk path, on the same rows in
the same run: a whole export of a synthetic collection (rows/s, and its peak memory) beside the
target's bare bulk load of those rows (no Beam, rows already in memory), their ratio, the index
built after the first load (measured apart), then the sync of a night that replaced a share of the
rows (5% by default; or syncs after several nights), and a rerun with nothing new.

    python -m benchmarks.bench_export [--count 20000 100000] [--churn 0.05] \
        [--churn_nights 1 --sync_after 1] [--targets pgvector milvus-lite qdrant-local vertex] \
        [--work DIR]
    python -m benchmarks.bench_export --collection URI ...   # a collection of your own (its
        # versions of rows: benchmarks.synthetic_collection --collection URI --churn_nights 30)

Targets: pgvector (a real PostgreSQL 16 with pgvector, pgserver, on 127.0.0.1), Milvus Lite and
Qdrant's local mode (both in the exporting process), Vertex AI's JSON lines (local files). Each
export and each bare load runs as its own process, so each peak RSS is its own (PostgreSQL's
server does not count; Milvus Lite's server process, started by the client, does not either).
The bare loads:
  pgvector      one binary COPY of the rows into a table of the export's columns (no index),
                encoded as the export encodes them
  milvus-lite   MilvusClient.insert of column batches (numpy vectors), then flush
  qdrant-local  QdrantClient.upload_collection of the numpy vectors, indexing off
  vertex        the JSON lines written with orjson into one file
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

import numpy as np

BATCH_ROWS = 1_000
TARGETS = ('pgvector', 'milvus-lite', 'qdrant-local', 'vertex')


class ChildFailed(RuntimeError):
  pass


def _child(argv: List[str]) -> dict:
  """A child process: its wall seconds, its own peak RSS and its stdout's last line as JSON."""
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    child = subprocess.Popen([sys.executable, '-m'] + argv, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone
    seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    if os.waitstatus_to_exitcode(status):
      raise ChildFailed(f'{" ".join(argv[:3])} failed: {err.read()[-1500:]}')
    result = json.loads(out.read().strip().splitlines()[-1])
  return dict(result, wall_seconds=seconds, peak_rss_gb=usage.ru_maxrss / 1e6)  # KB


def _export(uri: str, version: int, to: str) -> dict:
  return _child(['commands', 'export', '--collection', uri, '--version', str(version),
                 '--to', to, '--json'])


def _rows(uri: str, version: int) -> dict:
  """Every row of the version, in memory: what a bare load sends."""
  import collection
  from jobs.collection_reads import row_ids, vectors
  snapshot = collection.open_collection(uri, version)
  columns = ('uri', 'sha256', 'height', 'width', 'model', 'run')
  rows = {name: [] for name in columns + ('id',)}
  vector_parts = []
  for batch in snapshot.batches(list(columns) + ['embedding'], with_row_id=True,
                                batch_rows=BATCH_ROWS):
    for name in columns:
      rows[name] += batch.column(name).to_pylist()
    rows['id'].append(row_ids(batch))
    vector_parts.append(vectors(batch))
  rows['id'] = np.concatenate(rows['id'])
  rows['vector'] = np.concatenate(vector_parts)
  return rows


def _bare_pgvector(rows: dict, to: str) -> float:
  import psycopg
  from jobs.export_pgvector import (COPY_HEADER, COPY_TRAILER, REDUCED_DIMENSION, Reduction,
                                    copy_rows)
  conninfo, table = to.split('?table=')
  reduction = Reduction.train(rows['vector'][:1024], rows['vector'].shape[1])
  with psycopg.connect(conninfo, autocommit=True) as connection:
    connection.execute('CREATE EXTENSION IF NOT EXISTS vector')
    connection.execute(f'DROP TABLE IF EXISTS {table}')
    connection.execute(
        f'CREATE TABLE {table} (id bigint PRIMARY KEY, uri text NOT NULL, sha256 text, '
        f'height bigint, width bigint, model text, run text, embedding vector('
        f'{rows["vector"].shape[1]}) NOT NULL, embedding_reduced vector({REDUCED_DIMENSION}) '
        f'NOT NULL)')
    start = time.perf_counter()
    with connection.transaction(), connection.cursor() as cursor:
      with cursor.copy(f'COPY {table} FROM STDIN (FORMAT BINARY)') as copy:
        copy.write(COPY_HEADER)
        for first in range(0, len(rows['id']), BATCH_ROWS):
          part = {name: values[first:first + BATCH_ROWS] for name, values in rows.items()}
          for chunk in copy_rows(part, reduction):
            copy.write(chunk)
        copy.write(COPY_TRAILER)
    seconds = time.perf_counter() - start
    connection.execute(f'DROP TABLE {table}')
  return seconds


def _bare_milvus(rows: dict, to: str) -> float:
  from pymilvus import DataType, MilvusClient
  path, name = to[len('milvus-lite:'):].split('?collection=')
  client = MilvusClient(uri=path)
  schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
  schema.add_field('id', DataType.INT64, is_primary=True)
  for field in ('uri', 'sha256', 'model', 'run'):
    schema.add_field(field, DataType.VARCHAR, max_length=8192, nullable=True)
  for field in ('height', 'width'):
    schema.add_field(field, DataType.INT64, nullable=True)
  schema.add_field('embedding', DataType.FLOAT_VECTOR, dim=rows['vector'].shape[1])
  index = client.prepare_index_params()
  index.add_index('embedding', index_type='AUTOINDEX', metric_type='COSINE')
  client.create_collection(name, schema=schema, index_params=index)
  start = time.perf_counter()
  for first in range(0, len(rows['id']), BATCH_ROWS):
    client.insert(name, [{'id': int(rows['id'][n]), 'embedding': rows['vector'][n],
                          **{field: rows[field][n] for field in (
                              'uri', 'sha256', 'height', 'width', 'model', 'run')}}
                         for n in range(first, min(first + BATCH_ROWS, len(rows['id'])))])
  client.flush(name)
  seconds = time.perf_counter() - start
  client.close()  # the file is the bare load's own (Milvus Lite 3.2.2 failed to drop 100,000 rows)
  return seconds


def _bare_qdrant(rows: dict, to: str) -> float:
  from qdrant_client import QdrantClient, models
  path, name = to[len('qdrant-local:'):].split('?collection=')
  client = QdrantClient(path=path)
  client.create_collection(name, vectors_config={'dense': models.VectorParams(
      size=rows['vector'].shape[1], distance=models.Distance.COSINE)},
                           hnsw_config=models.HnswConfigDiff(m=0))
  payload = [{field: rows[field][n] for field in ('uri', 'sha256', 'height', 'width', 'model',
                                                  'run')} for n in range(len(rows['id']))]
  start = time.perf_counter()
  client.upload_collection(name, vectors={'dense': rows['vector']}, payload=payload,
                           ids=rows['id'].tolist(), batch_size=256)
  seconds = time.perf_counter() - start
  client.close()
  return seconds


def _bare_vertex(rows: dict, to: str) -> float:
  import orjson
  folder = to[len('vertex:'):]
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'bare.json')
  start = time.perf_counter()
  with open(path, 'wb') as f:
    for n, row_id in enumerate(rows['id']):
      f.write(orjson.dumps({
          'id': str(row_id), 'embedding': rows['vector'][n],
          'restricts': [{'namespace': 'model', 'allow': [rows['model'][n]]},
                        {'namespace': 'run', 'allow': [rows['run'][n]]}],
          'embedding_metadata': {name: rows[name][n]
                                 for name in ('uri', 'sha256', 'height', 'width')}},
          option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
  seconds = time.perf_counter() - start
  os.remove(path)
  return seconds


_BARE = {'pgvector': _bare_pgvector, 'milvus-lite': _bare_milvus, 'qdrant-local': _bare_qdrant,
         'vertex': _bare_vertex}


def _bare_main(target: str, uri: str, version: int, to: str) -> None:
  """In a child process: the bare load, printed as JSON."""
  rows = _rows(uri, version)
  seconds = _BARE[target](rows, to)
  print(json.dumps({'rows': len(rows['id']), 'seconds': seconds}))


def _night_versions(uri: str) -> list:
  """The versions of the collection's commits of rows (the first, then each night's)."""
  import collection
  return [entry.version for entry in collection.history(uri) if entry.kind in ('night', 'import')]


def _targets(url: str, work: str, name: str = 'photos') -> dict:
  """The --to of each target, named `name`: the export's, or the bare loads' beside them (never
  into them)."""
  return {'pgvector': f'{url}?table={name}',
          'milvus-lite': f'milvus-lite:{os.path.join(work, name + ".db")}?collection=photos',
          'qdrant-local': f'qdrant-local:{os.path.join(work, name)}?collection=photos',
          'vertex': f'vertex:{os.path.join(work, name)}'}


def _measure(uri: str, targets: List[str], work: str, sync_after: List[int]) -> None:
  from tests.export_servers import postgres_with_pgvector
  versions = _night_versions(uri)
  first = versions[0]
  os.makedirs(work, exist_ok=True)
  with postgres_with_pgvector() as url:
    for name in targets:
      to = _targets(url, work)[name]
      try:
        bare = _child(['benchmarks.bench_export', '--bare', name, '--collection', uri,
                       '--version', str(first), '--to', _targets(url, work, 'bare')[name]])
      except ChildFailed as exc:  # the export is still measured
        print(f'{name:12} the bare load failed: {exc}', flush=True)
        bare = {'rows': 1, 'seconds': float('inf'), 'peak_rss_gb': 0}
      ours = _export(uri, first, to)
      load = ours['load_seconds']
      bare_rate, our_rate = bare['rows'] / bare['seconds'], ours['written'] / load
      print(f'{name:12} {bare["rows"]:>7} rows  bare {bare_rate:7.0f} rows/s '
            f'({bare["seconds"]:.1f} s, peak {bare["peak_rss_gb"]:.2f} GB)  export '
            f'{our_rate:7.0f} rows/s ({load:.1f} s; setup {ours["setup_seconds"]:.1f} s, index '
            f'{ours["index_seconds"]:.1f} s apart; '
            f'process {ours["wall_seconds"]:.1f} s, peak {ours["peak_rss_gb"]:.2f} GB)  '
            f'ratio {our_rate / bare_rate if bare_rate else float("nan"):.2f}', flush=True)
      for nights in sync_after:
        sync = _export(uri, versions[nights], to)
        print(f'{"":12} sync after {nights} night(s): read {sync["rows_read"]}, wrote '
              f'{sync["written"]}, deleted {sync["deleted"]} in {sync["seconds"]:.1f} s '
              f'(process {sync["wall_seconds"]:.1f} s, peak {sync["peak_rss_gb"]:.2f} GB)',
              flush=True)
      again = _export(uri, versions[sync_after[-1]], to)
      print(f'{"":12} rerun with nothing new: {again["wall_seconds"]:.1f} s (process), wrote '
            f'{again["written"]}', flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', help='a collection of your own (default: synthetic ones '
                      'written here, one per --count)')
  parser.add_argument('--count', type=int, nargs='+', default=[20_000, 100_000])
  parser.add_argument('--churn_nights', type=int, default=1,
                      help='nights after the first version, each replacing --churn of the rows')
  parser.add_argument('--churn', type=float, default=0.05, help='the share a night replaces')
  parser.add_argument('--sync_after', type=int, nargs='+', default=[1],
                      help='nights after the first version to sync to, in order (a sync after '
                           '10 following one after 1 applies 9 nights of changes)')
  parser.add_argument('--targets', nargs='+', choices=TARGETS, default=list(TARGETS))
  parser.add_argument('--work', help='folder for the collections and targets (default: a '
                      'temp dir, removed after)')
  parser.add_argument('--bare', choices=TARGETS, help=argparse.SUPPRESS)
  parser.add_argument('--version', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--to', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.bare:
    return _bare_main(args.bare, args.collection, args.version, args.to)
  work = args.work or tempfile.mkdtemp(prefix='bench-export-')
  try:
    if args.collection:
      return _measure(args.collection, args.targets, work, args.sync_after)
    from benchmarks.synthetic_collection import write_synthetic_collection
    for count in args.count:
      uri = os.path.join(work, f'collection-{count}')
      start = time.perf_counter()
      write_synthetic_collection(uri, count, churn_nights=args.churn_nights, churn=args.churn)
      print(f'collection: {count} synthetic 4320-d vectors and {args.churn_nights} night(s) of '
            f'{args.churn:.0%} churn in {time.perf_counter() - start:.0f} s', flush=True)
      _measure(uri, args.targets, os.path.join(work, str(count)), args.sync_after)
      shutil.rmtree(uri)
  finally:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
