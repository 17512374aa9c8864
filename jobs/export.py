"""The Beam job behind `pnasnet-embeddings export`: the collection `embeddings.load` returns,
put into a vector database or files, and kept equal to it night after night.

    plan pipeline:  the target's current_rows_transform: (uri, run), read in pages, beside
                    the index rows in CollectionSources (jobs/collection_sources.py), grouped
                    by URI ─ (uri, (source run, [the run the target holds it from]))
                    ─ Plan ─ unchanged, rows (counted)
                           ─ deletes: uri ──────────────────────────────┐
                           ─ writes: (run, uri) ─ LocateInShards ─ by shard ┴ PLAN/plan-*.jsonl
                           ─ (for a target that records the collection: (uri, run)) ┘
    launcher:       nothing to change and the last export finished: done, the target untouched
    apply pipeline: PLAN ─ deletes ─ batches ─ DeleteRows ────────────────┐ (done first)
                         ─ writes ─ ReadRows (each shard once, only its URIs) ─ the target's writer
    launcher:       the index (first load) and the target's state, complete

A row is current when the target holds its URI from the run that holds its vector now: a newer
run that embedded it again, or a new night, changes that run. So a rerun writes what is new or
changed, deletes what the newest state dropped (dead-lettered, deleted, superseded by nothing),
and with nothing new, writes nothing at all. No process holds the collection: the launcher reads
counts and, for pgvector's first load, a sample; a worker holds one URI's rows, or one shard's
rows and wanted URIs.
"""

import importlib
import json
import logging
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

import storage
from embeddings.shards import read_shard
from jobs import work_folder
from jobs.collection_sources import CollectionSources, LocateInShards, warn_of_gaps
from jobs.export_target import (IN_PROGRESS, METRICS_NAMESPACE, BatchFailed, ExportRow,
                                ExportState, Target, TargetError)
from pipeline.runners import default_runner
from run_format import utc_now
from storage.run_dirs import Run

_LOG = logging.getLogger(__name__)
DELETE_BATCH = 1000
PLAN_NAMESPACE = 'export_plan'
# A plan line: {WRITES: ShardWrites}, {DELETE: uri} or {ROW: [uri, run]}.
WRITES, DELETE, ROW = 'writes', 'delete', 'row'


class ExportFailed(RuntimeError):
  """The pipeline failed part way: the target holds part of the changes."""


def check_options(beam_flags: Sequence[str]) -> None:
  work_folder.check_options(beam_flags, 'the plan\'s change lists')


class ExportPlan(NamedTuple):
  """The plan pipeline's counts; the change lists are files in its folder."""
  writes: int  # rows the collection's vector replaces or adds
  deletes: int  # URIs the target holds and the collection no longer does
  unchanged: int
  rows: int  # the collection's size: rows the target holds once the changes are made


class ShardWrites(NamedTuple):
  """One shard's rows to write."""
  run: str
  path: str
  uris: List[str]


class _PlanChanges(beam.DoFn):
  """(uri, (its source run or None, [the run the target holds it from])) -> (source run, uri) to
  write, or its URI (tag 'delete'); unchanged rows are counted only."""

  def setup(self):
    self._counters = {name: beam.metrics.Metrics.counter(PLAN_NAMESPACE, name)
                      for name in ('rows', 'unchanged', 'deletes')}

  def process(self, decided):
    uri, (source, current) = decided
    if source is None:
      self._counters['deletes'].inc()
      yield beam.pvalue.TaggedOutput('delete', uri)
      return
    self._counters['rows'].inc()
    if source in current:
      self._counters['unchanged'].inc()
    else:
      yield source, uri


def _shard_writes(grouped, shard_paths: Dict[str, List[str]]) -> str:
  (run, number), uris = grouped
  uris = sorted(uris)
  beam.metrics.Metrics.counter(PLAN_NAMESPACE, 'writes').inc(len(uris))
  return json.dumps({WRITES: ShardWrites(run, shard_paths[run][number], uris)._asdict()})


def _plan_files(folder: str) -> str:
  return storage.join(folder, 'plan-*.jsonl')


class _PlanLines(beam.DoFn):
  """A plan line -> ShardWrites, or a URI to delete (tag DELETE), or (uri, run) (tag ROW)."""

  def process(self, line: bytes):
    (kind, value), = json.loads(line).items()
    if kind == WRITES:
      yield ShardWrites(**value)
    else:
      yield beam.pvalue.TaggedOutput(kind, tuple(value) if kind == ROW else value)


