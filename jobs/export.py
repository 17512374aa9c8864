"""The Beam job behind `pnasnet-embeddings export`: a version of the collection put into a vector
database or files, and kept equal to it night after night by applying only what changed.

The target's id of a row is the collection's stable row id (`_rowid`): a changed file's new
vector is a new row (a new id) and its old row id is deleted, and compaction changes no id. So:

    first export (or a whole sync):
        fragments ─ ReadFragments (a worker a fragment) ─ the target's writer
        [a target that may hold rows: its ids ─┐
         the collection's ids ─────────────────┴ by id ─ held, not in the collection ─ delete]
    next export, from the version the target last applied (its record says which):
        one worker: the row ids deleted since ─ batches ─ DeleteRows ─┐ (done first)
        the fragments made since ─ ReadFragments (rows inserted since) ┴─ the target's writer

A sync's cost is that of the changes, whatever the history: it reads the fragments made since
the version applied, their rows inserted since (a compaction's fragments hold none), and the
ids deleted since. With no new version the export stops before any pipeline, the target untouched.
"""

import importlib
import json
import logging
import time
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from collection import Collection, CollectionError
from jobs import work_folder
from jobs.collection_reads import (DELETE_BATCH, METRICS_NAMESPACE as READ_NAMESPACE,
                                   ROWS_READ, DeletedIds, ReadFragments, Snapshot,
                                   fragments_to_read, row_ids, vectors)
from jobs.export_target import (COLUMNS, COMPLETE, IN_PROGRESS, KEYWORD_VALUE, METRICS_NAMESPACE,
                                BatchFailed, ExportState, Target, TargetError, redact)
from pipeline.runners import default_runner
from run_format import utc_now

_LOG = logging.getLogger(__name__)


class ExportFailed(RuntimeError):
  """The pipeline failed part way: the target holds part of the changes."""


def check_options(beam_flags: Sequence[str]) -> None:
  work_folder.check_options(beam_flags, 'the job\'s staged and temporary files')


def check_source(target: Target, collection: Collection, replace: bool) -> Optional[ExportState]:
  """The target's record, refused (TargetError) when the target follows something else than
  `collection` and `replace` is not given."""
  target.check(collection.model, collection.feature_size)
  previous = target.state()
  if previous is None or replace:
    return previous
  if previous.collection == collection.uri:
    if previous.version is not None and previous.version > collection.version:
      raise TargetError(f'--to {target.name} holds version {previous.version} of '
                        f'{collection.uri}, newer than version {collection.version}: give '
                        f'--replace to go back to it')
    return previous
  held = (f'collection {previous.collection}' if previous.collection else
          'an export of run directories (before the collection)')
  raise TargetError(f'--to {target.name} holds {held}, not {collection.uri}: give --replace to '
                    f'replace what it holds by this collection, or export to another target')


class ExportReport(NamedTuple):
  written: int
  deleted: int
  rows_read: int  # rows read from the collection: the changes', or every row for a whole sync
  rows: int  # the collection's rows: what the target holds once the export is complete
  seconds: float
  state: Optional[ExportState]  # None: nothing was new, the target was not touched
  whole: bool = False  # every row was read (first export, --replace, or a cleaned-up version)
  # Of `seconds`, beside the load: readying the target (a first export's table and, above 2,000
  # dimensions, its projection) and finishing it (its index, made after a first load).
  setup_seconds: float = 0.0
  index_seconds: float = 0.0

  @property
  def load_seconds(self) -> float:
    return self.seconds - self.setup_seconds - self.index_seconds

  def to_json(self) -> str:
    return json.dumps(dict(self._asdict(), load_seconds=self.load_seconds,
                           state=self.state and self.state._asdict()))


def _since(target: Target, previous: Optional[ExportState], collection: Collection,
           replace: bool) -> Optional[int]:
  """The version to apply the changes from; None for a whole sync."""
  if previous is None or replace:
    return None
  since = previous.since if previous.status == IN_PROGRESS else previous.version
  if since is None:
    return None
  try:
    fragments_to_read(collection, since)
  except CollectionError as exc:
    _LOG.warning('%s: version %d of %s, which it last applied, is no longer kept (%s): '
                 'syncing it whole, every row read again', target.name, since, collection.uri,
                 exc)
    return None
  return since


