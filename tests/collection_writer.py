"""Writes small collections directly (collection.create, write_fragment, commit_night), as a night
commits them, so reader tests need no pipeline."""

import datetime
import hashlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

import collection
from collection.table import schema
from run_format import EMBEDDING, RUN_COLUMN

MODEL = 'builtin:test@untrained-seed0'
RECIPE = 'compute_dtype=float32;center_crop_fraction=1.0;jpeg_draft=0'


class Row(NamedTuple):
  uri: str
  embedding: np.ndarray
  sha256: str = ''
  height: int = 10
  width: int = 20
  size_bytes: Optional[int] = 1234


def rows(uris: Sequence[str], dimension: int, seed: int) -> List[Row]:
  rng = np.random.default_rng(seed)
  return [Row(uri, rng.standard_normal(dimension).astype(np.float32),
              hashlib.sha256(f'{uri}{seed}'.encode()).hexdigest()) for uri in uris]


def table(night_rows: Sequence[Row], run: str, model: str = MODEL,
          embedding_dtype: str = 'float32') -> pa.Table:
  dimension = len(night_rows[0].embedding)
  table_schema = schema(model, dimension, embedding_dtype)
  count = len(night_rows)
  now = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
  values: Dict[str, list] = {
      'uri': [r.uri for r in night_rows], 'sha256': [r.sha256 for r in night_rows],
      'height': [r.height for r in night_rows], 'width': [r.width for r in night_rows],
      'size_bytes': [r.size_bytes for r in night_rows], 'last_modified': [now] * count,
      'model': [model] * count, 'weights': ['untrained'] * count, 'recipe': [RECIPE] * count,
      'pipeline_version': ['test'] * count, RUN_COLUMN: [run] * count,
      'embedded_at': [now] * count}
  vectors = np.stack([r.embedding for r in night_rows]).astype(embedding_dtype)
  arrays = []
  for field in table_schema:
    if field.name == EMBEDDING:
      arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), type=field.type))
    elif field.name in values:
      arrays.append(pa.array(values[field.name], field.type))
    else:
      arrays.append(pa.nulls(count, field.type))
  return pa.Table.from_arrays(arrays, schema=table_schema)


def commit(uri: str, night_rows: Sequence[Row], run: str, gone: Sequence[str] = (),
           model: str = MODEL, embedding_dtype: str = 'float32') -> int:
  """One night: `night_rows` replace the rows of their URIs, `gone` URIs lose theirs; creates
  the collection first if needed. The new version."""
  try:
    snapshot = collection.open_collection(uri)
  except collection.CollectionNotFoundError:
    dimension = len(night_rows[0].embedding)
    snapshot = collection.create(uri, model, dimension, embedding_dtype)
  replaced = [r.uri for r in night_rows] + list(gone)
  removed = []
  if replaced and snapshot.num_rows:
    found = snapshot.lookup(replaced, ['uri'])
    ids = set(found.column('_rowid').to_pylist())
    for fragment_id in (snapshot.fragment_ids() if ids else []):
      for batch in snapshot.fragment_batches(fragment_id, ['uri']):
        removed += [(fragment_id, row_id) for row_id in batch.column('_rowid').to_pylist()
                    if row_id in ids]
  fragments = (collection.write_fragment(uri, table(night_rows, run, model, embedding_dtype),
                                         collection.storage_options(uri))
               if night_rows else [])
  return collection.commit_night(uri, collection.NightChanges(run, snapshot.version, fragments,
                                                              removed))
