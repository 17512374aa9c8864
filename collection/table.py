"""The collection's format, for the pipeline that commits to it and every reader: one Lance table
with stable row ids, its schema, its commit messages, and a snapshot to read.

Why Lance (docs/architecture.md, "The collection"): a changed file's old row is removed by a
deletion file (milliseconds, nothing rewritten), fragments are written apart by the workers and
made visible by one commit, row ids survive compaction, and the changes between two versions
(rows inserted, row ids deleted) are read without scanning the table.
"""

import argparse
import json
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

import storage
from run_format import COLUMNS, EMBEDDING, RUN_COLUMN, embedding_type
from run_format.columns import TIMESTAMP

FORMAT_VERSION = '1'
CONTENT_ID = 'content_id'  # the store's identity of the bytes (GCS crc32c, S3 ETag); local: null
BYTE_OFFSET = 'byte_offset'  # a shard member's bytes inside its container, where it allows
BYTE_LENGTH = 'byte_length'
EMBEDDED_AT = 'embedded_at'
ROW_ID = '_rowid'  # Lance's stable row id: an image's identity for followers, kept by compaction
COLLECTION_COLUMNS = ([column.name for column in COLUMNS] +
                      [CONTENT_ID, BYTE_OFFSET, BYTE_LENGTH, RUN_COLUMN, EMBEDDED_AT, EMBEDDING])
# What a night reads to skip unchanged files: which version of which file, made how. No vector.
STATE_COLUMNS = ['uri', 'size_bytes', 'last_modified', CONTENT_ID, 'model', 'recipe']
URI_INDEX = 'BTREE'
# Looked up one value at a time: a URI (a query, the browse page), the bytes' sha256 (a query
# image the collection holds under another name).
INDEXED_COLUMNS = ('uri', 'sha256')
_METADATA_PREFIX = 'pnasnet_embeddings.'
_ROWS_PER_BATCH = 4_096
# A scan reads ahead one batch and one fragment, through a 16 MB buffer: Lance's defaults read
# ahead far enough that a scan of every vector grew from 1.1 GB at 100k rows to 1.6 GB at 300k
# (benchmarks/bench_collection.py); with these it stays near 1 GB.
_SCAN_READAHEAD = {'batch_readahead': 1, 'fragment_readahead': 1, 'io_buffer_size': 16 << 20}
_ROW_ID_CHUNK = 50_000  # row ids taken or deleted per request


class CollectionError(ValueError):
  """A collection that cannot be used as asked: refused before any work."""


class CollectionNotFoundError(CollectionError):
  pass


def schema(model: str, feature_size: int, embedding_dtype: str) -> pa.Schema:
  fields = [pa.field('uri', pa.string(), nullable=False)]
  fields += [pa.field(column.name, column.type) for column in COLUMNS if column.name != 'uri']
  fields += [pa.field(CONTENT_ID, pa.string()), pa.field(BYTE_OFFSET, pa.int64()),
             pa.field(BYTE_LENGTH, pa.int64()), pa.field(RUN_COLUMN, pa.string()),
             pa.field(EMBEDDED_AT, TIMESTAMP),
             pa.field(EMBEDDING, embedding_type(feature_size, embedding_dtype), nullable=False)]
  metadata = {'format': FORMAT_VERSION, 'model': model, 'feature_size': str(feature_size),
              'embedding_dtype': embedding_dtype}
  return pa.schema(fields, metadata={_METADATA_PREFIX + k: v for k, v in metadata.items()})


class CommitRecord(NamedTuple):
  """What a commit of this tool says about itself (its Lance commit message, JSON): `kind` is
  `create`, `night` or `import`; `run` the run directory it came from."""
  kind: str
  run: Optional[str] = None
  added: int = 0
  removed: int = 0

  def message(self) -> str:
    return json.dumps(self._asdict(), sort_keys=True)

  @classmethod
  def from_message(cls, message: Optional[str]) -> Optional['CommitRecord']:
    """None for a commit this tool did not describe (compaction, an index, another writer)."""
    try:
      fields = json.loads(message or '')
    except ValueError:
      return None
    if not isinstance(fields, dict) or 'kind' not in fields:
      return None
    return cls(**{name: fields[name] for name in cls._fields if name in fields})


_STORE_FLAGS = {'--s3_endpoint_url': 'aws_endpoint', '--s3_access_key_id': 'aws_access_key_id',
                '--s3_secret_access_key': 'aws_secret_access_key',
                '--s3_region_name': 'aws_region'}
