"""What every export target shares: the row it receives, the export's state it keeps and retries
(one module per kind, whose target parses its own `--to`: export_pgvector.py, export_milvus.py,
export_qdrant.py, export_vertex.py; jobs/export.py picks one by the URL's scheme).

A target keeps, beside the vectors, a small record of the export itself (`ExportState`): the
model and dimension it holds, and whether the last export finished. The export writes it
`in progress` before the first change and `complete` after the last, so a failed export is seen
by the next one, and its message can name the last complete state.
"""

import json
import logging
import time
import urllib.parse
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar

import apache_beam as beam
import numpy as np

_LOG = logging.getLogger(__name__)
METRICS_NAMESPACE = 'export'
RETRIES = 3  # a failed batch is tried again this many times, after 1, 2, 4 s
COMPLETE = 'complete'
IN_PROGRESS = 'in progress'
T = TypeVar('T')


class TargetError(ValueError):
  """A --to that cannot be used: wrong form, unreachable, or holding something else."""


class BatchFailed(RuntimeError):
  """A batch that still failed after its retries."""


class ExportRow(NamedTuple):
  """One vector of the collection with what a search returns beside it."""
  uri: str
  sha256: Optional[str]
  height: Optional[int]
  width: Optional[int]
  model: str
  run: str  # the run directory the vector was read from
  vector: np.ndarray  # float32 [dimension]


class ExportState(NamedTuple):
  """The record a target keeps of the export that last changed it."""
  status: str  # COMPLETE or IN_PROGRESS
  runs: Tuple[str, ...]  # the run directories the collection was made of
  rows: int  # rows the target holds once the export is complete
  started_at: str
  finished_at: Optional[str]
  last_complete: Optional[str] = None  # describe() of the last complete export before this one

  def to_json(self) -> str:
    return json.dumps(self._asdict())

  @classmethod
  def from_json(cls, text: str) -> 'ExportState':
    values = json.loads(text)
    values['runs'] = tuple(values['runs'])
    return cls(**values)

  def describe(self) -> str:
    when = self.finished_at or self.started_at
    return (f'{self.status} export of {when} ({self.rows} rows from {len(self.runs)} run(s): '
            f'{", ".join(self.runs)})')


def with_retries(action: Callable[[], T], what: str, retry_on: Tuple[type, ...] = (Exception,),
                 before_retry: Callable[[], None] = lambda: None) -> T:
  """`action()`, tried again RETRIES times after a failure (with backoff); BatchFailed after."""
  for attempt in range(RETRIES + 1):
    try:
      return action()
    except retry_on as exc:
      if attempt == RETRIES:
        raise BatchFailed(f'{what} failed {RETRIES + 1} times: {exc}') from exc
      _LOG.warning('%s failed (%s), trying again (%d of %d)', what, exc, attempt + 1, RETRIES)
      time.sleep(2 ** attempt)
      before_retry()
  raise AssertionError('unreachable')


class Target:
  """A place the collection is exported to. The launcher calls check and state; the plan
  pipeline applies `current_rows_transform`; the launcher calls begin when there is a change;
  the apply pipeline applies `delete_transform` and `write_transform` (and
  `collection_transform` if `records_collection`); the launcher then calls finish. Nothing here
  is held open across those calls (a Milvus Lite file or a Qdrant local folder takes one client
  at a time)."""

  name: str  # --to as given, for messages

  def check(self, model: str, dimension: int) -> None:
    """TargetError unless reachable and empty or holding an export of this model and size."""
    raise NotImplementedError

  def state(self) -> Optional[ExportState]:
    """The record of the last export into this target, if any."""
    raise NotImplementedError

  records_collection = False  # whether it keeps (uri, run) of every row itself (Vertex)

  def current_rows(self) -> Iterator[Tuple[str, str]]:
    """(uri, run) of every row the target holds, read in pages."""
    raise NotImplementedError

  def current_rows_transform(self) -> beam.PTransform:
    """A PTransform: the pipeline's start -> (uri, run) of every row the target holds, streamed
    by a worker from `current_rows`."""
    return _CurrentRows(self)

  def collection_transform(self) -> beam.PTransform:
    """A PTransform: (uri, run) of every row the target holds once the changes are made ->
    recorded; for a target that `records_collection`."""
    raise NotImplementedError

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    """Creates what is missing and records `state` (in progress). `sample()` gives float32
    vectors of the collection, for targets that train something on them."""
    raise NotImplementedError

  def delete_transform(self):
    """A PTransform: PCollection of URI batches -> one count per batch deleted."""
    raise NotImplementedError

  def write_transform(self):
    """A PTransform: PCollection of ExportRow -> written."""
    raise NotImplementedError

  def finish(self, state: ExportState) -> None:
    """After every change: the index if there is none yet, and the state, complete."""
    raise NotImplementedError


