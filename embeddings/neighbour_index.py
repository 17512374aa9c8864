"""The approximate-neighbour index over a collection (FAISS): its directory and its reader.

`pnasnet-embeddings index` builds it over a version of the collection and follows the collection
with `add` (the Beam job: jobs/index_build.py, its plan jobs/index_plan.py); `NeighbourIndex`
opens it for queries.

An index is an exhaustive list (exact search), HNSW32 over the full vectors, or IVF-PQ after a
PCA. Its FAISS ids are the collection's row ids (`_rowid`, stable across compaction), so a
result's row, its URI and its full vector are read from the collection by id (`Collection.take`)
at the version the index covers: the index holds no copy of the rows and no refine store, and a
PQ index's candidates are re-ranked from the collection's vectors.

The index directory (see INDEX_FILE, FAISS_FILE, ...):
    index.json     model id, embedding size, the collection and the version it covers, the plan
                   and its parameters, counts, probe recall and list imbalance at build and after
                   the last add, the nprobe chosen at build and the probes' recall and latency at
                   each nprobe tried, FAISS version
    index.faiss    the FAISS index (unit vectors, L2: 2 - 2 cosine); IVF lists in index.ivfdata
    index.ivfdata  the IVF lists, memory-mapped (FAISS OnDiskInvertedLists)
    trained.faiss  the trained index with no vectors (what `add` encodes with)
    probes.npz     the probe vectors, their ids and their exact nearest ids and cosines
    deleted.i64    HNSW only: the ids the collection deleted since the build, sorted (an HNSW
                   graph cannot remove a vector: searches leave these out)
"""

import contextlib
import json
import logging
import os
from typing import List, Optional, Sequence

import numpy as np

import collection
import storage
from collection import Collection, CollectionError
from embeddings import faiss_util
from embeddings.similarity import Neighbour, cosine_value, unit_rows
from storage.run_dirs import MixedModelsError

_LOG = logging.getLogger(__name__)
INDEX_FILE = 'index.json'
FAISS_FILE = 'index.faiss'
IVFDATA_FILE = 'index.ivfdata'
TRAINED_FILE = 'trained.faiss'
PROBES_FILE = 'probes.npz'
DELETED_FILE = 'deleted.i64'
FORMAT_VERSION = 5
# The collection's columns a result carries (beside `id`, its row id).
ROW_COLUMNS = ('uri', 'sha256', 'height', 'width', 'size_bytes', 'last_modified', 'model', 'run',
               'embedded_at')

TUNING_RERANK = 100  # candidates re-ranked while choosing nprobe: the query's default --rerank
DEFAULT_RECALL_TARGET = 0.95  # recall@10 with re-rank the chosen nprobe reaches on the probes


class IndexDirectoryError(ValueError):
  """The index directory is missing, of another model, or cannot follow its collection."""


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
    raise IndexDirectoryError(f'{directory}: no {INDEX_FILE}, so not an index directory written '
                              f'by `pnasnet-embeddings index build`')
  with open(path) as f:
    description = json.load(f)
  if description.get('format_version') != FORMAT_VERSION:
    raise IndexDirectoryError(f'{directory}: an index of format '
                              f'{description.get("format_version")}, this version reads '
                              f'{FORMAT_VERSION}: build it again (pnasnet-embeddings index build '
                              f'--collection URI)')
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


def read_index_whole(directory: str):
  """index.faiss read into memory, to be added to (HNSW: its graph and vectors)."""
  return faiss_util.faiss().read_index(os.path.join(directory, FAISS_FILE))


def not_deleted(deleted: np.ndarray):
  """A FAISS selector of the ids not in `deleted` (an HNSW index's marked ids), or None."""
  if not len(deleted):
    return None
  faiss = faiss_util.faiss()
  deleted = np.ascontiguousarray(deleted, np.int64)
  batch = faiss.IDSelectorBatch(len(deleted), faiss.swig_ptr(deleted))
  selector = faiss.IDSelectorNot(batch)
  selector.referenced = batch  # IDSelectorNot holds a pointer only
  return selector


def read_deleted(directory: str) -> np.ndarray:
  path = os.path.join(directory, DELETED_FILE)
  return np.fromfile(path, np.int64) if os.path.exists(path) else np.zeros(0, np.int64)


def open_covered(description: dict) -> Collection:
  """The collection at the version the index covers; its latest version, with a warning, when
  that one was cleaned up (rows deleted since then are then missing from results)."""
  uri, version = description['collection'], description['version']
  try:
    return collection.open_collection(uri, version)
  except CollectionError as exc:
    if isinstance(exc, collection.CollectionNotFoundError):
      raise
    latest = collection.open_collection(uri)
    _LOG.warning('the index covers version %d of %s, which is no longer kept: rows are read from '
                 'version %d; `pnasnet-embeddings index add` brings the index up to it', version,
                 uri, latest.version)
    return latest


