"""Which run holds each URI's vector, decided inside Beam: the collection's rule
(embeddings/collection.py `SourceRule`) over the runs' indexes, grouped by URI, so that no one
process holds the collection's URIs. Shared by the compaction (jobs/compact.py), the export
(jobs/export.py), the duplicates by clustering (jobs/cluster_dedup.py) and the neighbour index
(jobs/index_build.py).

    index files ─ ReadIndexRows ─ (uri, row) ─┬ GroupByKey ─ Decide (side input: the folders each
    (beside: (uri, value), e.g. a target's rows) ┘  run could not list) ─ kept: ((source run,
       uri), newest row); decode: (uri, newest row); beside: (uri, (source run, [values]))

    (run, uri) ─ LocateInShards: the `uri` column of the shards of those runs only (Parquet reads
       that column alone) ─ CoGroupByKey ─ ((run, shard number), uri), or with `every_row`
       ((run, shard number), row) for each row holding the URI (the neighbour index's rows)

Only URIs, small index rows and shard numbers are shuffled, never a vector. What the rule could
not place is counted, and `warn_of_gaps` says it after the job, as `embeddings.load` does.
"""

import logging
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from embeddings.collection import GONE, UNDECIDED, SourceRule, warn_of_missing
from embeddings.shards import is_parquet, read_shard
from jobs import work_folder
from run_format import DECODE, READ, SKIPPED
from storage.run_dirs import Run

_LOG = logging.getLogger(__name__)
METRICS_NAMESPACE = 'collection'
_BATCH_ROWS = 65_536
_INDEX_COLUMNS = ('uri', 'outcome', 'done_outcome', 'vector_run', 'size_bytes', 'last_modified',
                  'content_id', 'recipe', 'sha256', 'model')


class IndexRow(NamedTuple):
  """One run's index row for a URI, as the rule and the consolidated index need it."""
  number: int  # the run's place, newest first
  outcome: str
  done_outcome: Optional[str]
  vector_run: Optional[str]
  version: tuple  # (size_bytes, last_modified in microseconds, content_id, recipe)
  model: Optional[str]


def index_files(runs: Sequence[Run]) -> List[Tuple[int, str]]:
  return [(number, info.path) for number, run in enumerate(runs)
          for info in storage.match(run.index_glob)]


class _ReadIndexRows(beam.DoFn):
  """(run number, index file) -> (uri, IndexRow)."""

  def process(self, numbered: Tuple[int, str]):
    number, path = numbered
    with storage.open_file(path) as f:
      parquet = pq.ParquetFile(f)
      present = [c for c in _INDEX_COLUMNS if c in parquet.schema_arrow.names]
      for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=present):
        columns = {name: (batch.column(name).cast(pa.int64()) if name == 'last_modified' else
                          batch.column(name)).to_pylist() if name in present else
                   [None] * batch.num_rows for name in _INDEX_COLUMNS}
        for row in range(batch.num_rows):
          value = {name: columns[name][row] for name in _INDEX_COLUMNS}
          yield value['uri'], IndexRow(
              number, value['outcome'], value['done_outcome'], value['vector_run'],
              (value['size_bytes'], value['last_modified'], value['content_id'],
               value['recipe']), value['model'])


class Beside(NamedTuple):
  """A value grouped with a URI's index rows (CollectionSources' `beside`)."""
  value: object


class _Decide(beam.DoFn):
  """(uri, its rows in every run) -> ((source run, uri), the newest row) for a vector, or the
  decode row (tag 'decode') for a file done as undecodable; with values beside the rows, (uri,
  (source run or None, [values])) (tag 'beside') for a URI with a source or a value."""

  def __init__(self, runs: Sequence[Run], beside: bool):
    self._runs = list(runs)
    self._beside = beside

  def setup(self):
    self._vectors = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vectors')
    self._missing = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vectors_missing')

  def process(self, grouped, unlisted_rows: Iterable[Tuple[int, str]]):
    uri, values = grouped
    if not hasattr(self, '_rule'):
      unlisted: List[Set[str]] = [set() for _ in self._runs]
      for number, folder in unlisted_rows:
        unlisted[number].add(folder)
      self._rule = SourceRule(self._runs, unlisted=unlisted)
    rows, beside = [], []
    for value in values:
      (beside if isinstance(value, Beside) else rows).append(value)
    source = None
    if rows:
      source = yield from self._decided(uri, sorted(rows, key=lambda row: row.number))
    if self._beside and (source is not None or beside):
      yield beam.pvalue.TaggedOutput('beside', (uri, (source, [b.value for b in beside])))

  def _decided(self, uri: str, rows: List[IndexRow]):
    """Yields the kept or decode output; returns the source run's directory, or None."""
    waiting: Dict[str, tuple] = {}
    for row in rows:
      source = self._rule.decide(uri, row.number, row.outcome, row.done_outcome, row.vector_run,
                                 lambda: row.version, waiting)
      if source is UNDECIDED:
        continue
      if source is GONE:
        return None
      if source is not None:
        self._vectors.inc()
        yield (self._runs[source].path, uri), rows[0]
        return self._runs[source].path
      if DECODE in (row.outcome, row.done_outcome if row.outcome == SKIPPED else None):
        yield beam.pvalue.TaggedOutput('decode', (uri, rows[0]))
      return None
    if waiting:
      self._missing.inc()
    return None