class _CurrentRows(beam.PTransform):
  """A worker's read of the target's rows, page by page, into the pipeline."""

  def __init__(self, target: Target):
    super().__init__()
    self._target = target

  def expand(self, pbegin):
    target = self._target
    return (pbegin
            | 'Start' >> beam.Impulse()
            | 'ReadPages' >> beam.FlatMap(lambda _: target.current_rows()))


def parse_name(text: str, what: str) -> str:
  """A table or collection name that needs no quoting in SQL, Milvus or Qdrant."""
  import re
  if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]{0,47}', text or ''):
    raise TargetError(f'--to: {what} {text!r} must be letters, digits and _ (at most 48, not '
                      f'starting with a digit)')
  return text


def scheme_and_rest(text: str) -> Tuple[str, str]:
  """`--to`'s scheme, in lower case, and what follows its colon."""
  scheme, _, rest = text.partition(':')
  return scheme.lower(), rest


def path_and_collection(text: str) -> Tuple[str, str]:
  """SCHEME:PATH?collection=NAME (a local file or folder) -> PATH, NAME."""
  scheme, rest = scheme_and_rest(text)
  path, _, query = rest.partition('?')
  names = urllib.parse.parse_qs(query).get('collection', [])
  if not path or len(names) != 1:
    raise TargetError(f'--to {scheme}:{rest}: give a path and one collection, as '
                      f'{scheme}:PATH?collection=NAME')
  return path, parse_name(names[0], 'collection')


def host_port_collection(text: str, default_port: int) -> Tuple[str, int, str]:
  """SCHEME://HOST[:PORT]/COLLECTION (a server) -> HOST, PORT, COLLECTION."""
  url = urllib.parse.urlsplit(text)
  try:
    port = url.port or default_port
  except ValueError as exc:
    raise TargetError(f'--to {text}: {exc}') from exc
  if not url.hostname:
    raise TargetError(f'--to {text}: no host')
  return url.hostname, port, parse_name(url.path.strip('/'), 'collection')


class DeleteBatches(beam.DoFn):
  """URI batches -> one count a batch, deleted through `target.delete(client, uris)` with a
  client of its own per batch (a Milvus Lite file or a Qdrant local folder takes one client at a
  time, and the writer's comes after), retried."""

  def __init__(self, target):
    self._target = target

  def process(self, uris: List[str]):
    def delete():
      with self._target.client() as client:
        self._target.delete(client, uris)
    with_retries(delete, f'deleting {len(uris)} rows from {self._target.collection}')
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'deleted').inc(len(uris))
    yield len(uris)


def embeddable_item(row: ExportRow, item_id: str):
  """The row as Beam's ml.rag EmbeddableItem, what Beam's vector-database writers take."""
  from apache_beam.ml.rag.types import Content, EmbeddableItem, Embedding
  return EmbeddableItem(Content(image=row.uri), id=item_id, metadata={
      'uri': row.uri, 'sha256': row.sha256, 'height': row.height, 'width': row.width,
      'model': row.model, 'run': row.run},
      embedding=Embedding(dense_embedding=row.vector.tolist()))

