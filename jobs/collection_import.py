"""The Beam job behind `pnasnet-embeddings collection import`: a collection built once from
finished run directories made before collections, in one commit (kind `import`).

Per URI, the row of the newest finished run that embedded it, unless a newer finished run's
index says the URI failed there (a read, decode or inference failure, or a skip of a version
that failed to decode): then the URI has no row, as a night would leave it. Files deleted since
the runs are not noticed here (an index says what a run found, not what is gone): the first
night with --collection removes them.

    index files ─ (uri, run, outcome) ──┐
                                        ├─ GroupByKey(uri) ─ Decide ─ ((run, shard), row) ─┐
    shards' uri column ─ (uri, where) ──┘                                                    │
                              GroupByKey(shard) ─ WriteFragment (reads the shard, writes its
                              kept rows as a fragment) ─ fragments ─ one commit, at the end

No process holds the collection's URIs or vectors: the decision is grouped by URI on workers,
each shard is read and written by one worker, and the launcher commits the fragments' metadata.
"""

import datetime
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

import storage
import collection
from collection.table import BYTE_LENGTH, BYTE_OFFSET, CONTENT_ID, EMBEDDED_AT, check_model, schema
from embeddings.shards import read_shard
from jobs import work_folder
from pipeline.runners import default_runner
from run_format import COLUMNS, DECODE, EMBEDDED, EMBEDDING, RUN_COLUMN, SKIPPED, STAGES
from run_format.columns import TIMESTAMP
from storage.run_dirs import MixedModelsError, Run, find_runs, select_model

_INDEX_COLUMNS = ('uri', 'outcome', 'done_outcome', 'content_id')
_BATCH_ROWS = 65_536
_NAMESPACE = 'collection_import'


class ImportRun(NamedTuple):
  """A run as the job's elements name it: its place (0 the newest) and what its rows carry."""
  number: int
  path: str
  embedded_at: datetime.datetime


class IndexRow(NamedTuple):
  run: int
  outcome: str
  done_outcome: Optional[str]
  content_id: Optional[str]


class Place(NamedTuple):
  """Where a URI's vector is in a run: shard `shard` of run `run`, row `row`."""
  run: int
  shard: int
  row: int


class Imported(NamedTuple):
  version: int
  rows: int
  runs: int
  failed_in_newer: int  # URIs a newer run failed to read or decode: no row
  not_in_shards: int  # URIs an index says were embedded, in no shard of that run


def _count(name: str, value: int = 1) -> None:
  Metrics.counter(_NAMESPACE, name).inc(value)


def read_index(element: Tuple[int, str]) -> Iterator[Tuple[str, IndexRow]]:
  """(run number, index file) -> (uri, IndexRow) for each row, reading four small columns."""
  number, path = element
  with storage.open_file(path) as f:
    parquet = pq.ParquetFile(f)
    present = [c for c in _INDEX_COLUMNS if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=present, use_threads=False):
      columns = {name: (batch.column(name).to_pylist() if name in present
                        else [None] * batch.num_rows) for name in _INDEX_COLUMNS}
      for uri, outcome, done, content_id in zip(*(columns[name] for name in _INDEX_COLUMNS)):
        yield uri, IndexRow(number, outcome, done, content_id)


def locate(element: Tuple[int, int, str, str]) -> Iterator[Tuple[str, Place]]:
  """(run number, shard number, shard path, run path) -> (uri, Place) for each row."""
  number, shard, path, run_path = element
  for row, uri in enumerate(read_shard(path, run_path, ['uri']).uris):
    yield uri, Place(number, shard, row)


def _failed(row: IndexRow) -> bool:
  return row.outcome in STAGES or (row.outcome == SKIPPED and row.done_outcome == DECODE)


def decide(keyed: Tuple[str, Iterable]) -> Iterator[Tuple[Tuple[int, int], tuple]]:
  """A URI's index rows and places -> ((run, shard), (row, content id)) of its vector, if it
  keeps one: the newest run that embedded it, unless a newer one failed it."""
  _, values = keyed
  rows = [v for v in values if isinstance(v, IndexRow)]
  places = {v.run: v for v in values if isinstance(v, Place)}
  embedded = min((r for r in rows if r.outcome == EMBEDDED), key=lambda r: r.run, default=None)
  if embedded is None:
    return
  if any(_failed(r) for r in rows if r.run < embedded.run):
    _count('failed_in_newer')
    return
  place = places.get(embedded.run)
  if place is None:
    _count('not_in_shards')
    return
  yield (place.run, place.shard), (place.row, embedded.content_id)


class WriteFragment(beam.DoFn):
  """((run, shard), [(row, content id)]) -> the fragments (JSON) of those rows of the shard, in
  the collection's schema; the shard is read here, on the worker."""

  def __init__(self, uri: str, options: Dict[str, str], runs: Sequence[ImportRun],
               shards: Dict[Tuple[int, int], str], table_schema: pa.Schema):
    self._uri = uri
    self._options = options
    self._runs = list(runs)
    self._shards = shards
    self._schema = table_schema

  def process(self, element):
    (number, shard_number), kept = element
    run = self._runs[number]
    shard = read_shard(self._shards[(number, shard_number)], run.path)
    kept = sorted(kept)
    rows = np.array([row for row, _ in kept], np.int64)
    table = rows_table(shard.metadata.take(pa.array(rows)), shard.vectors[rows],
                       [content_id for _, content_id in kept], run, self._schema)
    yield from collection.write_fragment(self._uri, table, self._options)


