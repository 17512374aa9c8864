"""What every export target shares: the rows it receives (record batches of the collection, keyed
by the collection's stable row id), the export's state it keeps, and retries (one module per
kind, whose target parses its own `--to`: export_pgvector.py, export_milvus.py,
export_qdrant.py, export_vertex.py; jobs/export.py picks one by the URL's scheme).

A target keeps, beside the vectors, a small record of the export itself (`ExportState`): the
model and dimension it holds, the collection it follows and the version it last applied, and
whether the last export finished. The export writes it `in progress` before the first change
and `complete` after the last, so a failed export is seen by the next one (which applies the
changes again from the last complete version), and its message can name the last complete state.
"""

import contextlib
import json
import logging
import re
import time
import urllib.parse
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import apache_beam as beam
import numpy as np
import pyarrow as pa

from jobs.collection_reads import row_ids, vectors

_LOG = logging.getLogger(__name__)
METRICS_NAMESPACE = 'export'
RETRIES = 3  # a failed batch is tried again this many times, after 1, 2, 4 s
COMPLETE = 'complete'
IN_PROGRESS = 'in progress'
# The collection's columns a target receives (beside `_rowid`, the target's id).
COLUMNS = ('uri', 'sha256', 'height', 'width', 'model', 'run', 'embedding')
METADATA = ('uri', 'sha256', 'height', 'width', 'model', 'run')
T = TypeVar('T')


class TargetError(ValueError):
  """A --to that cannot be used: wrong form, unreachable, or holding something else."""


class BatchFailed(RuntimeError):
  """A batch that still failed after its retries."""


class ExportState(NamedTuple):
  """The record a target keeps of the export that last changed it."""
  status: str  # COMPLETE or IN_PROGRESS
  collection: Optional[str]  # the collection's URI (None: an export of run directories, before)
  version: Optional[int]  # the collection's version the target holds once this export completes
  since: Optional[int]  # the version its changes were read from (None: every row, a whole sync)
  rows: int  # rows the target holds once the export is complete
  started_at: str
  finished_at: Optional[str]
  last_complete: Optional[str] = None  # describe() of the last complete export before this one

  def to_json(self) -> str:
    return json.dumps(self._asdict())

  @classmethod
  def from_json(cls, text: str) -> 'ExportState':
    values = json.loads(text)
    if 'collection' not in values:  # written by the export of run directories
      return cls(values['status'], None, None, None, values.get('rows', 0),
                 values.get('started_at', ''), values.get('finished_at'))
    return cls(**{name: values.get(name) for name in cls._fields})

  def describe(self) -> str:
    when = self.finished_at or self.started_at
    source = (f'version {self.version} of {self.collection}' if self.collection else
              'run directories')
    return f'{self.status} export of {when} ({self.rows} rows, {source})'


def row_values(batch: pa.RecordBatch) -> dict:
  """The batch's metadata columns as lists, its ids (int64) and float32 vectors, by name."""
  values = {name: batch.column(name).to_pylist() for name in METADATA}
  values['id'] = row_ids(batch)
  values['vector'] = vectors(batch)
  return values


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
  """A place the collection is exported to. The launcher calls check and state, then begin; the
  pipeline applies `delete_transform` and `write_transform` (and, for a whole sync into a
  target that may hold rows, `current_ids_transform`); the launcher then calls finish. Nothing
  here is held open across those calls (a Milvus Lite file or a Qdrant local folder takes one
  client at a time)."""

  name: str  # --to as given with its passwords as *** (redact): what messages show
  # Whether a whole sync replaces what the target held by itself (Vertex: a complete overwrite),
  # so that the rows the collection no longer has need not be found and deleted.
  whole_sync_replaces = False
  finishing = 'recording the state'  # what finish() does, for the summary line

  def check(self, model: str, dimension: int) -> None:
    """TargetError unless reachable and empty or holding an export of this model and size."""
    raise NotImplementedError

  def state(self) -> Optional[ExportState]:
    """The record of the last export into this target, if any."""
    raise NotImplementedError

  def clear(self) -> None:
    """Removes what this export made in the target (--replace)."""
    raise NotImplementedError

  def current_ids(self) -> Iterator[np.ndarray]:
    """The ids of every row the target holds, in pages (a whole sync's deletions)."""
    raise NotImplementedError

  def current_ids_transform(self) -> beam.PTransform:
    """A PTransform: the pipeline's start -> every id the target holds, streamed by a worker."""
    return _CurrentIds(self)

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    """Creates what is missing and records `state` (in progress). `sample(count)` gives float32
    vectors of the collection, for targets that train something on them."""
    raise NotImplementedError

  def delete_transform(self):
    """A PTransform: PCollection of int64 id arrays -> one count per array deleted."""
    raise NotImplementedError

  def write_transform(self, may_hold: bool):
    """A PTransform: PCollection of record batches (COLUMNS and `_rowid`) -> written.
    `may_hold`: whether the target can hold some of these rows already (their ids): when not,
    the target's bulk insert; when it can, an upsert where the target needs one."""
    raise NotImplementedError

  def finish(self, state: ExportState) -> None:
    """After every change: the index if there is none yet, and the state, complete."""
    raise NotImplementedError


