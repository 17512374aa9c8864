"""Exact cosine similarity over shards, one shard in memory at a time."""

from typing import Collection, Iterable, List, NamedTuple

import numpy as np

from embeddings.shards import Shard


class Neighbour(NamedTuple):
  rank: int  # 1 is the nearest
  score: float  # cosine similarity to the query
  uri: str
  metadata: dict  # the row of run_format.METADATA_SCHEMA


def unit_rows(vectors: np.ndarray) -> np.ndarray:
  """Rows scaled to length 1 (a zero row stays zero, so its cosine to anything is 0)."""
  norms = np.sqrt(np.einsum('ij,ij->i', vectors, vectors))
  return vectors / np.where(norms > 0, norms, 1)[:, np.newaxis]


def nearest(shards: Iterable[Shard], query: np.ndarray, k: int,
            exclude_uris: Collection[str] = ()) -> List[Neighbour]:
  """The k rows most cosine-similar to `query`; memory: one shard plus k rows."""
  query = unit_rows(np.asarray(query, np.float32)[np.newaxis])[0]
  best_scores = np.zeros(0, np.float32)
  best_rows: List[tuple] = []
  for shard in shards:
    scores = unit_rows(shard.vectors) @ query
    if exclude_uris:
      scores[[u in exclude_uris for u in shard.uris]] = -np.inf
    top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    top = top[np.isfinite(scores[top])]
    rows = shard.metadata.take(top).to_pylist()
    best_scores = np.concatenate([best_scores, scores[top]])
    best_rows += [(row['uri'], row) for row in rows]
    order = np.argsort(-best_scores, kind='stable')[:k]
    best_scores = best_scores[order]
    best_rows = [best_rows[i] for i in order]
  return [Neighbour(rank, float(score), uri, row)
          for rank, (score, (uri, row)) in enumerate(zip(best_scores, best_rows), 1)]
