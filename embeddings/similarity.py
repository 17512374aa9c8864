"""Exact cosine similarity over blocks of vectors, one block in memory at a time.

A batch of queries is scored at once, block by block of stored vectors: one matrix product
[queries, dimension] x [dimension, block rows] divided by the block's row norms (no normalized
copy), and each query's running best (score, row id) kept by argpartition. The metadata of a row
is looked at only once it is among the best: excluded URIs are dropped from k + (number
excluded) candidates at the end, not checked row by row. A collection's blocks are its
embedding column alone, with the rows' ids (Lance reads ahead); the metadata of the few best is
taken by row id at the end (embeddings/neighbours.py).
"""

from typing import Callable, Collection, Dict, Iterable, List, NamedTuple, Optional, Sequence, \
    Tuple

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from embeddings.shards import Shard

BLOCK_ROWS = 4096  # rows scored at once: 70 MB of float32 at 4320-d


class Neighbour(NamedTuple):
  rank: int  # 1 is the nearest
  score: float  # cosine similarity to the query
  uri: str
  metadata: dict  # the row of run_format.METADATA_SCHEMA


class Block(NamedTuple):
  """Rows to score: their ids (a collection's row ids, or positions), float32 vectors, and
  their metadata when at hand (else it is asked for by id at the end)."""
  ids: np.ndarray  # int64 [rows]
  vectors: np.ndarray  # float32 [rows, dimension]
  metadata: Optional[pa.Table] = None  # run_format.METADATA_SCHEMA, one row per id


def unit_rows(vectors: np.ndarray) -> np.ndarray:
  """Rows scaled to length 1 (a zero row stays zero, so its cosine to anything is 0)."""
  norms = np.sqrt(np.einsum('ij,ij->i', vectors, vectors))
  return vectors / np.where(norms > 0, norms, 1)[:, np.newaxis]


def cosines(units: np.ndarray, block: np.ndarray) -> np.ndarray:
  """[queries, rows] cosines of unit query rows to the rows of `block`, normalizing the scores
  rather than the block (a zero row scores 0)."""
  norms = np.sqrt(np.einsum('ij,ij->i', block, block))
  scores = units @ block.T
  scores /= np.where(norms > 0, norms, 1)
  return scores


class _Best:
  """Each query's `keep` best (score, id) so far, as [queries, <= keep] arrays."""

  def __init__(self, queries: int, keep: int):
    self.keep = keep
    self.scores = np.zeros((queries, 0), np.float32)
    self.ids = np.zeros((queries, 0), np.int64)

  def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
    if scores.shape[1] > self.keep:
      top = np.argpartition(-scores, self.keep - 1, axis=1)[:, :self.keep]
      scores = np.take_along_axis(scores, top, axis=1)
    else:
      top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    self.scores = np.concatenate([self.scores, scores], axis=1)
    self.ids = np.concatenate([self.ids, ids[top]], axis=1)
    if self.scores.shape[1] > self.keep:
      top = np.argpartition(-self.scores, self.keep - 1, axis=1)[:, :self.keep]
      self.scores = np.take_along_axis(self.scores, top, axis=1)
      self.ids = np.take_along_axis(self.ids, top, axis=1)

  def ordered(self, query: int) -> List[Tuple[float, int]]:
    """(score, id) best first."""
    order = np.argsort(-self.scores[query], kind='stable')
    return [(float(self.scores[query, i]), int(self.ids[query, i])) for i in order]

  def ids_among(self, ids: np.ndarray) -> np.ndarray:
    return np.intersect1d(np.unique(self.ids), ids)


def nearest_many(blocks: Iterable[Block], queries: np.ndarray, k: int,
                 exclude_uris: Sequence[Collection[str]] = (),
                 metadata_of: Optional[Callable[[np.ndarray], pa.Table]] = None
                 ) -> List[List[Neighbour]]:
  """Each query row's k most cosine-similar rows, as a list of Neighbours per query.

  `blocks`: Blocks; the metadata of the best rows of a block without any is `metadata_of(ids)`
  (rows in that order) at the end. `exclude_uris`: per query, URIs left out of its answer.
  Memory: one block, and k + (most excluded) rows per query.
  """
  if k < 1:
    raise ValueError(f'k must be at least 1, not {k}')
  queries = np.atleast_2d(np.asarray(queries, np.float32))
  units = unit_rows(queries)
  excluded = [set(e) for e in exclude_uris] + [set()] * (len(queries) - len(exclude_uris))
  best = _Best(len(queries), k + max((len(e) for e in excluded), default=0))
  resolved: Dict[int, dict] = {}  # id: metadata row
  # One BLAS thread: the products are small, and OpenBLAS's idle threads spin on the cores the
  # readers decode on (measured: 25.2 -> 20.4 s per million float32 vectors on 2 cores).
  with threadpool_limits(limits=1, user_api='blas'):
    for block in blocks:
      if not len(block.ids):
        continue
      ids = np.asarray(block.ids, np.int64)
      best.add(cosines(units, block.vectors), ids)
      if block.metadata is not None:
        # Its candidates are known once it is scored: their metadata is taken now.
        wanted = best.ids_among(ids)
        order = np.argsort(ids, kind='stable')
        positions = order[np.searchsorted(ids, wanted, sorter=order)]
        for row_id, row in zip(wanted.tolist(),
                               block.metadata.take(pa.array(positions)).to_pylist()):
          resolved[row_id] = row
  missing = np.array(sorted(set(best.ids.ravel().tolist()) - set(resolved)), np.int64)
  if len(missing):
    if metadata_of is None:
      raise ValueError('blocks without metadata need metadata_of')
    resolved.update(zip(missing.tolist(), metadata_of(missing).to_pylist()))
  return [_neighbours(best.ordered(q), resolved, excluded[q], k) for q in range(len(queries))]


def _neighbours(candidates: List[Tuple[float, int]], resolved: Dict[int, dict],
                excluded: Collection[str], k: int) -> List[Neighbour]:
  found = []
  for score, row_id in candidates:
    metadata = resolved[row_id]
    if metadata['uri'] in excluded:
      continue
    found.append(Neighbour(len(found) + 1, cosine_value(score), metadata['uri'], metadata))
    if len(found) == k:
      break
  return found


def shard_blocks(shards: Iterable[Shard]) -> Iterable[Block]:
  """Shards (a run's, or batches of a collection) as Blocks numbered by position."""
  first = 0
  for shard in shards:
    yield Block(np.arange(first, first + len(shard.uris)), shard.vectors, shard.metadata)
    first += len(shard.uris)


def nearest(shards: Iterable[Shard], query: np.ndarray, k: int,
            exclude_uris: Collection[str] = ()) -> List[Neighbour]:
  """The k rows most cosine-similar to `query`; memory: one shard plus k rows."""
  return nearest_many(shard_blocks(shards), np.asarray(query)[np.newaxis], k, [exclude_uris])[0]


def cosine_value(score: float) -> float:
  """A cosine as reported: float32 rounding can reach 1.000001 for identical vectors."""
  return float(min(max(score, -1.0), 1.0))
