"""pgvector: a table keyed by the collection's row id, written with psycopg 3 in batches of
binary COPY straight into the table, one transaction a batch (a batch lands whole or not at all);
only rows the table already holds go through a temporary table and an upsert.

    TABLE            id bigint PRIMARY KEY (the collection's _rowid), uri text (indexed),
                     sha256, height, width, model, run,
                     embedding vector(D), embedding_reduced vector(K) (only when D > 2000)
    TABLE_export     name text PRIMARY KEY, value jsonb: the model, the sizes, the export state
    TABLE_pca        i int, component vector(D), shift real: the projection to K dimensions

pgvector indexes at most 2,000 dimensions of `vector` (4,000 of `halfvec`, from 0.7). Up to
2,000 the HNSW index is on `embedding` itself (cosine); above, on `embedding_reduced`: the unit
vector projected on the first K principal components of the first export's vectors (L2 there
ranks as cosine does on the unit vectors), and a query re-ranks its candidates by the full
`embedding` (docs/exporting.md has the SQL, which projects the query vector in SQL with
TABLE_pca). The index is created after the first load, and kept up by PostgreSQL after that.
"""

import json
import logging
import os
import re
import struct
import urllib.parse
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np

from jobs.export_target import (COMPLETE, KEYWORD_VALUE, METRICS_NAMESPACE, ExportState, Target,
                                TargetError, parse_name, redact, row_values, scrub,
                                with_retries)

_LOG = logging.getLogger(__name__)
MAX_INDEXED_DIMENSION = 2000  # pgvector's HNSW and IVFFlat limit for `vector`
REDUCED_DIMENSION = 256
PCA_SAMPLE = 1024
COPY_CHUNK = 128  # rows encoded at a time: 2 MB
DEFAULT_BATCH_SIZE = 1_024  # rows a transaction: 18 MB of COPY at 4,320 dimensions
_COLUMNS = ('id', 'uri', 'sha256', 'height', 'width', 'model', 'run', 'embedding')


def _psycopg():
  import psycopg
  return psycopg


class Reduction:
  """unit(v) -> its coordinates on the first K principal components of a sample of unit
  vectors, centred (zeros past the sample's rank)."""

  def __init__(self, components: np.ndarray, shift: np.ndarray):
    self.components = components.astype(np.float32)  # [K, D]
    self.shift = shift.astype(np.float32)  # [K]: -components @ mean

  @classmethod
  def train(cls, sample: np.ndarray, dimension: int) -> 'Reduction':
    """Through the samples' Gram matrix (n x n, n <= PCA_SAMPLE): on 2 cores, a few seconds
    where an SVD of the n x D sample takes minutes."""
    unit = _unit(sample.astype(np.float32))
    mean = unit.mean(axis=0)
    centred = unit - mean
    values, vectors = np.linalg.eigh((centred @ centred.T).astype(np.float64))
    order = np.argsort(values)[::-1][:REDUCED_DIMENSION]
    order = order[values[order] > 1e-9 * max(values.max(), 1e-30)]
    components = np.zeros((REDUCED_DIMENSION, dimension), np.float32)
    components[:len(order)] = (centred.T @ vectors[:, order] / np.sqrt(values[order])).T
    return cls(components, -components @ mean)

  def apply(self, vectors: np.ndarray) -> np.ndarray:
    return _unit(vectors) @ self.components.T + self.shift