def export(collection: Collection, target: Target, beam_flags: Sequence[str],
           replace: bool = False, previous: Optional[ExportState] = None) -> ExportReport:
  """Makes `target` (checked by check_source, whose record is `previous`) hold `collection`'s
  version: the changes since the version it last applied, or every row."""
  start = time.perf_counter()
  rows = collection.num_rows
  unfinished = previous is not None and previous.status == IN_PROGRESS
  if unfinished:
    _LOG.warning('%s: the last export did not finish (%s); this one completes it', target.name,
                 previous.describe())
  if (previous is not None and not replace and not unfinished and
      previous.version == collection.version):
    return ExportReport(0, 0, 0, rows, time.perf_counter() - start, None)
  since = _since(target, previous, collection, replace)
  last_complete = (previous.last_complete if unfinished else
                   previous.describe() if previous is not None else None)
  state = ExportState(IN_PROGRESS, collection.uri, collection.version, since, rows, utc_now(),
                      None, last_complete)
  if replace and previous is not None:
    target.clear()
  setup_start = time.perf_counter()
  target.begin(collection.model, collection.feature_size, state, _sampler(collection))
  setup_seconds = time.perf_counter() - setup_start
  held_rows = previous is not None and not replace and not target.whole_sync_replaces
  # Rows inserted after a version the target completed are new to it: only an unfinished
  # export's rows, or a whole sync's into a target that held rows, can be there already.
  may_hold = unfinished or (since is None and held_rows)
  options = PipelineOptions(list(beam_flags))
  try:
    result = _apply(collection, target, since, held_rows, may_hold, options)
  except Exception as exc:  # the runner wraps a DoFn's error in its own
    last = last_complete or 'none: the target held no complete export before'
    raise ExportFailed(
        f'export to {target.name} failed part way ({_cause(exc)}): the target holds part of '
        f'the changes to version {collection.version}, and is marked "{IN_PROGRESS}"; its last '
        f'complete state: {last}. Run the same command again to finish') from exc
  finished = state._replace(status=COMPLETE, finished_at=utc_now())
  index_start = time.perf_counter()
  target.finish(finished)
  index_seconds = time.perf_counter() - index_start
  counts = [work_folder.counter(result, name, namespace) for name, namespace in (
      ('written', METRICS_NAMESPACE), ('deleted', METRICS_NAMESPACE),
      (ROWS_READ, READ_NAMESPACE))]
  return ExportReport(*counts, rows, time.perf_counter() - start, finished, since is None,
                      setup_seconds, index_seconds)


def _sampler(collection: Collection):
  """What begin() gets: the first `count` vectors of the collection, streamed."""
  def sample(count: int) -> np.ndarray:
    parts, total = [], 0
    for batch in collection.batches(['embedding'], batch_rows=min(count, 8192)):
      parts.append(vectors(batch)[:count - total])
      total += len(parts[-1])
      if total >= count:
        break
    return np.concatenate(parts) if parts else np.zeros((0, collection.feature_size), np.float32)
  return sample


def _cause(exc: BaseException) -> str:
  """The first line of the innermost error (BatchFailed's when a batch gave up)."""
  while exc.__cause__ is not None or exc.__context__ is not None:
    if isinstance(exc, BatchFailed):
      break
    exc = exc.__cause__ or exc.__context__
  text = str(exc).strip().splitlines()
  return text[0] if text else type(exc).__name__


def _stale(keyed) -> Sequence[int]:
  """(id, {'held': [...], 'present': [...]}) -> the id, if the target holds it and the collection
  does not."""
  row_id, found = keyed
  return [row_id] if found['held'] and not found['present'] else []