def plan(runs: Sequence[Run], target: Target, folder: str,
         options: PipelineOptions) -> ExportPlan:
  """Runs the plan pipeline: its change lists into `folder`, its counts returned."""
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  current = pipeline | 'CurrentRows' >> target.current_rows_transform()
  decided = pipeline | 'Sources' >> CollectionSources(runs, beside=current)
  planned = decided.beside | 'Plan' >> beam.ParDo(_PlanChanges()).with_outputs(
      'delete', main='write')
  shard_paths = {run.path: run.shard_paths() for run in runs}
  lines = [planned.write
           | 'Locate' >> LocateInShards(shard_paths)
           | 'ByShard' >> beam.GroupByKey()
           | 'ShardWrites' >> beam.Map(_shard_writes, shard_paths),
           planned.delete | 'DeleteLines' >> beam.Map(lambda uri: json.dumps({DELETE: uri}))]
  if target.records_collection:
    lines.append(decided.kept | 'RowLines' >> beam.Map(
        lambda kv: json.dumps({ROW: [kv[0][1], kv[0][0]]})))
  _ = (lines
       | 'PlanLines' >> beam.Flatten()
       | 'WritePlan' >> beam.io.WriteToText(storage.join(folder, 'plan'),
                                            file_name_suffix='.jsonl'))
  result = pipeline.run()
  result.wait_until_finish()
  warn_of_gaps(result)
  return ExportPlan(*(work_folder.counter(result, name, PLAN_NAMESPACE)
                      for name in ('writes', 'deletes', 'unchanged', 'rows')))


class _ReadRows(beam.DoFn):
  """A shard's rows that are to be written (its ShardWrites' URIs), as ExportRows."""

  def __init__(self, models: Dict[str, str]):
    self._models = models  # run directory -> its model, for rows that name none

  def process(self, writes: ShardWrites, deleted=None):
    del deleted  # waited for only: deletions go first
    shard = read_shard(writes.path, writes.run)
    wanted = set(writes.uris)
    metadata = shard.metadata
    columns = {name: metadata.column(name).to_pylist()
               for name in ('sha256', 'height', 'width', 'model')}
    for row, uri in enumerate(shard.uris):
      if uri in wanted:
        yield ExportRow(uri, columns['sha256'][row], columns['height'][row],
                        columns['width'][row], columns['model'][row] or self._models[writes.run],
                        writes.run, np.ascontiguousarray(shard.vectors[row], np.float32))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'shards_read').inc()


def _lines(path: str) -> Iterator[bytes]:
  """A plan file's lines, streamed."""
  with storage.open_file(path) as f:
    yield from f


def _shard_writes_in(folder: str) -> Iterator[ShardWrites]:
  for info in storage.match(_plan_files(folder)):
    for line in _lines(info.path):
      value = json.loads(line).get(WRITES)
      if value is not None:
        yield ShardWrites(**value)


def _sample(folder: str):
  """The sampler begin() gets: the first `count` vectors to be written, read in the launcher a
  shard at a time."""
  def sample(count: int) -> np.ndarray:
    parts, total = [], 0
    for writes in _shard_writes_in(folder):
      shard = read_shard(writes.path, writes.run)
      wanted = set(writes.uris)
      keep = np.array([u in wanted for u in shard.uris], bool)
      parts.append(shard.vectors[keep][:count - total])
      total += len(parts[-1])
      if total >= count:
        break
    return np.concatenate(parts)
  return sample


class ExportReport(NamedTuple):
  written: int
  deleted: int
  unchanged: int
  rows: int
  seconds: float
  state: Optional[ExportState]  # None: nothing was new, the target was not touched


