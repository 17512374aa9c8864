"""The approximate-neighbour index over runs (FAISS): its directory and its reader.

`pnasnet-embeddings index` builds and extends it (the Beam job: jobs/index_build.py, its plan
jobs/index_plan.py); `NeighbourIndex` opens it for queries.

An index is an exhaustive list (exact search), HNSW32 over the full vectors, or IVF-PQ after a
PCA. Beside every index, a refine store: each vector in float16, memory-mapped by id, from which
the candidates of a PQ index are re-ranked (a read of 2 x dimension bytes a candidate, not a
Parquet row group). Every index follows the collection's rule (`embeddings.load`: the newest run
wins; a file the newest run did not match, or failed on, has no vector), after an `add` too.

The index directory (see INDEX_FILE, FAISS_FILE, ...):
    index.json     model id, embedding size, runs covered, the plan and its parameters, counts,
                   probe recall and list imbalance at build and after the last add, the
                   nprobe chosen at build and the probes' recall and latency at each nprobe
                   tried, FAISS version
    index.faiss    the FAISS index (unit vectors, L2: 2 - 2 cosine); IVF lists in index.ivfdata
    index.ivfdata  the IVF lists, memory-mapped (FAISS OnDiskInvertedLists)
    trained.faiss  the trained index with no vectors (what `add` encodes with)
    ids.arrow      FAISS id -> uri, its row in vectors.f16, the shard and row of its stored
                   vector, and the shard metadata columns (sha256, width, height, run, ...):
                   an Arrow IPC file sorted by id, in uncompressed record batches of
                   IDS_BATCH_ROWS rows, memory-mapped: a result's row is read in place (a Parquet
                   row group of 4,096 rows took 14 ms to decode here, an LZ4 batch 0.4-0.7 ms); about
                   390 bytes a row, 5% of the refine store's 8,640
    faiss_ids.i64  the FAISS id of each ids.arrow row (int64, raw, sorted, memory-mapped)
    vector_rows.i64  each ids.arrow row's row in vectors.f16 (int64, raw, memory-mapped)
    lookup-uri.u64, lookup-sha256.u64  a URI's (a SHA-256's) ids.arrow rows: the values' 64-bit
                   keys sorted, then the rows in the same order (raw, memory-mapped), so finding
                   a value is a binary search whatever the index's size
    vectors.f16    the refine store: float16 unit vectors [rows, dimension], raw, memory-mapped
    probes.npz     the probe vectors, their ids and their exact nearest ids and cosines
"""

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np

import storage
from embeddings import faiss_util
from embeddings.similarity import READERS, Neighbour, cosine_value, unit_rows
from storage.run_dirs import MixedModelsError, Run, find_runs

INDEX_FILE = 'index.json'
FAISS_FILE = 'index.faiss'
IVFDATA_FILE = 'index.ivfdata'
TRAINED_FILE = 'trained.faiss'
IDS_FILE = 'ids.arrow'
VECTORS_FILE = 'vectors.f16'
PROBES_FILE = 'probes.npz'
FAISS_IDS_FILE = 'faiss_ids.i64'
VECTOR_ROWS_FILE = 'vector_rows.i64'
LOOKUP_COLUMNS = ('uri', 'sha256')  # ids.arrow columns found by value (lookup_file)
FORMAT_VERSION = 4
IDS_BATCH_ROWS = 1024  # ids.arrow rows a record batch: what a result costs to look up

TUNING_RERANK = 100  # candidates re-ranked while choosing nprobe: the query's default --rerank
DEFAULT_RECALL_TARGET = 0.95  # recall@10 with re-rank the chosen nprobe reaches on the probes


class IndexDirectoryError(ValueError):
  """The index directory is missing, of another model, or cannot take these runs."""


def search_parameters(plan: dict, depth: int, selector=None):
  """FAISS search parameters: `depth` lists searched (IVF; an HNSW quantizer walks 2 x depth
  candidates) or efSearch (HNSW); `selector`: only these ids may be found."""
  faiss = faiss_util.faiss()
  if plan['kind'] == 'hnsw':
    return faiss.SearchParametersHNSW(efSearch=depth, sel=selector)
  parameters = faiss.SearchParametersIVF(nprobe=depth, sel=selector)
  if '_HNSW' in plan['factory']:
    parameters.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * depth, 16))
  return parameters


