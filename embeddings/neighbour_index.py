"""The approximate-neighbour index over runs (FAISS): its plan, its directory and its reader.

`python -m embeddings.index` builds and extends it (the Beam job: jobs/index_build.py);
`NeighbourIndex` opens it for queries.

The index type follows the number of vectors and the memory budget, as autofaiss chooses: an
exhaustive list below 10k vectors (results equal exact search), IVF-Flat while the full vectors
fit the budget, above that a PCA to 4m dimensions with a random rotation (which spreads the
variance evenly over the PQ's sub-vectors, as OPQ does at a small fraction of OPQ's training time
at 4320 dimensions) and IVF-PQ with m bytes a vector (64 when it fits: 72 bytes with its id). Always IVF, so that the index can be
memory-mapped and vectors removed and added without retraining (HNSW allows neither).
`add` encodes a night's runs with the trained quantizers, replaces the vectors of URIs embedded
again, and measures recall@10 on the probe set held back at build time: below --min_recall it
says to rebuild.

The index directory (see INDEX_FILE, IDS_FILE, ...):
    index.json     model id, embedding size, runs covered, the plan and its parameters, counts,
                   probe recall, FAISS version
    index.faiss    the FAISS index (unit vectors, L2: 2 - 2 cosine), read memory-mapped
    trained.faiss  the same index with no vectors (what `add` encodes with)
    ids.parquet    FAISS id -> uri, the shard and row holding its stored vector, and the shard
                   metadata columns (sha256, width, height, run, ...)
    probes.npz     the probe vectors, their ids and their exact nearest ids and cosines
"""

import datetime
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from embeddings import faiss_util, storage
from embeddings.runs import MixedModelsError, Run, find_runs
from embeddings.similarity import READERS, Neighbour, cosine_value, unit_rows

INDEX_FILE = 'index.json'
FAISS_FILE = 'index.faiss'
TRAINED_FILE = 'trained.faiss'
IDS_FILE = 'ids.parquet'
PROBES_FILE = 'probes.npz'
FORMAT_VERSION = 1

EXHAUSTIVE_BELOW = 10_000  # vectors: one list scanned whole, i.e. exact search
PQ_BYTES = (64, 48, 32, 16, 8)  # bytes a vector, best first; 4 PCA dimensions per byte
ID_BYTES = 8
PCA_SAMPLE = 20_000  # vectors to train the PCA on
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
PROBES = 100
PROBE_NEIGHBOURS = 50  # exact neighbours kept per probe: enough to survive replaced URIs
RECALL_K = 10
ROW_BITS = 24  # ids are shard number << ROW_BITS | row: up to 16M rows a shard


class IndexError_(ValueError):  # pylint: disable=invalid-name; IndexError is Python's
  """The index directory is missing, of another model, or cannot take these runs."""


class IndexPlan(NamedTuple):
  kind: str  # 'exhaustive', 'ivf_flat' or 'ivf_pq'
  factory: str  # FAISS index_factory string, after the PCA if any
  pca_dimension: Optional[int]  # PCA output size, None for no PCA
  lists: int
  nprobe: int  # lists searched by default
  bytes_per_vector: int  # codes plus id, as held in memory
  train_sample: int  # vectors to train the lists and codes on

  def to_json(self) -> dict:
    return self._asdict()


def _power_of_two_near(value: float) -> int:
  return int(2 ** round(np.log2(max(value, 1))))


