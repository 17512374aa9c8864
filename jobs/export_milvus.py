"""Milvus (a server, or Milvus Lite in-process from a .db file): a collection keyed by the
collection's row id (`id`, INT64; `uri` beside it), written
in column batches of numpy vectors: `insert` for rows the collection cannot hold yet (a first
export, a sync's new rows), `upsert` only when it may (an export finishing one that failed).

The collection is created with its vector index declared (AUTOINDEX, cosine: Milvus needs one
before a collection loads, and builds it per segment as segments seal), and flushed after the
load. The export's record (model, dimension, state) is kept in the collection's properties.
"""

import contextlib
import logging
import os
from typing import Callable, Iterator, List, Optional

import apache_beam as beam
import numpy as np

from jobs.export_target import (COMPLETE, METADATA, DeleteBatches, ExportState, Target,
                                TargetError, WriteBatches, path_and_collection, redact,
                                scheme_and_rest, scrub, server_url)
from transforms import quiet_logs

_LOG = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 1_024  # rows an insert: 18 MB of 4,320-d vectors, below Milvus's 64 MB
MAX_URI = 8192
TOKEN_VARIABLE = 'MILVUS_TOKEN'  # USER:PASSWORD, or a Zilliz Cloud API key
_MODEL, _DIMENSION, _STATE = 'export.model', 'export.dimension', 'export.state'


class MilvusTarget(Target):

  def __init__(self, name: str, uri: str, collection: str, batch_size: int = 0, token: str = ''):
    self.name = name
    self.uri = uri  # http(s)://HOST:PORT, or the Milvus Lite file
    self.collection = collection
    self.batch_size = batch_size or DEFAULT_BATCH_SIZE
    self.token = token  # USER:PASSWORD or an API key (Zilliz Cloud); '' without authentication

  @classmethod
  def from_url(cls, text: str, batch_size: int = 0) -> 'MilvusTarget':
    """milvus://[USER:PASSWORD@]HOST:PORT/COLLECTION (milvus+https:// for TLS), the token
    from MILVUS_TOKEN without USER:PASSWORD; or milvus-lite:FILE.db?collection=NAME."""
    name = redact(text)[0]
    if scheme_and_rest(text)[0] == 'milvus-lite':
      path, collection = path_and_collection(text)
      if not path.endswith('.db'):
        raise TargetError(f'--to {name}: a Milvus Lite file name ends in .db')
      return cls(name, path, collection, batch_size)
    server = server_url(text, 19530, 443)  # pymilvus's ports: 19530, and 443 for https
    if server.user is not None and server.password is None:
      raise TargetError(f'--to {server.name}: give USER:PASSWORD@, or the token in '
                        f'{TOKEN_VARIABLE}')
    token = (f'{server.user}:{server.password}' if server.user is not None else
             os.environ.get(TOKEN_VARIABLE, ''))
    return cls(server.name, server.url, server.collection, batch_size, token)

  @contextlib.contextmanager
  def client(self):
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException
    if self.uri.endswith('.db'):
      quiet_logs.drop_messages(quiet_logs.MILVUS_LITE_HARMLESS)
    try:
      client = MilvusClient(uri=self.uri, token=self.token, timeout=10)
    except MilvusException as exc:
      raise TargetError(f'--to {self.name}: cannot connect: '
                        f'{scrub(str(exc.message), [self.token])}') from exc
    try:
      yield client
    finally:
      client.close()

  def _properties(self, client) -> Optional[dict]:
    if not client.has_collection(self.collection):
      return None
    properties = client.describe_collection(self.collection).get('properties', {})
    if _MODEL not in properties:
      raise TargetError(f'--to {self.name}: collection {self.collection} exists and was not '
                        f'made by this export: choose another collection')
    return properties

  def check(self, model: str, dimension: int) -> None:
    with self.client() as client:
      properties = self._properties(client)
    if properties is not None and (properties[_MODEL], int(properties[_DIMENSION])) != (
        model, dimension):
      raise TargetError(f'--to {self.name}: collection {self.collection} holds '
                        f'{properties[_DIMENSION]}-d vectors of {properties[_MODEL]}, not '
                        f'{dimension}-d of {model}: choose another collection')

  def state(self) -> Optional[ExportState]:
    with self.client() as client:
      properties = self._properties(client)
    if properties is None or _STATE not in properties:
      return None
    return ExportState.from_json(properties[_STATE])

  def current_ids(self) -> Iterator[np.ndarray]:
    with self.client() as client:
      if self._properties(client) is None:
        return
      client.load_collection(self.collection)  # a query needs it loaded (a reopened file: not)
      iterator = client.query_iterator(self.collection, batch_size=10_000, filter='',
                                       output_fields=['id'])
      try:
        while True:
          page = iterator.next()
          if not page:
            return
          yield np.array([r['id'] for r in page], np.int64)
      finally:
        iterator.close()

  def clear(self) -> None:
    with self.client() as client:
      if self._properties(client) is not None:
        client.drop_collection(self.collection)

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    from pymilvus import DataType
    with self.client() as client:
      if self._properties(client) is None:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field('id', DataType.INT64, is_primary=True)
        schema.add_field('uri', DataType.VARCHAR, max_length=MAX_URI)
        schema.add_field('sha256', DataType.VARCHAR, max_length=64, nullable=True)
        schema.add_field('height', DataType.INT64, nullable=True)
        schema.add_field('width', DataType.INT64, nullable=True)
        schema.add_field('model', DataType.VARCHAR, max_length=1024, nullable=True)
        schema.add_field('run', DataType.VARCHAR, max_length=MAX_URI, nullable=True)
        schema.add_field('embedding', DataType.FLOAT_VECTOR, dim=dimension)
        index = client.prepare_index_params()
        index.add_index('embedding', index_type='AUTOINDEX', metric_type='COSINE')
        client.create_collection(self.collection, schema=schema, index_params=index,
                                 properties={_MODEL: model, _DIMENSION: str(dimension)})
      client.alter_collection_properties(self.collection, properties={_STATE: state.to_json()})

  def delete_transform(self):
    return beam.ParDo(DeleteBatches(self))

  def delete(self, client, ids: List[int]) -> None:
    client.delete(self.collection, ids=ids)

  def write_transform(self, may_hold: bool):
    return beam.ParDo(WriteBatches(self, may_hold))

  def write(self, client, values: dict, may_hold: bool) -> None:
    """Rows whose vectors are numpy arrays (pymilvus packs them); an upsert (delete and insert)
    only when the collection may hold some of them, as a Milvus server does not check an
    inserted id against those it holds."""
    rows = [dict({name: values[name][n] for name in METADATA}, id=int(row_id),
                 embedding=values['vector'][n]) for n, row_id in enumerate(values['id'])]
    (client.upsert if may_hold else client.insert)(self.collection, rows)

  def finish(self, state: ExportState) -> None:
    with self.client() as client:
      client.flush(self.collection)
      client.alter_collection_properties(
          self.collection, properties={_STATE: state._replace(status=COMPLETE).to_json()})