def read_description(directory: str) -> dict:
  path = os.path.join(directory, INDEX_FILE)
  if storage.is_remote(directory):
    raise IndexDirectoryError(f'{directory}: the index directory must be on the local disk (FAISS '
                      f'memory-maps it); copy it here first')
  if not os.path.isfile(path):
    raise IndexDirectoryError(f'{directory}: no {INDEX_FILE}, so not an index directory written by '
                      f'`pnasnet-embeddings index build`')
  with open(path) as f:
    description = json.load(f)
  if description.get('format_version') != FORMAT_VERSION:
    raise IndexDirectoryError(f'{directory}: an index of format {description.get("format_version")}, '
                      f'this version reads {FORMAT_VERSION}: build it again '
                      f'(pnasnet-embeddings index build)')
  return description


@contextlib.contextmanager
def quiet_stdout():
  """FAISS prints (C stdout) where it finds a moved .ivfdata file and when it grows one; the
  commands' stdout is their answer."""
  import sys
  sys.stdout.flush()
  saved = os.dup(1)
  with open(os.devnull, 'w') as null:
    os.dup2(null.fileno(), 1)
  try:
    yield
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def read_index(directory: str, kind: str):
  """index.faiss, read only, with its IVF lists memory-mapped from index.ivfdata beside it
  (wherever the directory was moved) and no prefetch threads: FAISS's default 32 threads a query
  cost 3.74 ms against 0.59 ms without (issue 28); an HNSW index's vectors memory-mapped too."""
  faiss = faiss_util.faiss()
  flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP_IFC if kind == 'hnsw' else
                                    faiss.IO_FLAG_ONDISK_SAME_DIR)
  with quiet_stdout():
    index = faiss.read_index(os.path.join(directory, FAISS_FILE), flags)
  lists = ivf_lists(index)
  if lists is not None:
    lists.prefetch_nthread = 0
  return index


def ivf_lists(index):
  """The index's OnDiskInvertedLists, None for HNSW."""
  faiss = faiss_util.faiss()
  try:
    ivf = faiss.extract_index_ivf(index)
  except RuntimeError:
    return None
  return faiss.downcast_InvertedLists(ivf.invlists)


def open_vectors(directory: str, dimension: int) -> np.ndarray:
  path = os.path.join(directory, VECTORS_FILE)
  rows = os.path.getsize(path) // (2 * dimension)
  if not rows:
    return np.zeros((0, dimension), np.float16)
  return np.memmap(path, np.float16, 'r', shape=(rows, dimension))


def open_int64(path: str) -> np.ndarray:
  """A raw int64 file, memory-mapped (faiss_ids.i64, vector_rows.i64)."""
  rows = os.path.getsize(path) // 8
  return np.memmap(path, np.int64, 'r', shape=(rows,)) if rows else np.zeros(0, np.int64)


def open_ids(directory: str):
  """ids.arrow, memory-mapped: its footer read, no batch yet."""
  import pyarrow as pa
  return pa.ipc.open_file(pa.memory_map(os.path.join(directory, IDS_FILE)))


def lookup_file(column: str) -> str:
  return f'lookup-{column}.u64'


def lookup_key(value: str) -> int:
  """A value's 64-bit key in a lookup file: the same in every process (blake2b, not hash())."""
  return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), 'little')


def open_lookup(directory: str, column: str) -> tuple:
  """(sorted keys, ids.arrow rows in the same order), memory-mapped."""
  path = os.path.join(directory, lookup_file(column))
  rows = os.path.getsize(path) // 16
  if not rows:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  both = np.memmap(path, np.uint64, 'r', shape=(2 * rows,))
  return both[:rows], both[rows:].view(np.int64)


def ids_rows(reader) -> int:
  last = reader.num_record_batches - 1
  return last * IDS_BATCH_ROWS + reader.get_batch(last).num_rows if last >= 0 else 0