_store_options: Dict[str, str] = {}


def set_store_options(flags: Sequence[str]) -> Dict[str, str]:
  """Beam's S3 flags (--s3_endpoint_url, ...) as Lance's storage options, so that a collection
  on an S3-compatible store is reached the way the run's files are; the rest comes from the
  environment (AWS_*, Google's application default credentials). Returns them."""
  parser = argparse.ArgumentParser(add_help=False)
  for flag in _STORE_FLAGS:
    parser.add_argument(flag)
  known, _ = parser.parse_known_args(list(flags))
  _store_options.clear()
  for flag, option in _STORE_FLAGS.items():
    value = getattr(known, flag.lstrip('-'))
    if value:
      _store_options[option] = value
  if _store_options.get('aws_endpoint', '').startswith('http://'):
    _store_options['allow_http'] = 'true'
  return dict(_store_options)


def storage_options(uri: str) -> Dict[str, str]:
  return dict(_store_options) if uri.startswith('s3://') else {}


def lance_uri(uri: str) -> str:
  return storage.local_path(uri).rstrip('/')


def _dataset(uri: str, version=None, options: Optional[Dict[str, str]] = None):
  import lance
  options = storage_options(uri) if options is None else options
  try:
    return lance.dataset(lance_uri(uri), version=version, storage_options=options or None)
  except (ValueError, OSError) as exc:
    if 'was not found' not in str(exc):  # a store that cannot be reached or read
      raise CollectionError(f'{uri} cannot be opened: {str(exc).split(", /")[0]}') from None
    if version is not None and _dataset_exists(uri, options):
      raise CollectionError(f'collection {uri} has no version {version} (it may have been '
                            'cleaned up: pnasnet-embeddings collection history lists them)') from None
    raise CollectionNotFoundError(
        f'no collection at {uri}: a night with --collection {uri} creates it, and '
        '`pnasnet-embeddings collection import` builds one from run directories') from None


def _dataset_exists(uri: str, options: Dict[str, str]) -> bool:
  import lance
  try:
    lance.dataset(lance_uri(uri), storage_options=options or None)
  except ValueError:
    return False
  return True