class _CurrentIds(beam.PTransform):
  """A worker's read of the target's ids, page by page, into the pipeline, one id an element."""

  def __init__(self, target: Target):
    super().__init__()
    self._target = target

  def expand(self, pbegin):
    target = self._target
    return (pbegin
            | 'Start' >> beam.Impulse()
            | 'ReadPages' >> beam.FlatMap(lambda _: target.current_ids())
            | 'Ids' >> beam.FlatMap(lambda ids: np.asarray(ids, np.int64).tolist()))


def parse_name(text: str, what: str) -> str:
  """A table or collection name that needs no quoting in SQL, Milvus or Qdrant."""
  if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]{0,47}', text or ''):
    raise TargetError(f'--to: {what} {text!r} must be letters, digits and _ (at most 48, not '
                      f'starting with a digit)')
  return text


def scheme_and_rest(text: str) -> Tuple[str, str]:
  """`--to`'s scheme, in lower case, and what follows its colon."""
  scheme, _, rest = text.partition(':')
  return scheme.lower(), rest


# A --to that starts with KEYWORD= is a libpq keyword/value string (`host=... dbname=...`): no
# URL's scheme holds `=`.
KEYWORD_VALUE = re.compile(r'\s*[A-Za-z_]+\s*=')
# USER:PASSWORD@ of a URL's authority (the last @ before its path or query ends it).
_USERINFO_PASSWORD = re.compile(r'^(\s*[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)([^/?#]*)@')
_QUERY_PASSWORD = re.compile(r'([?&](?:ssl)?password=)([^&#]*)', re.I)
# libpq's value: quoted ('...', \ escapes), or up to the next space (\ escapes).
_KEYWORD_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])*\\?)", re.I)


def redact(text: str) -> Tuple[str, List[str]]:
  """--to with its passwords as *** (what every message, log and summary shows), and the
  passwords it held, as written and decoded (what no message may show)."""
  secrets = []

  def hide(match, decode):
    if not match.group(2):
      return match.group(1)
    secrets.extend({match.group(2), decode(match.group(2))})
    return match.group(1) + '***'
  if KEYWORD_VALUE.match(text):
    shown = _KEYWORD_PASSWORD.sub(lambda m: hide(m, _unquote_keyword_value), text)
  else:
    shown = _USERINFO_PASSWORD.sub(lambda m: hide(m, urllib.parse.unquote) + '@', text)
    shown = _QUERY_PASSWORD.sub(lambda m: hide(m, urllib.parse.unquote), shown)
  return shown, [secret for secret in secrets if secret]


def _unquote_keyword_value(value: str) -> str:
  if value.startswith("'"):
    value = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
  return re.sub(r'\\(.)', r'\1', value)


def scrub(message: str, secrets: Sequence[str]) -> str:
  """`message` (a client's error) with each of `secrets` as ***."""
  for secret in sorted((s for s in secrets if s), key=len, reverse=True):
    message = message.replace(secret, '***')
  return message