class NeighbourIndex:
  """An index directory opened for queries: the IVF lists, the refine store and the id tables
  are memory-mapped, as are an HNSW index's vectors (its graph is read), and of ids.arrow only
  the footer is read, so opening is cheap and a query reads only what it visits: the lists it
  probes, the rows of its candidates, the record batches of its results."""

  def __init__(self, directory: str):
    self.directory = directory
    self.description = read_description(directory)
    self.model = self.description['model']
    self.dimension = self.description['embedding_size']
    self.plan = self.description['plan']
    self.kind = self.plan['kind']
    self.index = read_index(directory, self.kind)
    self._ids_file = open_ids(directory)
    self._faiss_ids = open_int64(os.path.join(directory, FAISS_IDS_FILE))
    self._vector_rows = open_int64(os.path.join(directory, VECTOR_ROWS_FILE))
    if len(self._faiss_ids) != ids_rows(self._ids_file):
      raise IndexDirectoryError(f'{directory}: {FAISS_IDS_FILE} and {IDS_FILE} differ in length')
    self.vectors = open_vectors(directory, self.dimension)
    self._lookups = {column: open_lookup(directory, column) for column in LOOKUP_COLUMNS}
    self.nprobe = self.description['plan']['nprobe']
    self._whole = None

  @property
  def count(self) -> int:
    return self.index.ntotal

  @property
  def ids(self):
    """The whole ids table, read on first use (tests, benchmarks); the commands never need it:
    at 100M vectors it is GBs of strings."""
    if self._whole is None:
      self._whole = self._ids_file.read_all().combine_chunks()
    return self._whole

  def find_row(self, column: str, value: str) -> Optional[dict]:
    """The first ids-table row (in id order) whose `column` (uri, sha256) equals `value`, or
    None: a binary search of the column's memory-mapped lookup file, then the record batch of
    each row with the value's key (one, unless two values share a 64-bit key)."""
    keys, rows = self._lookups[column]
    key = np.uint64(lookup_key(value))
    for position in rows[np.searchsorted(keys, key, 'left'):np.searchsorted(keys, key, 'right')]:
      row = self.table_rows(np.array([position]))
      if row.column(column)[0].as_py() == value:
        return row.to_pylist()[0]
    return None

  def check_model(self, model: Optional[str]) -> None:
    if model is not None and model != self.model:
      raise MixedModelsError(f'the query was embedded with {model}, but the index at '
                             f'{self.directory} holds {self.model} embeddings: their similarities '
                             f'mean nothing')

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Positions in the ids table of FAISS ids (a binary search of the memory-mapped ids)."""
    ids = np.asarray(ids, np.int64)
    positions = np.searchsorted(self._faiss_ids, ids)
    positions = np.minimum(positions, len(self._faiss_ids) - 1)
    if len(ids) and not np.array_equal(self._faiss_ids[positions], ids):
      raise IndexDirectoryError(f'{self.directory}: ids in {FAISS_FILE} missing from {IDS_FILE}')
    return positions

  def table_rows(self, positions: np.ndarray, columns: Optional[Sequence[str]] = None):
    """The ids table's rows at `positions`, in that order, from the record batches that hold
    them (each batch read in place; a slice a row costs less than a take across batches)."""
    import pyarrow as pa
    positions = np.asarray(positions, np.int64)
    batches = {int(b): self._ids_file.get_batch(int(b))
               for b in np.unique(positions // IDS_BATCH_ROWS)}
    found = pa.Table.from_batches([batches[int(p) // IDS_BATCH_ROWS].slice(
        int(p) % IDS_BATCH_ROWS, 1) for p in positions], self._ids_file.schema)
    return found.select(columns) if columns else found

  def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The runs' stored float32 vectors of `ids` (e.g. a query's own), reading only the row
    groups that hold them, READERS shards at a time (Arrow decodes without the GIL)."""
    located = self.table_rows(self.rows(ids), ['shard', 'row'])
    shards = np.array(located.column('shard').to_pylist(), dtype=object)
    rows = located.column('row').to_numpy()
    vectors = np.zeros((len(ids), self.dimension), np.float32)
    places = [np.flatnonzero(shards == shard) for shard in sorted(set(shards))]
    with ThreadPoolExecutor(READERS) as pool:
      for mine, found in zip(places, pool.map(
          lambda mine: faiss_util.read_rows(shards[mine[0]], rows[mine]), places)):
        vectors[mine] = found
    return vectors

  def refine_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The unit vectors of `ids` from the refine store, as float32 (float16 precision)."""
    rows = self._vector_rows[self.rows(ids)]
    return gather_rows(self.vectors, rows)

  def exact_scores(self, k: int, rerank: int) -> bool:
    """Whether search(k, rerank) returns exact cosines: the PQ codes' scores are approximate
    (computed in the PCA space, they run high) unless re-ranked from the refine store."""
    return self.kind != 'ivf_pq' or rerank > k

  def search_ids(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple:
    """(cosine [q, k], ids [q, k]) straight from FAISS; id -1 where fewer than k exist.
    `nprobe`: IVF lists searched, or HNSW's efSearch (at least k)."""
    queries = np.ascontiguousarray(unit_rows(np.asarray(queries, np.float32)))
    depth = nprobe or self.nprobe
    if self.kind == 'hnsw':
      depth = max(depth, k)
    distances, ids = self.index.search(queries, k, params=search_parameters(self.plan, depth))
    return faiss_util.cosine_from_l2(distances), ids

  def search(self, queries: np.ndarray, k: int, model: Optional[str] = None,
             rerank: int = 0, nprobe: Optional[int] = None,
             exclude_uris: Sequence[Sequence[str]] = ()) -> List[List[Neighbour]]:
    """The k nearest neighbours of each query row. `model`: the queries' model id, refused if it
    is not the index's. `rerank`: when > k, that many candidates are taken and (for a PQ index)
    rescored from the refine store; see exact_scores. `nprobe`: see search_ids.
    `exclude_uris`: per query, URIs to leave out (e.g. the query itself): the candidates are
    that many more, and only the rows of the first k + that many are looked up."""
    self.check_model(model)
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != self.dimension:
      raise MixedModelsError(f'queries are {queries.shape[1]}-d, the index holds '
                             f'{self.dimension}-d vectors')
    extra = max((len(e) for e in exclude_uris), default=0)
    scores, ids = self.search_ids(queries, max(k, rerank) + extra, nprobe)
    kept = [(row_scores[row_ids >= 0], row_ids[row_ids >= 0])
            for row_scores, row_ids in zip(scores, ids)]
    if rerank > k and self.kind == 'ivf_pq':
      kept = rerank_candidates(unit_rows(queries), kept, self.refine_vectors)
    kept = [(row_scores[:k + extra], row_ids[:k + extra]) for row_scores, row_ids in kept]
    every = np.concatenate([row_ids for _, row_ids in kept] + [np.zeros(0, np.int64)])
    rows = self.table_rows(self.rows(every)).to_pylist()
    results, start = [], 0
    for number, (row_scores, row_ids) in enumerate(kept):
      mine, start = rows[start:start + len(row_ids)], start + len(row_ids)
      excluded = set(exclude_uris[number]) if number < len(exclude_uris) else set()
      found = [(score, row) for score, row in zip(row_scores, mine)
               if row['uri'] not in excluded][:k]
      results.append([Neighbour(rank, cosine_value(score), row['uri'], row)
                      for rank, (score, row) in enumerate(found, 1)])
    return results

  def runs(self) -> List[Run]:
    """The covered runs (e.g. to embed a new query with their model)."""
    return find_runs([c['path'] for c in self.description['runs']])


def gather_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """vectors[rows] as float32, the memory-mapped file read forwards."""
  rows = np.asarray(rows, np.int64)
  order = np.argsort(rows, kind='stable')
  gathered = np.empty((len(rows), vectors.shape[1]), np.float32)
  gathered[order] = vectors[rows[order]]
  return gathered


def rerank_candidates(unit_queries: np.ndarray, candidates: List[tuple], vectors_of) -> list:
  """Each query's (scores, ids) candidates rescored by cosine with `vectors_of(ids)` (the refine
  store's), best first; each row read once for the whole batch."""
  every = np.unique(np.concatenate([ids for _, ids in candidates] + [np.zeros(0, np.int64)]))
  stored = vectors_of(every)
  reranked = []
  for query, (_, ids) in zip(unit_queries, candidates):
    exact = stored[np.searchsorted(every, ids)] @ query
    order = np.argsort(-exact, kind='stable')
    reranked.append((exact[order], ids[order]))
  return reranked