class Changes(NamedTuple):
  """What changed after version `since` up to `version`: rows inserted (a changed file's new
  version is a new row: its old row id is among the deleted) and row ids deleted, each read as a
  stream. Compaction changes no row, so it adds nothing here."""
  since: int
  version: int
  delta: object  # lance DatasetDelta

  def inserted(self, columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
    """Batches of the rows inserted, with their `_rowid`; `columns` picks the others."""
    for reader in (self.delta.get_inserted_rows(), self.delta.get_updated_rows()):
      for batch in reader:
        if columns is not None:
          batch = batch.select(list(columns) + [ROW_ID])
        if batch.num_rows:
          yield batch

  def deleted_row_ids(self) -> Iterator[pa.Array]:
    for batch in self.delta.get_deleted_row_ids():
      if batch.num_rows:
        yield batch.column(ROW_ID)


class Collection:
  """One version of a collection (a snapshot): what every reader reads, however many commits
  land meanwhile."""

  def __init__(self, uri: str, dataset, options: Dict[str, str]):
    self.uri = uri
    self.dataset = dataset
    self.storage_options = options
    metadata = {k.decode(): v.decode() for k, v in (dataset.schema.metadata or {}).items()}
    self.model = metadata.get(_METADATA_PREFIX + 'model')
    self.feature_size = int(metadata.get(_METADATA_PREFIX + 'feature_size', 0))
    self.embedding_dtype = metadata.get(_METADATA_PREFIX + 'embedding_dtype', 'float32')
    if self.model is None:
      raise CollectionError(f'{uri} is a Lance table, but not a collection of this tool')

  @property
  def version(self) -> int:
    return self.dataset.version

  @property
  def num_rows(self) -> int:
    return self.dataset.count_rows()

  def latest(self) -> 'Collection':
    return open_collection(self.uri, options=self.storage_options)

  def fragment_ids(self) -> List[int]:
    return [fragment.fragment_id for fragment in self.dataset.get_fragments()]

  def fragment_batches(self, fragment_id: int, columns: Sequence[str],
                       batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """One fragment's rows (what one worker reads), with their `_rowid`."""
    fragment = self.dataset.get_fragment(fragment_id)
    yield from fragment.to_batches(columns=list(columns), batch_size=batch_rows,
                                   with_row_id=True)

  def batches(self, columns: Optional[Sequence[str]] = None, batch_rows: int = _ROWS_PER_BATCH,
              with_row_id: bool = False, filter: Optional[str] = None
              ) -> Iterator[pa.RecordBatch]:
    """Every row, streamed in batches: memory that does not grow with the collection."""
    scanner = self.dataset.scanner(columns=None if columns is None else list(columns),
                                   batch_size=batch_rows, with_row_id=with_row_id,
                                   filter=filter, **_SCAN_READAHEAD)
    for batch in scanner.to_batches():
      if batch.num_rows:
        yield batch

  def take(self, row_ids: Sequence[int], columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The rows with these ids, in this order (random access: a re-rank's few rows)."""
    ids = [int(row_id) for row_id in row_ids]
    if not ids:
      return pa.table({name: pa.array([], self.dataset.schema.field(name).type)
                       for name in (columns or self.dataset.schema.names)})
    parts = [self.dataset._take_rows(ids[start:start + _ROW_ID_CHUNK],
                                     columns=None if columns is None else list(columns))
             for start in range(0, len(ids), _ROW_ID_CHUNK)]
    return pa.concat_tables(parts)

  def lookup(self, uris: Sequence[str], columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The rows of these URIs (through the scalar index on `uri`), with their `_rowid`; a URI
    the collection does not hold has no row."""
    wanted = list(columns) if columns is not None else None
    if wanted is not None and 'uri' not in wanted:
      wanted.append('uri')
    return self.dataset.to_table(columns=wanted, filter=pc.field('uri').isin(list(uris)),
                                 with_row_id=True)

  def changes(self, since: int) -> Changes:
    """The changes after version `since` (a follower's last applied version)."""
    if since > self.version:
      raise CollectionError(f'version {since} is newer than {self.uri} version {self.version}')
    try:
      delta = self.dataset.delta(begin_version=since, end_version=self.version)
    except (ValueError, OSError) as exc:
      raise CollectionError(f'{self.uri}: cannot read the changes since version {since} '
                            f'(cleaned up?): {exc}') from exc
    return Changes(since, self.version, delta)

  def record(self, version: Optional[int] = None) -> Optional[CommitRecord]:
    transaction = self.dataset.read_transaction(self.version if version is None else version)
    if transaction is None:
      return None
    return CommitRecord.from_message(
        (transaction.transaction_properties or {}).get('__lance_commit_message'))


def open_collection(uri: str, version: Optional[int] = None,
                    options: Optional[Dict[str, str]] = None) -> Collection:
  """The collection at `uri`: its latest version, or `version` (time travel)."""
  options = storage_options(uri) if options is None else options
  return Collection(uri, _dataset(uri, version, options), options)


def create(uri: str, model: str, feature_size: int, embedding_dtype: str) -> Collection:
  """An empty collection of this model; refuses a folder that holds anything else."""
  import lance
  if not storage.is_remote(uri):
    import os
    path = lance_uri(uri)
    if os.path.isdir(path) and os.listdir(path):
      raise CollectionError(f'{uri} is a folder that holds files but no collection: name an '
                            'empty or new folder')
  options = storage_options(uri)
  dataset = lance.write_dataset(
      schema(model, feature_size, embedding_dtype).empty_table(), lance_uri(uri),
      mode='create', enable_stable_row_ids=True, data_storage_version='stable',
      storage_options=options or None, commit_message=CommitRecord('create').message())
  for column in INDEXED_COLUMNS:
    dataset.create_scalar_index(column, URI_INDEX)
  return Collection(uri, lance.dataset(lance_uri(uri), storage_options=options or None), options)


def check_model(collection: Collection, model: str, feature_size: int,
                embedding_dtype: str) -> None:
  """One model per collection: its vectors are only comparable among themselves."""
  mine = (collection.model, collection.feature_size, collection.embedding_dtype)
  if mine != (model, feature_size, embedding_dtype):
    raise CollectionError(
        f'{collection.uri} holds {collection.feature_size}-d {collection.embedding_dtype} '
        f'vectors of {collection.model}; this run makes {feature_size}-d {embedding_dtype} '
        f'vectors of {model}: name another collection, or the same model and --embedding_dtype')


def row_id_predicate(row_ids: Sequence[int]) -> str:
  """`_rowid IN (...)`: the only predicate this tool deletes by (integers, never URIs in SQL)."""
  return f'{ROW_ID} IN ({", ".join(str(int(row_id)) for row_id in row_ids)})'