def choose_plan(count: int, dimension: int, memory_budget: int) -> IndexPlan:
  """The index for `count` vectors of `dimension` that fits `memory_budget` bytes."""
  if count < EXHAUSTIVE_BELOW:
    return IndexPlan('exhaustive', 'IVF1,Flat', None, 1, 1, 4 * dimension + ID_BYTES, count)
  lists = min(65_536, max(64, _power_of_two_near(4 * np.sqrt(count))))
  train_sample = min(count, TRAIN_POINTS_PER_LIST * lists)
  flat_bytes = 4 * dimension + ID_BYTES
  if count * flat_bytes <= memory_budget:
    return IndexPlan('ivf_flat', f'IVF{lists},Flat', None, lists, max(1, lists // 16),
                     flat_bytes, min(train_sample, memory_budget // 4 // (4 * dimension)))
  lists = max(lists, 256)
  for pq_bytes in PQ_BYTES:
    if count * (pq_bytes + ID_BYTES) <= memory_budget and 4 * pq_bytes <= dimension:
      return IndexPlan('ivf_pq', f'IVF{lists},PQ{pq_bytes}', 4 * pq_bytes, lists,
                       max(1, lists // 32), pq_bytes + ID_BYTES,
                       min(count, TRAIN_POINTS_PER_LIST * lists))
  raise ValueError(f'{count} vectors need at least {count * (PQ_BYTES[-1] + ID_BYTES)} bytes; '
                   f'raise --memory_budget')


def new_index(plan: IndexPlan, dimension: int, pca=None):
  """An untrained index for the plan (`pca`: the trained PCA's projection when the plan has one)."""
  faiss = faiss_util.faiss()
  inner_dimension = plan.pca_dimension or dimension
  inner = faiss.index_factory(inner_dimension, plan.factory, faiss.METRIC_L2)
  return faiss.IndexPreTransform(pca, inner) if pca is not None else inner


def ivf_of(index):
  return faiss_util.faiss().extract_index_ivf(index)


def shard_id_base(number: int) -> int:
  return number << ROW_BITS


class Covered(NamedTuple):
  """A run the index holds, and the shard numbers its ids were made from."""
  path: str
  finished_at: str
  first_shard: int
  shards: int


def write_json(path: str, content: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=2)
  os.replace(path + '.tmp', path)


def read_description(directory: str) -> dict:
  path = os.path.join(directory, INDEX_FILE)
  if storage.is_remote(directory):
    raise IndexError_(f'{directory}: the index directory must be on the local disk (FAISS '
                      f'memory-maps it); copy it here first')
  if not os.path.isfile(path):
    raise IndexError_(f'{directory}: no {INDEX_FILE}, so not an index directory written by '
                      f'`python -m embeddings.index build`')
  with open(path) as f:
    return json.load(f)


class NeighbourIndex:
  """An index directory opened for queries: FAISS memory-maps the lists, so opening is cheap
  and only the lists a query probes are read."""

  def __init__(self, directory: str, mmap: bool = True):
    import pyarrow.parquet as pq
    faiss = faiss_util.faiss()
    self.directory = directory
    self.description = read_description(directory)
    self.model = self.description['model']
    self.dimension = self.description['embedding_size']
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    self.index = faiss.read_index(os.path.join(directory, FAISS_FILE), flags)
    # One chunk: a row looked up by position costs a search through the chunks otherwise.
    self.ids = pq.read_table(os.path.join(directory, IDS_FILE)).combine_chunks()
    self._id_column = self.ids.column('id').to_numpy()
    if len(self._id_column) > 1 and np.any(np.diff(self._id_column) <= 0):
      raise IndexError_(f'{directory}: {IDS_FILE} is not sorted by id')
    self.nprobe = self.description['plan']['nprobe']

  @property
  def count(self) -> int:
    return self.index.ntotal

  def check_model(self, model: Optional[str]) -> None:
    if model is not None and model != self.model:
      raise MixedModelsError(f'the query was embedded with {model}, but the index at '
                             f'{self.directory} holds {self.model} embeddings: their similarities '
                             f'mean nothing')

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Positions in the ids table of FAISS ids."""
    positions = np.searchsorted(self._id_column, ids)
    positions = np.minimum(positions, len(self._id_column) - 1)
    if len(ids) and not np.array_equal(self._id_column[positions], ids):
      raise IndexError_(f'{self.directory}: ids in {FAISS_FILE} missing from {IDS_FILE}')
    return positions

  def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The runs' stored float32 vectors of `ids`, reading only the row groups that hold them,
    READERS shards at a time (Arrow decodes without the GIL)."""
    positions = self.rows(ids)
    shards = np.array(self.ids.column('shard').take(positions).to_pylist(), dtype=object)
    rows = self.ids.column('row').to_numpy()[positions]
    vectors = np.zeros((len(ids), self.dimension), np.float32)
    places = [np.flatnonzero(shards == shard) for shard in sorted(set(shards))]
    with ThreadPoolExecutor(READERS) as pool:
      for mine, found in zip(places, pool.map(
          lambda mine: faiss_util.read_rows(shards[mine[0]], rows[mine]), places)):
        vectors[mine] = found
    return vectors

  def search_ids(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple:
    """(cosine [q, k], ids [q, k]) straight from FAISS; id -1 where fewer than k exist."""
    faiss = faiss_util.faiss()
    queries = np.ascontiguousarray(unit_rows(np.asarray(queries, np.float32)))
    parameters = faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe)
    distances, ids = self.index.search(queries, k, params=parameters)
    return faiss_util.cosine_from_l2(distances), ids

  def search(self, queries: np.ndarray, k: int, model: Optional[str] = None,
             rerank: int = 0, nprobe: Optional[int] = None,
             exclude_uris: Sequence[Sequence[str]] = ()) -> List[List[Neighbour]]:
    """The k nearest neighbours of each query row. `model`: the queries' model id, refused if it
    is not the index's. `rerank`: when > k, that many candidates are rescored exactly from the
    runs' stored vectors (scores are then exact cosines). `exclude_uris`: per query, URIs to
    leave out (e.g. the query itself)."""
    self.check_model(model)
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != self.dimension:
      raise MixedModelsError(f'queries are {queries.shape[1]}-d, the index holds '
                             f'{self.dimension}-d vectors')
    extra = max((len(e) for e in exclude_uris), default=0)
    scores, ids = self.search_ids(queries, max(k, rerank) + extra, nprobe)
    uris = self.ids.column('uri')
    kept = []
    for number, (row_scores, row_ids) in enumerate(zip(scores, ids)):
      keep = row_ids >= 0
      if number < len(exclude_uris) and exclude_uris[number]:
        excluded = set(exclude_uris[number])
        keep &= np.array([i < 0 or uris[int(p)].as_py() not in excluded
                          for i, p in zip(row_ids, self.rows(np.maximum(row_ids, 0)))], bool)
      kept.append((row_scores[keep], row_ids[keep]))
    if rerank > k:
      kept = self._rerank(queries, kept)
    results = []
    for row_scores, row_ids in kept:
      rows = self.ids.take(self.rows(row_ids[:k])).to_pylist()
      results.append([Neighbour(rank, cosine_value(score), row['uri'], row)
                      for rank, (score, row) in enumerate(zip(row_scores[:k], rows), 1)])
    return results

  def _rerank(self, queries: np.ndarray, candidates: List[tuple]) -> List[tuple]:
    """Exact cosines of every query's candidates, from the stored vectors, each read once for
    the whole batch."""
    every = np.unique(np.concatenate([ids for _, ids in candidates] + [np.zeros(0, np.int64)]))
    stored = unit_rows(self.stored_vectors(every))
    unit_queries = unit_rows(queries)
    reranked = []
    for query, (_, ids) in zip(unit_queries, candidates):
      exact = stored[np.searchsorted(every, ids)] @ query
      order = np.argsort(-exact, kind='stable')
      reranked.append((exact[order], ids[order]))
    return reranked

  def runs(self) -> List[Run]:
    """The covered runs (e.g. to embed a new query with their model)."""
    return find_runs([c['path'] for c in self.description['runs']])


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
  """Mean over queries of |found top-k ∩ exact top-k| / k (ids; -1 never counts)."""
  hits = [len(set(f[:k].tolist()) & (set(e[:k].tolist()) - {-1})) for f, e in zip(found, exact)]
  return float(np.mean(hits) / k) if hits else float('nan')


def probe_recall(index, probes: Dict[str, np.ndarray], nprobe: int) -> float:
  """recall@10 of the index on its probe set, against the probes' exact neighbours (each
  probe's own vector left out)."""
  faiss = faiss_util.faiss()
  if not len(probes['ids']):
    return float('nan')
  _, found = index.search(np.ascontiguousarray(probes['vectors']), RECALL_K + 1,
                          params=faiss.SearchParametersIVF(nprobe=nprobe))
  found = [row[row != own][:RECALL_K] for row, own in zip(found, probes['ids'])]
  return recall_at(np.array(found), probes['exact_ids'])


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