def _apply(collection: Collection, target: Target, since: Optional[int], held_rows: bool,
           may_hold: bool, options: PipelineOptions):
  """The pipeline: deletions (the changes', or a whole sync's stale rows) first, then the rows
  to write, read a fragment a worker. Returns its result (for the counters)."""
  snapshot = Snapshot.of(collection)
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  fragments = (pipeline
               | 'Fragments' >> beam.Create(fragments_to_read(collection, since),
                                            reshuffle=False)
               | 'Spread' >> beam.Reshuffle())
  deletions = None
  if since is not None:
    deletions = (pipeline
                 | 'Start' >> beam.Impulse()
                 | 'DeletedIds' >> beam.ParDo(DeletedIds(snapshot, since)))
  elif held_rows:
    held = pipeline | 'HeldIds' >> target.current_ids_transform()
    present = (fragments
               | 'ReadIds' >> beam.ParDo(ReadFragments(snapshot, []))
               | 'Ids' >> beam.FlatMap(lambda batch: row_ids(batch).tolist()))
    deletions = ({'held': held | 'KeyHeld' >> beam.Map(lambda i: (i, None)),
                  'present': present | 'KeyPresent' >> beam.Map(lambda i: (i, None))}
                 | 'ById' >> beam.CoGroupByKey()
                 | 'Stale' >> beam.FlatMap(_stale)
                 | 'Batches' >> beam.BatchElements(min_batch_size=DELETE_BATCH,
                                                   max_batch_size=DELETE_BATCH)
                 | 'AsArrays' >> beam.Map(lambda ids: np.array(ids, np.int64)))
  deleted = []
  if deletions is not None:
    deleted = [deletions | 'DeleteRows' >> target.delete_transform()]
  _ = (fragments
       | 'ReadRows' >> beam.ParDo(ReadFragments(snapshot, COLUMNS, since))
       | 'AfterDeletions' >> beam.Map(lambda batch, *_: batch,
                                      *[beam.pvalue.AsList(d) for d in deleted]
                                      ).with_output_types(pa.RecordBatch)
       | 'Write' >> target.write_transform(may_hold))
  result = pipeline.run()
  result.wait_until_finish()
  return result


def summary_line(target: Target, report: ExportReport) -> str:
  if report.state is None:
    return (f'{target.name}: nothing new; the target holds the collection\'s {report.rows} rows '
            f'(nothing written)')
  how = 'every row' if report.whole else f'the changes since version {report.state.since}'
  return (f'{target.name}: version {report.state.version} of {report.state.collection}: read '
          f'{report.rows_read} rows ({how}), wrote {report.written}, deleted {report.deleted}; '
          f'it holds the collection\'s {report.rows} rows ({report.seconds:.1f} s: the rows '
          f'{report.load_seconds:.1f} s, readying the target {report.setup_seconds:.1f} s, '
          f'{target.finishing} {report.index_seconds:.1f} s)')


FORMS = ('postgresql://USER@HOST:PORT/DB?table=NAME (any libpq URI, postgres:// too)',
         '"host=HOST dbname=DB table=NAME" (libpq keyword/value)',
         'milvus://HOST:PORT/COLLECTION', 'milvus+https://HOST:PORT/COLLECTION',
         'milvus-lite:FILE.db?collection=NAME', 'qdrant://HOST:PORT/COLLECTION',
         'qdrant+https://HOST:PORT/COLLECTION', 'qdrant-local:DIRECTORY?collection=NAME',
         'vertex:FOLDER (gs://, s3:// or local)')


# --to's scheme -> the module and class of its target, imported only when named (a pgvector
# export needs no pymilvus).
_TARGETS = {
    'postgresql': ('jobs.export_pgvector', 'PgvectorTarget'),
    'postgres': ('jobs.export_pgvector', 'PgvectorTarget'),
    'milvus': ('jobs.export_milvus', 'MilvusTarget'),
    'milvus+https': ('jobs.export_milvus', 'MilvusTarget'),
    'milvus-lite': ('jobs.export_milvus', 'MilvusTarget'),
    'qdrant': ('jobs.export_qdrant', 'QdrantTarget'),
    'qdrant+https': ('jobs.export_qdrant', 'QdrantTarget'),
    'qdrant-local': ('jobs.export_qdrant', 'QdrantTarget'),
    'vertex': ('jobs.export_vertex', 'VertexTarget'),
}


def open_target(text: str, batch_size: int = 0) -> Target:
  """The target `--to` names (not yet contacted), parsed by its class; TargetError if it names
  none. A --to that starts with KEYWORD= is a libpq keyword/value string (PostgreSQL)."""
  scheme, colon, _ = text.partition(':')
  found = (_TARGETS['postgresql'] if KEYWORD_VALUE.match(text) else
           _TARGETS.get(scheme.lower()) if colon else None)
  if found is None:
    raise TargetError(f'--to {redact(text)[0]}: not a target; use one of ' + ', '.join(FORMS))
  module, name = found
  return getattr(importlib.import_module(module), name).from_url(text, batch_size)