def _unit(vectors: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.where(norms == 0, 1, norms)


COPY_HEADER = b'PGCOPY\n\xff\r\n\0' + struct.pack('>ii', 0, 0)
COPY_TRAILER = struct.pack('>h', -1)


def _field(value) -> bytes:
  if value is None:
    return b'\xff\xff\xff\xff'  # NULL
  if isinstance(value, str):
    value = value.encode()
  elif isinstance(value, (int, np.integer)):
    value = struct.pack('>q', int(value))
  return struct.pack('>i', len(value)) + value


def _vector_fields(vectors: np.ndarray) -> np.ndarray:
  """Each row's vector as a whole COPY field, made in one numpy pass: its length, then
  pgvector's binary form (dimension, an unused int16, big-endian float4s)."""
  rows, dimension = vectors.shape
  fields = np.empty((rows, 8 + 4 * dimension), np.uint8)
  fields[:, :8] = np.frombuffer(struct.pack('>ihh', 4 + 4 * dimension, dimension, 0), np.uint8)
  fields[:, 8:] = vectors.astype('>f4').view(np.uint8).reshape(rows, -1)
  return fields


def _encode(values: dict, reduced: Optional[np.ndarray]) -> bytes:
  """Rows (row_values of a batch) in PostgreSQL's binary COPY form: _COLUMNS, then
  embedding_reduced when given."""
  count = struct.pack('>h', len(_COLUMNS) + (reduced is not None))
  embeddings = _vector_fields(values['vector'])
  projected = _vector_fields(reduced) if reduced is not None else None
  parts = []
  for number, row_id in enumerate(values['id']):
    parts += [count, _field(row_id)]
    parts += [_field(values[name][number]) for name in _COLUMNS[1:-1]]
    parts.append(embeddings[number].data)
    if projected is not None:
      parts.append(projected[number].data)
  return b''.join(parts)


def copy_rows(values: dict, reduction: Optional['Reduction']) -> Iterator[bytes]:
  """The rows' binary COPY data (without the stream's header and trailer), in chunks of
  COPY_CHUNK rows: each chunk is made while the server takes in the one before."""
  reduced = reduction.apply(values['vector']) if reduction is not None else None
  for start in range(0, len(values['id']), COPY_CHUNK):
    part = {name: column[start:start + COPY_CHUNK] for name, column in values.items()}
    yield _encode(part, reduced[start:start + COPY_CHUNK] if reduced is not None else None)


# One KEYWORD = VALUE of a libpq keyword/value string: its value quoted ('...', \ escapes) or up
# to the next space.
_KEYWORD_ITEM = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])*)")


def _without_table_keyword(text: str, name: str) -> Tuple[str, List[str]]:
  """A keyword/value string -> the string without its `table=...`, and the tables it named."""
  kept, tables, position = [], [], 0
  while text[position:].strip():
    item = _KEYWORD_ITEM.match(text, position)
    if item is None:
      raise TargetError(f'--to {name}: not a libpq keyword/value string: write KEYWORD=VALUE '
                        f'pairs separated by spaces, a value with spaces in single quotes')
    if item[1] == 'table':
      tables.append(re.sub(r'\\(.)', r'\1', item[2][1:-1] if item[2][:1] == "'" else item[2]))
    else:
      kept.append(item[0])
    position = item.end()
  return ''.join(kept).strip(), tables


def _without_table_parameter(text: str) -> Tuple[str, List[str]]:
  """A URI -> the URI without its `table` query parameter (the rest as written), and the tables
  it named."""
  base, question, query = text.partition('?')
  kept, tables = [], []
  for item in query.split('&') if question else []:
    key, _, value = item.partition('=')
    if urllib.parse.unquote(key) == 'table':
      tables.append(urllib.parse.unquote(value))
    elif item:
      kept.append(item)
  return base + ('?' + '&'.join(kept) if kept else ''), tables


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip()
  return text.splitlines()[0] if text else type(exc).__name__


def _libpq_says(exc: BaseException, name: str, secrets: List[str]) -> str:
  """libpq's complaint about --to, quoting only what the redacted --to shows (its messages
  quote pieces of the string, a password's among them)."""
  def shown(quoted):
    visible = quoted[1] in name and not any(secret in quoted[1] for secret in secrets)
    return quoted[0] if visible else '"..."'
  return scrub(re.sub(r'"([^"]*)"', shown, _first_line(exc)), secrets)