def path_and_collection(text: str) -> Tuple[str, str]:
  """SCHEME:PATH?collection=NAME (a local file or folder) -> PATH, NAME."""
  scheme, rest = scheme_and_rest(text)
  path, _, query = rest.partition('?')
  names = urllib.parse.parse_qs(query).get('collection', [])
  if not path or len(names) != 1:
    raise TargetError(f'--to {scheme}:{rest}: give a path and one collection, as '
                      f'{scheme}:PATH?collection=NAME')
  return path, parse_name(names[0], 'collection')


class Server(NamedTuple):
  """A vector database server named by --to."""
  name: str  # --to with its secrets as ***
  url: str  # http://HOST:PORT, or https:// for a SCHEME+https --to: what its client takes
  collection: str
  user: Optional[str]  # USER:PASSWORD@ of the --to, decoded
  password: Optional[str]


def server_url(text: str, default_port: int, default_tls_port: int) -> Server:
  """SCHEME[+https]://[USER:PASSWORD@]HOST[:PORT]/COLLECTION -> the server, on the default port
  of its scheme (+https: TLS) if none is given."""
  # USER@ without a password may be an API key
  name = re.sub(r'^(\s*[^:/?#]+://)[^:/?#@]+:?@', r'\1***@', redact(text)[0])
  try:
    url = urllib.parse.urlsplit(text)
    port = url.port
  except ValueError as exc:  # a port that is not a number, a bad [IPv6] host
    raise TargetError(f'--to {name}: not a URL ({exc})') from exc
  tls = url.scheme.lower().endswith('+https')
  scheme = url.scheme.lower().partition('+')[0]
  if url.query:
    raise TargetError(f'--to {name}: a server takes no ?parameters: {scheme}://HOST:PORT/'
                      f'COLLECTION, or {scheme}+https://HOST:PORT/COLLECTION for TLS')
  port = port or (default_tls_port if tls else default_port)
  if not url.hostname:
    raise TargetError(f'--to {name}: no host')
  host = f'[{url.hostname}]' if ':' in url.hostname else url.hostname
  decoded = [urllib.parse.unquote(part) if part is not None else None
             for part in (url.username, url.password)]
  return Server(name, f'{"https" if tls else "http"}://{host}:{port}',
                parse_name(url.path.strip('/'), 'collection'), *decoded)


class _ClientPerBundle(beam.DoFn):
  """A DoFn holding the target's client for a bundle: a Milvus Lite file or a Qdrant local
  folder takes one client at a time (and a Qdrant local folder is read whole at each opening),
  and the next stage's client, or the launcher's, comes after this bundle."""

  def __init__(self, target):
    self._target = target
    self._clients = None

  def _client(self):
    if self._clients is None:
      self._clients = contextlib.ExitStack()
      self._open = self._clients.enter_context(self._target.client())
    return self._open

  def _close(self):
    if self._clients is not None:
      clients, self._clients = self._clients, None
      clients.close()

  def finish_bundle(self):
    self._close()

  def teardown(self):
    self._close()


class DeleteBatches(_ClientPerBundle):
  """Id arrays -> one count each, deleted through `target.delete(client, ids)`, retried with a
  new client."""

  def process(self, ids: np.ndarray):
    ids = ids.tolist()
    with_retries(lambda: self._target.delete(self._client(), ids),
                 f'deleting {len(ids)} rows from {self._target.collection}',
                 before_retry=self._close)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'deleted').inc(len(ids))
    yield len(ids)


class WriteBatches(_ClientPerBundle):
  """Record batches -> `target.write(client, values, may_hold)` in slices of the target's batch
  size (row_values: numpy vectors, no Python floats made here), retried with a new client."""

  def __init__(self, target, may_hold: bool):
    super().__init__(target)
    self._may_hold = may_hold

  def start_bundle(self):
    self._written = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'written')

  def process(self, batch: pa.RecordBatch):
    size = self._target.batch_size
    for start in range(0, batch.num_rows, size):
      values = row_values(batch.slice(start, size))
      rows = len(values['id'])
      with_retries(lambda: self._target.write(self._client(), values, self._may_hold),
                   f'writing {rows} rows to {self._target.collection}', before_retry=self._close)
      self._written.inc(rows)
