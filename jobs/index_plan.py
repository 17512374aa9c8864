"""The neighbour index's plan: the FAISS index a build makes for the number of vectors and the
memory budget, as autofaiss chooses.

An exhaustive list below 10k vectors (results equal exact search); HNSW32 over the full vectors
(float16-rounded, as the pieces carry them) while they and the graph fit the budget (no
training, no lists to probe); above that IVF-PQ with the largest code that fits (after a PCA to
4m dimensions with a random rotation, which spreads the variance evenly over the PQ's
sub-vectors, as OPQ does at a small fraction of OPQ's training time at 4320 dimensions), its
coarse quantizer an HNSW graph from 1,024 lists on. A PQ index's candidates are re-ranked from
the refine store beside it (embeddings/neighbour_index.py).
"""

from typing import NamedTuple, Optional

import numpy as np

from embeddings import faiss_util

EXHAUSTIVE_BELOW = 10_000  # vectors: one list scanned whole, i.e. exact search
HNSW_LINKS = 32  # M: links a node, 2M on the bottom layer
HNSW_EF_SEARCH = 128  # candidates kept while walking the graph (the HNSW plan's "nprobe")
HNSW_QUANTIZER_FROM = 1_024  # lists: from here the coarse quantizer is an HNSW graph
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 16, 8)  # bytes a vector, best first; 4 PCA dims a byte
ID_BYTES = 8
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39


class BudgetTooSmallError(ValueError):
  """No index of these vectors fits --memory_budget: refused before any vector is encoded."""


class IndexPlan(NamedTuple):
  kind: str  # 'exhaustive', 'hnsw' or 'ivf_pq'
  factory: str  # FAISS index_factory string, after the PCA if any
  pca_dimension: Optional[int]  # PCA output size, None for no PCA
  lists: int  # IVF lists (0 for HNSW)
  nprobe: int  # searched by default: IVF lists, or HNSW's efSearch
  bytes_per_vector: int  # codes (or vector and links) plus id, as held in memory
  train_sample: int  # vectors to train the lists and codes on

  def to_json(self) -> dict:
    return self._asdict()


def _power_of_two_near(value: float) -> int:
  return int(2 ** round(np.log2(max(value, 1))))


def hnsw_bytes(dimension: int) -> int:
  """A vector in an HNSW32 index: the float32 vector, 2M bottom-layer links, its id, its level."""
  return 4 * dimension + 2 * HNSW_LINKS * 4 + ID_BYTES + 4


def choose_plan(count: int, dimension: int, memory_budget: int) -> IndexPlan:
  """The index for `count` vectors of `dimension` that fits `memory_budget` bytes."""
  if count < EXHAUSTIVE_BELOW:
    return IndexPlan('exhaustive', 'IVF1,Flat', None, 1, 1, 4 * dimension + ID_BYTES, count)
  if count * hnsw_bytes(dimension) <= memory_budget:
    return IndexPlan('hnsw', f'HNSW{HNSW_LINKS},Flat', None, 0, HNSW_EF_SEARCH,
                     hnsw_bytes(dimension), 0)
  lists = min(65_536, max(256, _power_of_two_near(4 * np.sqrt(count))))
  quantizer = f'_HNSW{HNSW_LINKS}' if lists >= HNSW_QUANTIZER_FROM else ''
  for pq_bytes in PQ_BYTES:
    centroids = lists * 4 * pq_bytes * 4 + (hnsw_bytes(4 * pq_bytes) if quantizer else 0)
    if count * (pq_bytes + ID_BYTES) + centroids <= memory_budget and 4 * pq_bytes <= dimension:
      return IndexPlan('ivf_pq', f'IVF{lists}{quantizer},PQ{pq_bytes}', 4 * pq_bytes, lists,
                       max(1, lists // 32), pq_bytes + ID_BYTES,
                       min(count, TRAIN_POINTS_PER_LIST * lists))
  raise BudgetTooSmallError(f'{count} vectors need at least '
                            f'{count * (PQ_BYTES[-1] + ID_BYTES)} bytes; raise --memory_budget')


def new_index(plan: IndexPlan, dimension: int, pca=None):
  """An untrained index for the plan (`pca`: the trained PCA's projection when the plan has one).
  HNSW holds vectors by position: an IndexIDMap gives them the index's ids."""
  faiss = faiss_util.faiss()
  inner_dimension = plan.pca_dimension or dimension
  inner = faiss.index_factory(inner_dimension, plan.factory, faiss.METRIC_L2)
  if plan.kind == 'hnsw':
    return faiss.IndexIDMap(inner)
  return faiss.IndexPreTransform(pca, inner) if pca is not None else inner


def ivf_of(index):
  """The IVF index inside `index` (under its PCA, if any)."""
  return faiss_util.faiss().extract_index_ivf(index)