class PgvectorTarget(Target):

  finishing = 'the HNSW index (made after the first load)'

  def __init__(self, name: str, conninfo: str, table: str, batch_size: int = 0):
    self.name = name
    self.conninfo = conninfo
    self.table = table
    self.batch_size = batch_size or DEFAULT_BATCH_SIZE

  @classmethod
  def from_url(cls, text: str, batch_size: int = 0) -> 'PgvectorTarget':
    """Any libpq URI (postgresql:// or postgres://) or keyword/value string, with the export's
    own `table` parameter, which is taken out: the rest goes to libpq as written (so that
    PGPASSWORD, ~/.pgpass, PGSERVICEFILE and the other PG* variables apply as for psql)."""
    name, secrets = redact(text)
    if KEYWORD_VALUE.match(text):
      conninfo, tables = _without_table_keyword(text, name)
    else:
      conninfo, tables = _without_table_parameter(text)
    if len(tables) != 1:
      raise TargetError(f'--to {name}: name one table, as postgresql://USER@HOST:PORT/DB?'
                        f'table=NAME or "host=HOST dbname=DB table=NAME"')
    psycopg = _psycopg()
    try:
      psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
      raise TargetError(f'--to {name}: not a PostgreSQL connection string: '
                        f'{_libpq_says(exc, name, secrets)}') from exc
    return cls(name, conninfo, parse_name(tables[0], 'table'), batch_size)

  def connect(self, autocommit: bool = False):
    """`autocommit`: each `transaction()` block commits on its own (the workers' batches)."""
    psycopg = _psycopg()
    settings = psycopg.conninfo.conninfo_to_dict(self.conninfo)
    timeout = ({} if 'connect_timeout' in settings or 'PGCONNECT_TIMEOUT' in os.environ else
               {'connect_timeout': 10})
    try:
      return psycopg.connect(self.conninfo, autocommit=autocommit, **timeout)
    except psycopg.Error as exc:
      secrets = [settings.get('password'), settings.get('sslpassword'),
                 os.environ.get('PGPASSWORD')]
      raise TargetError(f'--to {self.name}: cannot connect: '
                        f'{scrub(_first_line(exc), secrets)}') from exc

  def _settings(self, connection) -> Optional[dict]:
    """The export's own record of the table, None if there is no table; TargetError for a table
    this export did not make."""
    with connection.cursor() as cursor:
      cursor.execute('SELECT to_regclass(%s), to_regclass(%s)',
                     (self.table, f'{self.table}_export'))
      table, settings = cursor.fetchone()
      if table is None:
        return None
      if settings is None:
        raise TargetError(f'--to {self.name}: table {self.table} exists and was not made by '
                          f'this export (no {self.table}_export): choose another table')
      cursor.execute(f'SELECT name, value FROM {self.table}_export')
      return {name: value for name, value in cursor.fetchall()}

  def check(self, model: str, dimension: int) -> None:
    with self.connect() as connection:
      with connection.cursor() as cursor:
        cursor.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
        if cursor.fetchone() is None:
          raise TargetError(f'--to {self.name}: the server has no pgvector extension '
                            f'(https://github.com/pgvector/pgvector)')
      settings = self._settings(connection)
    if settings is not None:
      held = settings['target']
      if (held['model'], held['dimension']) != (model, dimension):
        raise TargetError(f'--to {self.name}: table {self.table} holds {held["dimension"]}-d '
                          f'vectors of {held["model"]}, not {dimension}-d of {model}: choose '
                          f'another table')

  def state(self) -> Optional[ExportState]:
    with self.connect() as connection:
      settings = self._settings(connection)
    if settings is None or 'state' not in settings:
      return None
    return ExportState.from_json(json.dumps(settings['state']))

  def current_ids(self) -> Iterator[np.ndarray]:
    with self.connect() as connection:
      if self._settings(connection) is None:
        return
      with connection.cursor(name='export_current_ids') as cursor:  # server side, in pages
        cursor.execute(f'SELECT id FROM {self.table}')
        while True:
          page = cursor.fetchmany(50_000)
          if not page:
            return
          yield np.array([row[0] for row in page], np.int64)

  def clear(self) -> None:
    with self.connect() as connection:
      if self._settings(connection) is not None:
        connection.execute(f'DROP TABLE IF EXISTS {self.table}, {self.table}_export, '
                           f'{self.table}_pca')

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    with self.connect() as connection:
      reduced = dimension > MAX_INDEXED_DIMENSION
      if self._settings(connection) is None:
        _create(connection, self.table, dimension, model, reduced,
                Reduction.train(sample(PCA_SAMPLE), dimension) if reduced else None)
      _record(connection, self.table, 'state', state.to_json())

  def delete_transform(self):
    return beam.ParDo(_DeleteRows(self))

  def write_transform(self, may_hold: bool):
    return beam.ParDo(_WriteRows(self, may_hold))

  def finish(self, state: ExportState) -> None:
    with self.connect() as connection:
      column, operators = self.index_column(connection)
      connection.execute(f'CREATE INDEX IF NOT EXISTS {self.table}_hnsw ON {self.table} '
                         f'USING hnsw ({column} {operators})')
      _record(connection, self.table, 'state', state._replace(status=COMPLETE).to_json())

  def index_column(self, connection) -> Tuple[str, str]:
    reduced = self._settings(connection)['target']['reduced_dimension']
    return ('embedding_reduced', 'vector_l2_ops') if reduced else ('embedding',
                                                                   'vector_cosine_ops')

  def reduction(self, connection) -> Optional[Reduction]:
    """The projection, read in binary (pgvector's form, no Python floats)."""
    if self.index_column(connection)[0] != 'embedding_reduced':
      return None
    with connection.cursor(binary=True) as cursor:
      rows = cursor.execute(f'SELECT component, shift FROM {self.table}_pca ORDER BY i'
                            ).fetchall()
    return Reduction(np.stack([np.frombuffer(component, '>f4', offset=4) for component, _ in rows]),
                     np.array([shift for _, shift in rows], np.float32))


