"""Reading vectors back: from a collection (one snapshot of it, streamed in batches, so that
memory does not grow with the collection), or from one run directory made without a collection.

Several run directories are not read together any more: which of their rows is each URI's
current vector is what a collection says (`pnasnet-embeddings collection import` builds one from
them).
"""

from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

import storage
from collection import Collection, CollectionNotFoundError, open_collection
from embeddings.shards import Shard, embedding_block, read_shard
from run_format import EMBEDDING, METADATA_COLUMNS, METADATA_SCHEMA, RUN_COLUMN, SUMMARY_FILE
from storage.run_dirs import MixedModelsError, NoRunsError, Run, find_runs

BATCH_ROWS = 8_192  # rows a batch: 140 MB of float32 at 4320-d
IMPORT_HINT = ('`pnasnet-embeddings collection import --runs DIRS... --collection URI` builds '
               'a collection from run directories')


class Embeddings(NamedTuple):
  uris: List[str]
  vectors: np.ndarray  # float32 [images, dimension]
  metadata: pa.Table  # one row per URI, in the same order (see run_format.METADATA_SCHEMA)
  model: str


def open_snapshot(collection_uri: str, version: Optional[int] = None) -> Collection:
  """The collection at `collection_uri` (its latest version, or `version`); run directories or
  a list of them are refused with what to do instead."""
  if not isinstance(collection_uri, str):
    raise NoRunsError(f'a collection is one URI, not {list(collection_uri)!r}: several runs are '
                      f'not read together any more; {IMPORT_HINT}')
  try:
    return open_collection(collection_uri, version)
  except CollectionNotFoundError as exc:
    if any(char in collection_uri for char in '*?[') or storage.exists(
        storage.join(collection_uri, SUMMARY_FILE)):
      raise CollectionNotFoundError(
          f'{collection_uri} names run directories, not a collection: embeddings.load_run reads '
          f'one run alone; {IMPORT_HINT}') from exc
    raise


def metadata_of(batch: Union[pa.RecordBatch, pa.Table]) -> pa.Table:
  """A collection's rows -> run_format.METADATA_SCHEMA (RUN_COLUMN: the run that embedded it)."""
  return pa.Table.from_arrays([batch.column(name).cast(field.type)
                               for name, field in zip(METADATA_SCHEMA.names, METADATA_SCHEMA)],
                              schema=METADATA_SCHEMA)


def vectors_by_row_id(snapshot: Collection, row_ids: Sequence[int]) -> np.ndarray:
  """float32 [rows, dimension] of the rows with these ids, in this order (random access: a
  query's stored vector, a re-rank's candidates)."""
  return embedding_block(snapshot.take(list(row_ids), [EMBEDDING]).column(EMBEDDING),
                         snapshot.uri)


def _shard(batch: pa.RecordBatch, path: str) -> Shard:
  metadata = metadata_of(batch)
  return Shard(path, metadata.column('uri').to_pylist(),
               embedding_block(batch.column(EMBEDDING), path), metadata)


def iter_shards(collection_uri: str, version: Optional[int] = None,
                batch_rows: int = BATCH_ROWS) -> Iterator[Shard]:
  """The collection's rows (one snapshot: `version`, else the latest), `batch_rows` at a time,
  as Shards: URIs, float32 vectors, metadata. Memory: one batch, whatever the collection's
  size."""
  snapshot = open_snapshot(collection_uri, version)
  path = f'{snapshot.uri}@{snapshot.version}'
  for batch in snapshot.batches(METADATA_COLUMNS + [RUN_COLUMN, EMBEDDING], batch_rows):
    yield _shard(batch, path)


def concatenate(shards: Iterable[Shard], model: str, embedding_size: int = 0) -> Embeddings:
  """`embedding_size`: the vectors' width when there is no shard (an empty collection)."""
  uris, vectors, tables = [], [], []
  for shard in shards:
    uris += shard.uris
    vectors.append(shard.vectors)
    tables.append(shard.metadata)
  if not vectors:
    return Embeddings([], np.zeros((0, embedding_size), np.float32),
                      METADATA_SCHEMA.empty_table(), model)
  return Embeddings(uris, np.concatenate(vectors), pa.concat_tables(tables), model)


def load(collection_uri: str, version: Optional[int] = None) -> Embeddings:
  """The collection (one snapshot), in memory: as iter_shards, at once."""
  snapshot = open_snapshot(collection_uri, version)
  return concatenate(iter_shards(collection_uri, snapshot.version), snapshot.model,
                     snapshot.feature_size)


def find_run(path: str) -> Run:
  """The one finished run at `path`; a glob or folder of several is refused."""
  runs = find_runs([path])
  if len(runs) > 1:
    raise MixedModelsError(f'{path} holds {len(runs)} finished runs: a run directory is read '
                           f'alone; {IMPORT_HINT}, which says which row of which run is each '
                           'URI\'s current vector')
  return runs[0]


def iter_run_shards(path: str, columns: Optional[Sequence[str]] = None) -> Iterator[Shard]:
  """One run directory's shards, every row (a run made without --collection)."""
  run = find_run(path)
  for shard_path in run.shard_paths():
    shard = read_shard(shard_path, run.path, columns)
    models = set(shard.metadata.column('model').unique().to_pylist()) - {None}
    dimension = shard.vectors.shape[1]
    if models - {run.model} or (dimension and dimension != run.embedding_size):
      raise MixedModelsError(f'{shard_path} holds {sorted(models)} {dimension}-d embeddings, '
                             f'but its run_summary.json says {run.model} '
                             f'{run.embedding_size}-d')
    if shard.uris:
      yield shard


def load_run(path: str) -> Embeddings:
  """One run directory's rows in memory (a run made without a collection)."""
  run = find_run(path)
  return concatenate(iter_run_shards(run.path), run.model, run.embedding_size)


def embedding_run(snapshot: Collection) -> Run:
  """A run directory that committed to the collection and still has its summary, newest first:
  how to embed a new image as the collection's were (model, weights, crop, dtype). Raises
  NoRunsError when every one is gone (the collection itself needs none of them)."""
  from run_format import RunSummary
  tried = []
  for entry in sorted(snapshot.dataset.versions(), key=lambda v: v['version'], reverse=True):
    record = snapshot.record(entry['version'])
    if record is None or not record.run or record.run in tried:
      continue
    tried.append(record.run)
    summary_path = storage.join(record.run, SUMMARY_FILE)
    if not storage.exists(summary_path):
      continue
    summary = RunSummary.from_json(storage.read_bytes(summary_path), summary_path)
    if summary.model == snapshot.model:
      return Run(record.run, summary)
  raise NoRunsError(f'no run directory that committed to {snapshot.uri} is left '
                    f'({", ".join(tried[:3]) or "none named"}): their run_summary.json says how '
                    'to embed a new image as the collection\'s were')