def export(runs: Sequence[Run], target: Target, beam_flags: Sequence[str]) -> ExportReport:
  """Makes `target` (checked) hold the collection of `runs` (newest first, one model)."""
  start = time.perf_counter()
  previous = target.state()
  if previous is not None and previous.status == IN_PROGRESS:
    _LOG.warning('%s: the last export did not finish (%s); this one completes it', target.name,
                 previous.describe())
  options = PipelineOptions(list(beam_flags))
  folder, local = work_folder.work_directory(options, 'export-plan')
  try:
    changes = plan(runs, target, folder, options)
    unfinished = previous is not None and previous.status == IN_PROGRESS
    if not changes.writes and not changes.deletes and not unfinished:
      return ExportReport(0, 0, changes.unchanged, changes.rows, time.perf_counter() - start,
                          None)
    last_complete = (previous.last_complete if unfinished else
                     previous.describe() if previous is not None else None)
    state = ExportState(IN_PROGRESS, tuple(run.path for run in runs), changes.rows, utc_now(),
                        None, last_complete)
    target.begin(runs[0].model, runs[0].embedding_size, state, _sample(folder))
    try:
      _apply(target, folder, {run.path: run.model for run in runs}, options)
    except Exception as exc:  # the runner wraps a DoFn's error in its own
      last = last_complete or 'none: the target held no complete export before'
      raise ExportFailed(
          f'export to {target.name} failed part way ({_cause(exc)}): the target holds part of '
          f'this export\'s {changes.writes} writes and {changes.deletes} deletions, and is '
          f'marked "{IN_PROGRESS}"; its last complete state: {last}. Run the same command again '
          f'to finish') from exc
  finally:
    work_folder.remove(folder, local)
  finished = state._replace(finished_at=utc_now())
  target.finish(finished)
  return ExportReport(changes.writes, changes.deletes, changes.unchanged, changes.rows,
                      time.perf_counter() - start, finished)


def _cause(exc: BaseException) -> str:
  """The first line of the innermost error (BatchFailed's when a batch gave up)."""
  while exc.__cause__ is not None or exc.__context__ is not None:
    if isinstance(exc, BatchFailed):
      break
    exc = exc.__cause__ or exc.__context__
  text = str(exc).strip().splitlines()
  return text[0] if text else type(exc).__name__


def _apply(target: Target, folder: str, models: Dict[str, str],
           options: PipelineOptions) -> None:
  """The apply pipeline: the plan's deletions, then its writes, each shard read once."""
  with beam.Pipeline(runner=default_runner(options), options=options) as pipeline:
    planned = (pipeline
               | 'PlanFiles' >> beam.Create([f.path for f in storage.match(_plan_files(folder))],
                                          reshuffle=False)
               | 'Lines' >> beam.FlatMap(_lines)
               | 'PlanLines' >> beam.ParDo(_PlanLines()).with_outputs(DELETE, ROW, main=WRITES))
    deleted = (planned[DELETE]
               | 'Batches' >> beam.BatchElements(min_batch_size=DELETE_BATCH,
                                                 max_batch_size=DELETE_BATCH)
               | 'DeleteRows' >> target.delete_transform())
    _ = (planned[WRITES]
         | 'Spread' >> beam.Reshuffle()
         | 'ReadRows' >> beam.ParDo(_ReadRows(models), beam.pvalue.AsList(deleted))
         | 'Write' >> target.write_transform())
    if target.records_collection:
      _ = planned[ROW] | 'RecordCollection' >> target.collection_transform()


def summary_line(target: Target, report: ExportReport) -> str:
  if report.state is None:
    return (f'{target.name}: nothing new; the target holds the collection\'s {report.rows} rows '
            f'(nothing written)')
  return (f'{target.name}: wrote {report.written} rows, deleted {report.deleted}, '
          f'{report.unchanged} unchanged; it holds the collection\'s {report.rows} rows '
          f'({report.seconds:.1f} s)')


FORMS = ('postgresql://USER@HOST:PORT/DB?table=NAME', 'milvus://HOST:PORT/COLLECTION',
         'milvus-lite:FILE.db?collection=NAME', 'qdrant://HOST:PORT/COLLECTION',
         'qdrant-local:DIRECTORY?collection=NAME', 'vertex:FOLDER (gs://, s3:// or local)')


# --to's scheme -> the module and class of its target, imported only when named (a pgvector
# export needs no pymilvus).
_TARGETS = {
    'postgresql': ('jobs.export_pgvector', 'PgvectorTarget'),
    'postgres': ('jobs.export_pgvector', 'PgvectorTarget'),
    'milvus': ('jobs.export_milvus', 'MilvusTarget'),
    'milvus-lite': ('jobs.export_milvus', 'MilvusTarget'),
    'qdrant': ('jobs.export_qdrant', 'QdrantTarget'),
    'qdrant-local': ('jobs.export_qdrant', 'QdrantTarget'),
    'vertex': ('jobs.export_vertex', 'VertexTarget'),
}


def open_target(text: str, batch_size: int = 0) -> Target:
  """The target `--to` names (not yet contacted), parsed by its class; TargetError if it names
  none."""
  scheme, colon, _ = text.partition(':')
  found = _TARGETS.get(scheme.lower()) if colon else None
  if found is None:
    raise TargetError(f'--to {text}: not a target; use one of ' + ', '.join(FORMS))
  module, name = found
  return getattr(importlib.import_module(module), name).from_url(text, batch_size)