def _record(connection, table: str, name: str, value: str) -> None:
  connection.execute(f'INSERT INTO {table}_export (name, value) VALUES (%s, %s) ON CONFLICT '
                     f'(name) DO UPDATE SET value = excluded.value', (name, value))


def _create(connection, table: str, dimension: int, model: str, reduced: bool,
            reduction: Optional[Reduction]) -> None:
  """The table, its record and (above 2,000 dimensions) its projection, in one transaction."""
  with connection.transaction():
    connection.execute('CREATE EXTENSION IF NOT EXISTS vector')
    connection.execute(
        f'CREATE TABLE {table} (id bigint PRIMARY KEY, uri text NOT NULL, sha256 text, '
        f'height bigint, width bigint, model text, run text, '
        f'embedding vector({dimension}) NOT NULL' +
        (f', embedding_reduced vector({REDUCED_DIMENSION}) NOT NULL)' if reduced else ')'))
    connection.execute(f'CREATE INDEX {table}_uri ON {table} (uri)')
    connection.execute(f'CREATE TABLE {table}_export (name text PRIMARY KEY, value jsonb)')
    if reduction is not None:
      connection.execute(f'CREATE TABLE {table}_pca (i int PRIMARY KEY, '
                         f'component vector({dimension}) NOT NULL, shift real NOT NULL)')
      with connection.cursor() as cursor:
        _copy(cursor, f'COPY {table}_pca (i, component, shift) FROM STDIN (FORMAT BINARY)',
              [_projection_rows(reduction)])
    _record(connection, table, 'target', json.dumps({
        'model': model, 'dimension': dimension,
        'reduced_dimension': REDUCED_DIMENSION if reduced else None}))


def _projection_rows(reduction: Reduction) -> bytes:
  """The projection's rows in binary COPY form: i (int4), component (vector), shift (float4)."""
  components = _vector_fields(reduction.components)
  return b''.join(struct.pack('>hii', 3, 4, i) + components[i].data + struct.pack('>if', 4, shift)
                  for i, shift in enumerate(reduction.shift.tolist()))


class _Connected(beam.DoFn):
  """Holds one connection per DoFn instance; a failed batch reconnects before its retry."""

  def __init__(self, target: PgvectorTarget):
    self._target = target
    self._connection = None

  def setup(self):
    self._connection = self._connect()

  def _connect(self):
    """A batch's commit does not wait for its WAL to reach the disk: a crash loses a suffix of
    the commits, never one in the middle, and the export's `complete` record, committed after
    them all by a connection that waits, is never kept without them."""
    connection = self._target.connect(autocommit=True)
    connection.execute('SET synchronous_commit = off')
    return connection

  def _reconnect(self):
    try:
      self._connection.close()
    finally:
      self._connection = self._connect()

  def teardown(self):
    if self._connection is not None:
      self._connection.close()


