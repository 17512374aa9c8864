"""The Beam job behind `python -m embeddings.export`: the collection `embeddings.load` returns,
put into a vector database or files, and kept equal to it night after night.

    launcher: which run holds each URI's vector (embeddings.collection.vector_sources) against
              what the target holds (uri, run) -> the URIs to write, per run, and to delete
    pipeline: URI batches ─ DeleteRows ───────────────┐ (done first)
              shard refs ─ ReadRows (the rows to write) ─ the target's writer
    launcher: the index (first load) and the target's state, complete

A row is current when the target holds its URI from the run that holds its vector now: a newer
run that embedded it again, or a new night, changes that run. So a rerun writes what is new or
changed, deletes what the newest state dropped (dead-lettered, deleted, superseded by nothing),
and with nothing new, writes nothing at all.
"""

import logging
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from embeddings.collection import vector_sources
from embeddings.runs import Run
from embeddings.shards import read_shard
from jobs.export_target import (IN_PROGRESS, METRICS_NAMESPACE, BatchFailed, ExportRow,
                                ExportState, Target, TargetError, batches, now, parse_name)

_LOG = logging.getLogger(__name__)
DELETE_BATCH = 1000


class ExportFailed(RuntimeError):
  """The pipeline failed part way: the target holds part of the changes."""


class Changes(NamedTuple):
  writes: Dict[str, Set[str]]  # run directory -> URIs whose row that run's vector replaces
  deletes: List[str]  # URIs the target holds and the collection no longer does
  unchanged: int
  collection: Dict[str, Set[str]]  # run directory -> URIs whose vector is that run's

  @property
  def rows(self) -> int:
    """The collection's size: rows the target holds once the changes are made."""
    return sum(len(uris) for uris in self.collection.values())


def plan_changes(runs: Sequence[Run], current) -> Changes:
  """`current`: (uri, run) of the target's rows."""
  sources = vector_sources(runs)
  writes = {run: set(uris) for run, uris in sources.items()}
  deletes, unchanged = [], 0
  for uri, run in current:
    if uri in writes.get(run, ()):
      writes[run].discard(uri)  # a target holds a URI once: no other row checks it again
      unchanged += 1
    elif not any(uri in uris for uris in sources.values()):
      deletes.append(uri)
  return Changes({run: uris for run, uris in writes.items() if uris}, sorted(deletes), unchanged,
                 sources)


class ShardRef(NamedTuple):
  run: str
  path: str
  model: str


class _ReadRows(beam.DoFn):
  """A shard's rows that are to be written (the run's URIs in `writes`), as ExportRows."""

  def process(self, ref: ShardRef, writes: Dict[str, Set[str]], deleted=None):
    del deleted  # waited for only: deletions go first
    shard = read_shard(ref.path, ref.run)
    wanted = writes[ref.run]
    metadata = shard.metadata
    columns = {name: metadata.column(name).to_pylist()
               for name in ('sha256', 'height', 'width', 'model')}
    for row, uri in enumerate(shard.uris):
      if uri in wanted:
        yield ExportRow(uri, columns['sha256'][row], columns['height'][row],
                        columns['width'][row], columns['model'][row] or ref.model, ref.run,
                        np.ascontiguousarray(shard.vectors[row], np.float32))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'shards_read').inc()


def _sample(refs: List[ShardRef], writes: Dict[str, Set[str]]):
  """The sampler begin() gets: the first `count` vectors to be written, read in the launcher."""
  def sample(count: int) -> np.ndarray:
    parts, total = [], 0
    for ref in refs:
      shard = read_shard(ref.path, ref.run)
      keep = np.array([u in writes[ref.run] for u in shard.uris], bool)
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
  changes = plan_changes(runs, target.current_rows())
  written = sum(len(uris) for uris in changes.writes.values())
  unfinished = previous is not None and previous.status == IN_PROGRESS
  if not written and not changes.deletes and not unfinished:
    return ExportReport(0, 0, changes.unchanged, changes.rows, time.perf_counter() - start, None)
  last_complete = (previous.last_complete if unfinished else
                   previous.describe() if previous is not None else None)
  state = ExportState(IN_PROGRESS, tuple(run.path for run in runs), changes.rows, now(), None,
                      last_complete)
  refs = [ShardRef(run.path, path, run.model) for run in runs if run.path in changes.writes
          for path in run.shard_paths()]
  target.begin(runs[0].model, runs[0].embedding_size, state, _sample(refs, changes.writes))
  try:
    _run_pipeline(target, refs, changes, beam_flags)
  except Exception as exc:  # the runner wraps a DoFn's error in its own
    last = last_complete or 'none: the target held no complete export before'
    raise ExportFailed(
        f'export to {target.name} failed part way ({_cause(exc)}): the target holds part of '
        f'this export\'s {written} writes and {len(changes.deletes)} deletions, and is marked '
        f'"{IN_PROGRESS}"; its last complete state: {last}. Run the same command again to '
        f'finish') from exc
  finished = state._replace(finished_at=now())
  target.finish(finished, changes.collection)
  return ExportReport(written, len(changes.deletes), changes.unchanged, changes.rows,
                      time.perf_counter() - start, finished)