class NeighbourIndex:
  """An index directory opened for queries, with the collection it covers: the IVF lists are
  memory-mapped, as are an HNSW index's vectors (its graph is read), so opening is cheap and a
  query reads only the lists it probes, then its candidates' vectors (re-rank) and its results'
  rows from the collection, by id."""

  def __init__(self, directory: str, covered: Optional[Collection] = None):
    self.directory = directory
    self.description = read_description(directory)
    self.model = self.description['model']
    self.dimension = self.description['embedding_size']
    self.plan = self.description['plan']
    self.kind = self.plan['kind']
    self.index = read_index(directory, self.kind)
    self.nprobe = self.plan['nprobe']
    self.collection = covered if covered is not None else open_covered(self.description)
    self._selector = not_deleted(read_deleted(directory))

  @property
  def count(self) -> int:
    return self.description['count']

  def indexed_ids(self) -> np.ndarray:
    """Every id the index finds, sorted (tests, checks: they equal the collection's row ids)."""
    faiss = faiss_util.faiss()
    lists = ivf_lists(self.index)
    if lists is None:
      ids = faiss.vector_to_array(faiss.downcast_index(self.index).id_map)
      ids = ids[~np.isin(ids, read_deleted(self.directory))]
    else:
      ids = np.concatenate([np.zeros(0, np.int64)] + [
          faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
          for number in range(lists.nlist) if lists.list_size(number)])
    return np.sort(ids)

  def rows_of(self, ids: Sequence[int], columns: Sequence[str] = ROW_COLUMNS) -> List[dict]:
    """The collection's rows of `ids` (their `columns` and `id`), in that order; None for an id
    the collection read no longer has (its covered version cleaned up)."""
    ids = [int(i) for i in ids]
    found = self.collection.take(ids, list(columns) + ['_rowid']).to_pylist()
    by_id = {row.pop('_rowid'): row for row in found}
    return [dict(by_id[i], id=i) if i in by_id else None for i in ids]

  def find_row(self, column: str, value: str) -> Optional[dict]:
    """The row whose `column` (uri or sha256: through the collection's index on it) equals
    `value`, or None."""
    import pyarrow.compute as pc
    found = self.collection.dataset.to_table(columns=list(ROW_COLUMNS),
                                             filter=pc.field(column) == value,
                                             with_row_id=True, limit=1)
    if not found.num_rows:
      return None
    row = found.slice(0, 1).to_pylist()[0]
    row['id'] = row.pop('_rowid')
    return row

  def sample_uris(self, wanted: int) -> List[str]:
    """URIs of `wanted` rows spread over the collection (positions, not ids)."""
    total = self.collection.num_rows
    if not total:
      return []
    positions = sorted({int(p) for p in np.linspace(0, total - 1, min(wanted, total))})
    return self.collection.dataset.take(positions, columns=['uri']).column('uri').to_pylist()

  def check_model(self, model: Optional[str]) -> None:
    if model is not None and model != self.model:
      raise MixedModelsError(f'the query was embedded with {model}, but the index at '
                             f'{self.directory} holds {self.model} embeddings: their similarities '
                             f'mean nothing')

  def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The collection's float32 vectors of `ids` (e.g. a query's own), in that order (by random
    access: a re-rank's hundred rows)."""
    return embedding_rows(self.collection, ids)

  def refine_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The unit vectors of `ids`, from the collection (what a PQ index's candidates are
    re-ranked by)."""
    return unit_rows(self.stored_vectors(ids))

  def exact_scores(self, k: int, rerank: int) -> bool:
    """Whether search(k, rerank) returns exact cosines: the PQ codes' scores are approximate
    (computed in the PCA space, they run high) unless re-ranked from the collection."""
    return self.kind != 'ivf_pq' or rerank > k

  def search_ids(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple:
    """(cosine [q, k], ids [q, k]) straight from FAISS; id -1 where fewer than k exist.
    `nprobe`: IVF lists searched, or HNSW's efSearch (at least k)."""
    queries = np.ascontiguousarray(unit_rows(np.asarray(queries, np.float32)))
    depth = nprobe or self.nprobe
    if self.kind == 'hnsw':
      depth = max(depth, k)
    distances, ids = self.index.search(queries, k, params=search_parameters(
        self.plan, depth, self._selector))
    return faiss_util.cosine_from_l2(distances), ids

  def search(self, queries: np.ndarray, k: int, model: Optional[str] = None,
             rerank: int = 0, nprobe: Optional[int] = None,
             exclude_uris: Sequence[Sequence[str]] = ()) -> List[List[Neighbour]]:
    """The k nearest neighbours of each query row. `model`: the queries' model id, refused if it
    is not the index's. `rerank`: when > k, that many candidates are taken and (for a PQ index)
    rescored with the collection's vectors; see exact_scores. `nprobe`: see search_ids.
    `exclude_uris`: per query, URIs to leave out (e.g. the query itself): the candidates are
    that many more, and only the rows of the first k + that many are read."""
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
    rows = self.rows_of(every)
    results, start = [], 0
    for number, (row_scores, row_ids) in enumerate(kept):
      mine, start = rows[start:start + len(row_ids)], start + len(row_ids)
      excluded = set(exclude_uris[number]) if number < len(exclude_uris) else set()
      found = [(score, row) for score, row in zip(row_scores, mine)
               if row is not None and row['uri'] not in excluded][:k]
      results.append([Neighbour(rank, cosine_value(score), row['uri'], row)
                      for rank, (score, row) in enumerate(found, 1)])
    return results


def embedding_rows(covered: Collection, ids: np.ndarray) -> np.ndarray:
  """float32 vectors of `ids` in the collection, in that order."""
  table = covered.take(np.asarray(ids, np.int64).tolist(), ['embedding'])
  array = table.column('embedding').combine_chunks()
  flat = array.flatten().to_numpy(zero_copy_only=False)
  return flat.reshape(len(array), covered.feature_size).astype(np.float32)


def rerank_candidates(unit_queries: np.ndarray, candidates: List[tuple], vectors_of) -> list:
  """Each query's (scores, ids) candidates rescored by cosine with `vectors_of(ids)` (the
  collection's), best first; each row read once for the whole batch."""
  every = np.unique(np.concatenate([ids for _, ids in candidates] + [np.zeros(0, np.int64)]))
  stored = vectors_of(every)
  reranked = []
  for query, (_, ids) in zip(unit_queries, candidates):
    exact = stored[np.searchsorted(every, ids)] @ query
    order = np.argsort(-exact, kind='stable')
    reranked.append((exact[order], ids[order]))
  return reranked