class CollectionSources(beam.PTransform):
  """Runs of one model, newest first -> outputs `kept`: ((source run directory, uri), the URI's
  newest IndexRow) for each URI with a vector, and `decode`: (uri, IndexRow) for each file done
  as undecodable. `beside`: (uri, value) pairs grouped with the index rows in the same shuffle
  (an export target's rows); then output `beside` gives (uri, (source run directory or None,
  [values])) for each URI with a vector or a value."""

  def __init__(self, runs: Sequence[Run], beside=None):
    super().__init__()
    self._runs = list(runs)
    self._beside = beside

  def expand(self, pbegin):
    rows = (pbegin
            | 'IndexFiles' >> beam.Create(index_files(self._runs), reshuffle=False)
            | 'SpreadIndexFiles' >> beam.Reshuffle()
            | 'ReadIndexRows' >> beam.ParDo(_ReadIndexRows()))
    unlisted = (rows
                | 'ReadFailures' >> beam.Filter(lambda kv: kv[1].outcome == READ)
                | 'FailedFolders' >> beam.Map(lambda kv: (kv[1].number, kv[0])))
    grouped = rows
    if self._beside is not None:
      grouped = ((rows, self._beside | 'Beside' >> beam.MapTuple(
          lambda uri, value: (uri, Beside(value)))) | 'WithBeside' >> beam.Flatten())
    return (grouped
            | 'ByUri' >> beam.GroupByKey()
            | 'Decide' >> beam.ParDo(_Decide(self._runs, self._beside is not None),
                                     beam.pvalue.AsList(unlisted))
            .with_outputs('decode', 'beside', main='kept'))


class _ShardUris(beam.DoFn):
  """(run, shard number, path) -> ((run, uri), shard number), or (shard number, row) with
  `rows`, for each row of the shard: the uri column alone of a Parquet shard; a TFRecord shard is
  read whole."""

  def __init__(self, rows: bool):
    self._rows = rows

  def process(self, shard: Tuple[str, int, str]):
    run, number, path = shard
    if is_parquet(path):
      with storage.open_file(path) as f:
        uris = (uri for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS,
                                                                  columns=['uri'])
                for uri in batch.column('uri').to_pylist())
        yield from self._keyed(run, number, uris)
    else:
      yield from self._keyed(run, number, read_shard(path, run).uris)

  def _keyed(self, run: str, number: int, uris: Iterable[str]):
    for row, uri in enumerate(uris):
      yield (run, uri), ((number, row) if self._rows else number)


def _located(keyed, every_row: bool):
  """((run, uri), {'wanted': [...], 'shards': [places]}) -> ((run, shard number), uri), the
  first shard's; with `every_row`, ((run, shard number), row) for every place."""
  (run, uri), parts = keyed
  if not parts['wanted']:
    return
  places = list(parts['shards'])
  if not places:
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vectors_not_in_shards').inc()
    return
  if not every_row:
    yield (run, places[0]), uri
    return
  for number, row in places:
    yield (run, number), row


class LocateInShards(beam.PTransform):
  """(run directory, uri) keys -> ((run directory, shard number in `shard_paths[run]`), uri),
  reading the uri column of the shards of the runs that appear only; with `every_row`,
  ((run directory, shard number), row) for each row of the run's shards holding the URI. A key
  whose URI is in no shard of its run is counted (vectors_not_in_shards) and dropped."""

  def __init__(self, shard_paths: Dict[str, List[str]], every_row: bool = False):
    super().__init__()
    self._shard_paths = shard_paths
    self._every_row = every_row

  def expand(self, keys):
    shard_paths = self._shard_paths
    shards = (keys
              | 'Runs' >> beam.Map(lambda key: key[0])
              | 'EachRunOnce' >> beam.Distinct()
              | 'Shards' >> beam.FlatMap(lambda run: [(run, number, path) for number, path in
                                                      enumerate(shard_paths[run])])
              | 'SpreadShards' >> beam.Reshuffle()
              | 'ShardUris' >> beam.ParDo(_ShardUris(self._every_row)))
    wanted = keys | 'Wanted' >> beam.Map(lambda key: (key, None))
    return ({'wanted': wanted, 'shards': shards}
            | 'JoinShards' >> beam.CoGroupByKey()
            | 'Located' >> beam.FlatMap(_located, self._every_row))


def warn_of_gaps(result) -> None:
  """Logs the files the job's rule kept without a vector to give them, as `embeddings.load`
  does: skipped files whose embedding run was not given, and files absent from the shards of
  the run that holds their vector."""
  warn_of_missing(work_folder.counter(result, 'vectors_missing', METRICS_NAMESPACE))
  absent = work_folder.counter(result, 'vectors_not_in_shards', METRICS_NAMESPACE)
  if absent:
    _LOG.warning('%d file(s) are in the index of the run that holds their vector but in none of '
                 'its shards (a shard deleted or rewritten?): left out', absent)