class _DeleteRows(_Connected):

  def process(self, ids: np.ndarray):
    ids = [int(i) for i in ids]

    def delete():
      with self._connection.transaction():
        return self._connection.execute(f'DELETE FROM {self._target.table} WHERE id = ANY(%s)',
                                        (ids,)).rowcount
    deleted = with_retries(delete, f'deleting {len(ids)} rows from {self._target.table}',
                           before_retry=self._reconnect)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'deleted').inc(deleted)
    yield deleted


class _WriteRows(_Connected):
  """Record batches, cut in --batch_size rows, one transaction each, retried whole: rows the
  table does not hold go by binary COPY straight into it (the server's bulk path); only rows it
  already holds (an export finishing one that failed, a whole sync into a held table) are
  upserted, through a temporary table. `may_hold`: whether the table can hold any of the rows;
  when it cannot (a first export, a sync of new rows), no lookup is made."""

  def __init__(self, target: PgvectorTarget, may_hold: bool):
    super().__init__(target)
    self._may_hold = may_hold

  def setup(self):
    super().setup()
    self._reduction = self._target.reduction(self._connection)
    table = self._target.table
    columns = _COLUMNS + (('embedding_reduced',) if self._reduction is not None else ())
    self._copy = f'COPY {{}} ({", ".join(columns)}) FROM STDIN (FORMAT BINARY)'
    updates = ', '.join(f'{c} = excluded.{c}' for c in columns[1:])
    self._upsert = (f'INSERT INTO {table} SELECT * FROM {table}_held ON CONFLICT (id) DO UPDATE '
                    f'SET {updates}')

  def process(self, batch):
    for start in range(0, batch.num_rows, self._target.batch_size):
      self._write(row_values(batch.slice(start, self._target.batch_size)))

  def _held(self, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` the table holds (a mask)."""
    if not self._may_hold:
      return np.zeros(len(ids), bool)
    rows = self._connection.execute(f'SELECT id FROM {self._target.table} WHERE id = ANY(%s)',
                                    (ids.tolist(),)).fetchall()
    return np.isin(ids, np.array([row[0] for row in rows], np.int64))

  def _write(self, values: dict):
    table = self._target.table
    psycopg = _psycopg()

    def write():
      held = self._held(values['id'])
      try:
        with self._connection.transaction(), self._connection.cursor() as cursor:
          if held.any():
            cursor.execute(f'CREATE TEMPORARY TABLE IF NOT EXISTS {table}_held (LIKE {table}) '
                           f'ON COMMIT DELETE ROWS')
            _copy(cursor, self._copy.format(f'{table}_held'),
                  copy_rows(_subset(values, held), self._reduction))
            cursor.execute(self._upsert)
          if not held.all():
            _copy(cursor, self._copy.format(table),
                  copy_rows(_subset(values, ~held), self._reduction))
      except psycopg.errors.UniqueViolation:  # a row the table held after all: look them up,
        self._may_hold = True  # for this batch's retry and the batches after it
        raise

    rows = len(values['id'])
    with_retries(write, f'writing {rows} rows to {table} (from {values["uri"][0]})',
                 before_retry=self._reconnect, retry_on=(psycopg.Error,))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'written').inc(rows)


def _subset(values: dict, mask: np.ndarray) -> dict:
  if mask.all():
    return values
  chosen = np.flatnonzero(mask)
  return {name: ([column[n] for n in chosen] if isinstance(column, list) else column[chosen])
          for name, column in values.items()}


def _copy(cursor, statement: str, chunks: Iterable[bytes]) -> None:
  """One binary COPY, its data sent by psycopg's writer thread while the next chunk is made."""
  with cursor.copy(statement) as copy:
    copy.write(COPY_HEADER)
    for chunk in chunks:
      copy.write(chunk)
    copy.write(COPY_TRAILER)