def rows_table(metadata: pa.Table, vectors: np.ndarray, content_ids: List[Optional[str]],
               run: ImportRun, table_schema: pa.Schema) -> pa.Table:
  """A run's rows (run_format.METADATA_SCHEMA and float32 vectors) in the collection's schema."""
  count = metadata.num_rows
  embedding_type = table_schema.field(EMBEDDING).type
  columns = {column.name: metadata.column(column.name) for column in COLUMNS}
  columns.update({
      CONTENT_ID: pa.array(content_ids, pa.string()),
      BYTE_OFFSET: pa.nulls(count, pa.int64()), BYTE_LENGTH: pa.nulls(count, pa.int64()),
      RUN_COLUMN: pa.array([run.path] * count, pa.string()),
      EMBEDDED_AT: pa.array([run.embedded_at] * count, TIMESTAMP),
      EMBEDDING: pa.FixedSizeListArray.from_arrays(
          pa.array(vectors.astype(embedding_type.value_type.to_pandas_dtype()).ravel()),
          type=embedding_type)})
  return pa.table([columns[name].cast(table_schema.field(name).type) if name != EMBEDDING
                   else columns[name] for name in table_schema.names], schema=table_schema)


def check_runs(runs: Sequence[Run]) -> str:
  """The runs' one stored vector type; runs of several are refused (their vectors would not
  share one column)."""
  dtypes = sorted({run.summary.embedding_dtype for run in runs})
  if len(dtypes) > 1:
    raise MixedModelsError(f'the runs store vectors as {" and ".join(dtypes)}: a collection '
                           'holds one type; import the runs of one --embedding_dtype')
  return dtypes[0]


def target(uri: str, runs: Sequence[Run], dtype: str) -> collection.Collection:
  """The collection to import into: created, or an empty one of the runs' model; a collection
  that already holds rows is refused (nights keep it up to date, not imports)."""
  try:
    existing = collection.open_collection(uri)
  except collection.CollectionNotFoundError:
    return collection.create(uri, runs[0].model, runs[0].embedding_size, dtype)
  check_model(existing, runs[0].model, runs[0].embedding_size, dtype)
  if existing.num_rows:
    raise collection.CollectionError(
        f'{uri} already holds {existing.num_rows} rows (version {existing.version}): import '
        'builds a new collection once; nights with --collection keep it up to date')
  return existing


def run_import(uri: str, patterns: Sequence[str], model: Optional[str] = None,
               beam_flags: Sequence[str] = ()) -> Imported:
  """Builds the collection at `uri` from the finished runs under `patterns` (newest first by
  finished_at); one commit of kind `import`, naming the newest run."""
  work_folder.check_options(beam_flags, 'the list of fragments written')
  runs = select_model(find_runs(list(patterns)), model)
  snapshot = target(uri, runs, check_runs(runs))
  imports = [ImportRun(number, run.path, run.finished_at) for number, run in enumerate(runs)]
  index_files = [(number, info.path) for number, run in enumerate(runs)
                 for info in storage.match(run.index_glob)]
  shards = {(number, shard): path for number, run in enumerate(runs)
            for shard, path in enumerate(run.shard_paths())}
  options = PipelineOptions(list(beam_flags))
  directory, local = work_folder.work_directory(options, 'collection-import')
  try:
    pipeline = beam.Pipeline(runner=default_runner(options), options=options)
    indexed = (pipeline | 'IndexFiles' >> beam.Create(index_files)
               | 'SpreadIndexes' >> beam.Reshuffle()
               | 'ReadIndexes' >> beam.FlatMap(read_index))
    placed = (pipeline | 'Shards' >> beam.Create(
        [(number, shard, path, runs[number].path) for (number, shard), path in shards.items()])
              | 'SpreadShards' >> beam.Reshuffle()
              | 'Locate' >> beam.FlatMap(locate))
    _ = ((indexed, placed) | 'Both' >> beam.Flatten()
         | 'ByUri' >> beam.GroupByKey()
         | 'Decide' >> beam.FlatMap(decide)
         | 'ByShard' >> beam.GroupByKey()
         | 'WriteFragments' >> beam.ParDo(WriteFragment(
             uri, snapshot.storage_options, imports, shards,
             schema(snapshot.model, snapshot.feature_size, snapshot.embedding_dtype)))
         | 'Fragments' >> beam.io.WriteToText(storage.join(directory, 'fragments'),
                                              file_name_suffix='.jsonl'))
    result = pipeline.run()
    result.wait_until_finish()
    fragments = [line for info in storage.match(storage.join(directory, 'fragments*.jsonl'))
                 for line in storage.read_bytes(info.path).decode().splitlines() if line]
    counted = {name: work_folder.counter(result, name, _NAMESPACE)
               for name in ('failed_in_newer', 'not_in_shards')}
  finally:
    work_folder.remove(directory, local)
  version = collection.commit_night(
      uri, collection.NightChanges(runs[0].path, snapshot.version, fragments, []), kind='import')
  return Imported(version, collection.open_collection(uri, version).num_rows, len(runs), counted['failed_in_newer'],
                  counted['not_in_shards'])
