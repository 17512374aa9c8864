"""Qdrant (a server, or qdrant-client's local mode on a folder): a collection of points whose id
is the collection's row id (an unsigned integer, as Qdrant takes) and whose payload holds uri,
sha256, height, width, model and run, written by `upload_collection` in batches of numpy
vectors, a Beam worker each (Beam's workers are the parallel uploads), retried.

The collection is created with its HNSW graph off (m = 0) and the graph switched on after the
load (m = 16), Qdrant's recipe for bulk loads; the export's record lives in the collection's
metadata.
"""

import contextlib
import json
import os
from typing import Callable, Iterator, List, Optional

import apache_beam as beam
import numpy as np

from jobs.export_target import (COMPLETE, METADATA, DeleteBatches, ExportState, Target,
                                TargetError, WriteBatches, path_and_collection, redact,
                                scheme_and_rest, scrub, server_url)

DEFAULT_BATCH_SIZE = 256  # points a request
VECTOR = 'dense'  # the points' named vector (the name Beam's own Qdrant writer gives it)
HNSW_M = 16
API_KEY_VARIABLE = 'QDRANT_API_KEY'


class QdrantTarget(Target):

  finishing = 'switching the HNSW graph on'

  def __init__(self, name: str, collection: str, batch_size: int = 0, url: Optional[str] = None,
               path: Optional[str] = None, api_key: Optional[str] = None):
    self.name = name
    self.collection = collection
    self.batch_size = batch_size or DEFAULT_BATCH_SIZE
    self.url, self.path = url, path  # http(s)://HOST:PORT of a server, or the local folder
    self.api_key = api_key

  @classmethod
  def from_url(cls, text: str, batch_size: int = 0) -> 'QdrantTarget':
    """qdrant://HOST:PORT/COLLECTION (qdrant+https:// for TLS, as Qdrant Cloud), the API key
    from QDRANT_API_KEY; or qdrant-local:DIRECTORY?collection=NAME."""
    if scheme_and_rest(text)[0] == 'qdrant-local':
      path, collection = path_and_collection(text)
      return cls(redact(text)[0], collection, batch_size, path=path)
    server = server_url(text, 6333, 6333)
    if server.user is not None:
      raise TargetError(f'--to {server.name}: give the API key in {API_KEY_VARIABLE}, not in '
                        f'--to')
    return cls(server.name, server.collection, batch_size, url=server.url,
               api_key=os.environ.get(API_KEY_VARIABLE) or None)

  @contextlib.contextmanager
  def client(self):
    from qdrant_client import QdrantClient
    client = (QdrantClient(path=self.path) if self.path else
              QdrantClient(url=self.url, api_key=self.api_key, timeout=10,
                           check_compatibility=False))
    try:
      yield client
    finally:
      client.close()

  def _metadata(self, client) -> Optional[dict]:
    try:
      if not client.collection_exists(self.collection):
        return None
    except Exception as exc:  # httpx's and grpc's errors: the server is not there
      message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
      raise TargetError(f'--to {self.name}: cannot connect: '
                        f'{scrub(message, [self.api_key])}') from exc
    metadata = client.get_collection(self.collection).config.metadata or {}
    if 'export_model' not in metadata:
      raise TargetError(f'--to {self.name}: collection {self.collection} exists and was not '
                        f'made by this export: choose another collection')
    return metadata

  def check(self, model: str, dimension: int) -> None:
    with self.client() as client:
      metadata = self._metadata(client)
    if metadata is not None and (metadata['export_model'], metadata['export_dimension']) != (
        model, dimension):
      raise TargetError(f'--to {self.name}: collection {self.collection} holds '
                        f'{metadata["export_dimension"]}-d vectors of {metadata["export_model"]},'
                        f' not {dimension}-d of {model}: choose another collection')

  def state(self) -> Optional[ExportState]:
    with self.client() as client:
      metadata = self._metadata(client)
    if not metadata or 'export_state' not in metadata:
      return None
    return ExportState.from_json(json.dumps(metadata['export_state']))

  def current_ids(self) -> Iterator[np.ndarray]:
    with self.client() as client:
      if self._metadata(client) is None:
        return
      offset = None
      while True:
        points, offset = client.scroll(self.collection, limit=10_000, offset=offset,
                                       with_payload=False, with_vectors=False)
        yield np.array([p.id for p in points], np.int64)
        if offset is None:
          return

  def clear(self) -> None:
    with self.client() as client:
      if self._metadata(client) is not None:
        client.delete_collection(self.collection)

  def _set_metadata(self, client, state: ExportState, **changes) -> None:
    client.update_collection(self.collection, metadata={'export_state': json.loads(
        state.to_json())}, **changes)

  def begin(self, model: str, dimension: int, state: ExportState, sample: Callable) -> None:
    from qdrant_client import models
    with self.client() as client:
      if self._metadata(client) is None:
        client.create_collection(
            self.collection,
            vectors_config={VECTOR: models.VectorParams(size=dimension,
                                                        distance=models.Distance.COSINE)},
            hnsw_config=models.HnswConfigDiff(m=0),
            metadata={'export_model': model, 'export_dimension': dimension})
      self._set_metadata(client, state)

  def delete_transform(self):
    return beam.ParDo(DeleteBatches(self))

  def delete(self, client, ids: List[int]) -> None:
    from qdrant_client import models
    client.delete(self.collection, points_selector=models.PointIdsList(points=ids))

  def write_transform(self, may_hold: bool):
    return beam.ParDo(WriteBatches(self, may_hold))

  def write(self, client, values: dict, may_hold: bool) -> None:
    """The batch's numpy vectors through upload_collection (a point's upsert is idempotent, so
    `may_hold` changes nothing); the graph is off during the load (m = 0)."""
    del may_hold
    client.upload_collection(
        self.collection, vectors={VECTOR: values['vector']}, ids=values['id'].tolist(),
        payload=[{name: values[name][n] for name in METADATA} for n in range(len(values['id']))],
        batch_size=self.batch_size, parallel=1, wait=True)

  def finish(self, state: ExportState) -> None:
    from qdrant_client import models
    with self.client() as client:
      self._set_metadata(client, state._replace(status=COMPLETE),
                         hnsw_config=models.HnswConfigDiff(m=HNSW_M))
