"""Exact cosine similarity over shards, one block of vectors in memory at a time.

A batch of queries is scored at once, block by block of stored vectors: one matrix product
[queries, dimension] x [dimension, block rows] divided by the block's row norms (no normalized
copy), and each query's running best kept by argpartition. The metadata of a row is looked at
only once it is among the best: excluded URIs are dropped from k + (number excluded)
candidates at the end, not checked row by row. Parquet shards are read a block of row groups at
a time, embedding column only, by a few threads ahead of the scoring (Arrow decodes and BLAS
multiplies without holding the GIL; BLAS in one thread, leaving the cores to the readers).
"""

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection, Dict, Iterable, Iterator, List, NamedTuple, Optional, \
    Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from embeddings.shards import Shard

BLOCK_ROWS = 4096  # rows scored at once: 70 MB of float32 at 4320-d
READERS = 2  # Parquet blocks read ahead in parallel


class Neighbour(NamedTuple):
  rank: int  # 1 is the nearest
  score: float  # cosine similarity to the query
  uri: str
  metadata: dict  # the row of run_format.METADATA_SCHEMA


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
  """Each query's `keep` best (score, source, row) so far, as [queries, <= keep] arrays."""

  def __init__(self, queries: int, keep: int):
    self.keep = keep
    self.scores = np.zeros((queries, 0), np.float32)
    self.sources = np.zeros((queries, 0), np.int32)
    self.rows = np.zeros((queries, 0), np.int64)

  def add(self, scores: np.ndarray, source: int, first_row: int) -> None:
    if scores.shape[1] > self.keep:
      top = np.argpartition(-scores, self.keep - 1, axis=1)[:, :self.keep]
      scores = np.take_along_axis(scores, top, axis=1)
    else:
      top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    self.scores = np.concatenate([self.scores, scores], axis=1)
    self.sources = np.concatenate([self.sources, np.full(top.shape, source, np.int32)], axis=1)
    self.rows = np.concatenate([self.rows, top + first_row], axis=1)
    if self.scores.shape[1] > self.keep:
      top = np.argpartition(-self.scores, self.keep - 1, axis=1)[:, :self.keep]
      self.scores, self.sources, self.rows = (np.take_along_axis(a, top, axis=1) for a in (
          self.scores, self.sources, self.rows))

  def ordered(self, query: int) -> List[Tuple[float, int, int]]:
    """(score, source, row) best first, leaving out rows scored -inf (not in the collection)."""
    order = np.argsort(-self.scores[query], kind='stable')
    return [(float(self.scores[query, i]), int(self.sources[query, i]), int(self.rows[query, i]))
            for i in order if np.isfinite(self.scores[query, i])]

  def wanted_rows(self, source: int) -> np.ndarray:
    return np.unique(self.rows[self.sources == source])


# A unit of reading: (source number, first row, the float32 block or a call that reads it).
_Task = Tuple[int, int, Union[np.ndarray, Callable[[], np.ndarray]]]


def _read_ahead(tasks: Iterator[_Task], readers: int) -> Iterator[Tuple[int, int, np.ndarray]]:
  """The tasks' blocks in order, up to `readers` calls run ahead by threads; a block already in
  memory (a Shard's) is passed on once those before it are."""
  with ThreadPoolExecutor(readers) as pool:
    pending = collections.deque()
    for number, first_row, block in tasks:
      if not callable(block):
        while pending:
          yield pending[0][0], pending[0][1], pending.popleft()[2].result()
        yield number, first_row, block
        del block  # before the next task is made: one Shard at a time
        continue
      pending.append((number, first_row, pool.submit(block)))
      if len(pending) > readers:
        yield pending[0][0], pending[0][1], pending.popleft()[2].result()
    while pending:
      yield pending[0][0], pending[0][1], pending.popleft()[2].result()


def nearest_many(sources: Iterable, queries: np.ndarray, k: int,
                 exclude_uris: Sequence[Collection[str]] = (), block_rows: int = BLOCK_ROWS,
                 readers: int = READERS) -> List[List[Neighbour]]:
  """Each query row's k most cosine-similar rows, as a list of Neighbours per query.

  `sources`: Shards, or runs.KeptVectors (Parquet shards read by parts) as
  runs.iter_run_vectors gives them. `exclude_uris`: per query, URIs left out of its answer.
  Memory: one Shard, or `readers` + 1 blocks of `block_rows`; and k + (most excluded) rows per
  query.
  """
  if k < 1:
    raise ValueError(f'k must be at least 1, not {k}')
  queries = np.atleast_2d(np.asarray(queries, np.float32))
  units = unit_rows(queries)
  excluded = [set(e) for e in exclude_uris] + [set()] * (len(queries) - len(exclude_uris))
  best = _Best(len(queries), k + max((len(e) for e in excluded), default=0))
  resolved: Dict[int, Tuple[np.ndarray, Optional[pa.Table]]] = {}  # source: (rows, metadata)
  parquet: Dict[int, object] = {}  # source: the ParquetVectors whose metadata is read at the end
  keeps: Dict[int, Optional[np.ndarray]] = {}

  def tasks() -> Iterator[_Task]:
    for number, source in enumerate(sources):
      if isinstance(source, Shard):
        metadata, vectors = source.metadata, source.vectors
        source = None  # the next Shard is read without this one
        yield number, 0, vectors
        del vectors
        # Its candidates are known once it is scored: their metadata is taken now.
        rows = best.wanted_rows(number)
        resolved[number] = (rows, metadata.take(pa.array(rows)))
        del metadata
        continue
      parquet[number], keeps[number] = source.shard, source.keep
      for first_row, groups in source.shard.blocks(block_rows):
        yield number, first_row, lambda shard=source.shard, groups=groups: shard.vectors(groups)

  # One BLAS thread: the products are small, and OpenBLAS's idle threads spin on the cores the
  # readers decode on (measured: 25.2 -> 20.4 s per million float32 vectors on 2 cores).
  with threadpool_limits(limits=1, user_api='blas'):
    for number, first_row, block in _read_ahead(tasks(), readers):
      scores = cosines(units, block)
      keep = keeps.get(number)
      if keep is not None:
        scores[:, ~keep[first_row:first_row + len(block)]] = -np.inf
      best.add(scores, number, first_row)
      del block, scores
  for number, shard in parquet.items():
    rows = best.wanted_rows(number)
    resolved[number] = (rows, shard.metadata(rows) if len(rows) else None)
  return [_neighbours(best.ordered(q), resolved, excluded[q], k) for q in range(len(queries))]


def _neighbours(candidates: List[Tuple[float, int, int]], resolved: dict,
                excluded: Collection[str], k: int) -> List[Neighbour]:
  found = []
  for score, source, row in candidates:
    rows, table = resolved[source]
    metadata = table.slice(int(np.searchsorted(rows, row)), 1).to_pylist()[0]
    if metadata['uri'] in excluded:
      continue
    found.append(Neighbour(len(found) + 1, cosine_value(score), metadata['uri'], metadata))
    if len(found) == k:
      break
  return found


def nearest(shards: Iterable[Shard], query: np.ndarray, k: int,
            exclude_uris: Collection[str] = ()) -> List[Neighbour]:
  """The k rows most cosine-similar to `query`; memory: one shard plus k rows."""
  return nearest_many(shards, np.asarray(query)[np.newaxis], k, [exclude_uris])[0]


def cosine_value(score: float) -> float:
  """A cosine as reported: float32 rounding can reach 1.000001 for identical vectors."""
  return float(min(max(score, -1.0), 1.0))
