"""Tiny collections for the followers' tests (export, neighbour index), made as a night makes
them (collection.write_fragment, then collection.commit_night), in milliseconds."""

from typing import Dict, Optional, Sequence

import numpy as np

import collection
from benchmarks.synthetic_collection import collection_table

MODEL = 'builtin:test@untrained-seed0'


def vectors_of(uris: Sequence[str], dimension: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).random((len(uris), dimension), dtype=np.float32)


def night(uri: str, run: str, embedded: Dict[str, np.ndarray] = None,
          gone: Sequence[str] = (), dimension: int = 8, model: str = MODEL,
          embedding_dtype: str = 'float32') -> int:
  """Commits a night to the collection at `uri` (created first if missing): `embedded`, URI ->
  its new vector (a new or changed file: a changed file's old row is removed), `gone`, URIs whose
  rows are removed (deleted files, failed new versions). Returns the new version."""
  try:
    current = collection.open_collection(uri)
  except collection.CollectionNotFoundError:
    current = collection.create(uri, model, dimension, embedding_dtype)
  embedded = embedded or {}
  replaced = list(embedded) + list(gone)
  found = current.lookup(replaced, []) if replaced else None
  removed = [(-1, int(row_id)) for row_id in found.column('_rowid').to_pylist()] if found else []
  fragments = []
  if embedded:
    fragments = collection.write_fragment(uri, collection_table(
        list(embedded), np.stack(list(embedded.values())), current.model, run,
        current.embedding_dtype), current.storage_options)
  return collection.commit_night(uri, collection.NightChanges(run, current.version, fragments,
                                                              removed))


def rows_of(uri: str, version: Optional[int] = None) -> dict:
  """Row id -> (uri, sha256, height, width, model, run, float32 vector) of a version."""
  found = {}
  for batch in collection.open_collection(uri, version).batches(
      ['uri', 'sha256', 'height', 'width', 'model', 'run', 'embedding'], with_row_id=True):
    columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    vectors = np.asarray(columns['embedding'], np.float32)
    for row, row_id in enumerate(columns['_rowid']):
      found[row_id] = tuple(columns[name][row] for name in (
          'uri', 'sha256', 'height', 'width', 'model', 'run')) + (vectors[row],)
  return found