def _cause(exc: BaseException) -> str:
  """The first line of the innermost error (BatchFailed's when a batch gave up)."""
  while exc.__cause__ is not None or exc.__context__ is not None:
    if isinstance(exc, BatchFailed):
      break
    exc = exc.__cause__ or exc.__context__
  text = str(exc).strip().splitlines()
  return text[0] if text else type(exc).__name__


def _run_pipeline(target: Target, refs: List[ShardRef], changes: Changes,
                  beam_flags: Sequence[str]) -> None:
  with beam.Pipeline(options=PipelineOptions(list(beam_flags))) as pipeline:
    deleted = (pipeline
               | 'Deletions' >> beam.Create(batches(changes.deletes, DELETE_BATCH))
               | 'DeleteRows' >> target.delete_transform())
    writes = pipeline | 'Writes' >> beam.Create([changes.writes])
    _ = (pipeline
         | 'Shards' >> beam.Create(refs)
         | 'Spread' >> beam.Reshuffle()
         | 'ReadRows' >> beam.ParDo(_ReadRows(), beam.pvalue.AsSingleton(writes),
                                    beam.pvalue.AsList(deleted))
         | 'Write' >> target.write_transform())


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


def _path_and_collection(rest: str, scheme: str) -> Tuple[str, str]:
  import urllib.parse
  path, _, query = rest.partition('?')
  names = urllib.parse.parse_qs(query).get('collection', [])
  if not path or len(names) != 1:
    raise TargetError(f'--to {scheme}:{rest}: give a path and one collection, as '
                      f'{scheme}:PATH?collection=NAME')
  return path, parse_name(names[0], 'collection')


def _host_port_name(url, default_port: int, text: str) -> Tuple[str, int, str]:
  try:
    port = url.port or default_port
  except ValueError as exc:
    raise TargetError(f'--to {text}: {exc}') from exc
  if not url.hostname:
    raise TargetError(f'--to {text}: no host')
  return url.hostname, port, parse_name(url.path.strip('/'), 'collection')


def open_target(text: str, batch_size: int = 0) -> Target:
  """The target `--to` names (not yet contacted); TargetError if it names none."""
  import urllib.parse
  scheme, colon, rest = text.partition(':')
  scheme = scheme.lower()
  if not colon:
    scheme = ''
  if scheme in ('postgresql', 'postgres'):
    from jobs.export_pgvector import PgvectorTarget
    return PgvectorTarget.from_url(text, batch_size)
  if scheme == 'milvus':
    from jobs.export_milvus import MilvusTarget
    host, port, name = _host_port_name(urllib.parse.urlsplit(text), 19530, text)
    return MilvusTarget(text, f'http://{host}:{port}', name, batch_size)
  if scheme == 'milvus-lite':
    from jobs.export_milvus import MilvusTarget
    path, name = _path_and_collection(rest, scheme)
    if not path.endswith('.db'):
      raise TargetError(f'--to {text}: a Milvus Lite file name ends in .db')
    return MilvusTarget(text, path, name, batch_size)
  if scheme == 'qdrant':
    from jobs.export_qdrant import QdrantTarget
    host, port, name = _host_port_name(urllib.parse.urlsplit(text), 6333, text)
    return QdrantTarget(text, name, batch_size, host=host, port=port)
  if scheme == 'qdrant-local':
    from jobs.export_qdrant import QdrantTarget
    path, name = _path_and_collection(rest, scheme)
    return QdrantTarget(text, name, batch_size, path=path)
  if scheme == 'vertex':
    from jobs.export_vertex import VertexTarget
    if not rest:
      raise TargetError('--to vertex: give the folder, as vertex:gs://BUCKET/FOLDER')
    return VertexTarget(text, rest.rstrip('/'), batch_size)
  raise TargetError(f'--to {text}: not a target; use one of ' + ', '.join(FORMS))
