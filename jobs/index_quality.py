"""How well the neighbour index finds neighbours, measured on probes: vectors held back from
training at build, and drawn from the rows each `add` inserts, whose exact neighbours the encoding
workers find among the vectors they encode. The build records recall@10 on its probes, their
quantization error and the lists' imbalance, and picks a PQ plan's nprobe from its probes' curve;
`add` checks the index's health against the build's, like for like, and says when to rebuild."""

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from collection import Collection
from embeddings import faiss_util
from embeddings.neighbour_index import (TUNING_RERANK, embedding_rows, ivf_lists,
                                        rerank_candidates, search_parameters)
from embeddings.similarity import unit_rows
from jobs.collection_reads import read_fragment, row_ids
from jobs.index_plan import ivf_of

PROBES = 100  # held back at build (a tenth of the sampled vectors when fewer than 1,000)
PROBES_PER_ADD = 100  # drawn from the rows an add inserts (a tenth of them when fewer than 1,000)
PROBE_NEIGHBOURS = 50  # exact neighbours kept per probe: enough to survive replaced URIs
RECALL_K = 10
IMBALANCE_GROWTH = 2.0  # lists this much more imbalanced than at build: rebuild
# Added runs' probes this much farther from their lists than the build's probes: rebuild. At 1M
# 4320-d vectors (2026-12-07), samples of 100 from a night of the same collection gave 0.96-1.07
# times the build's; another collection's 3.0.
QUANTIZATION_ERROR_GROWTH = 1.2


class BestNeighbours:
  """The probes' PROBE_NEIGHBOURS best exact neighbours, as pieces come."""

  def __init__(self, ids: np.ndarray, scores: np.ndarray):
    self.ids, self.scores = ids, scores

  def offer(self, ids: np.ndarray, scores: np.ndarray) -> None:
    found = np.concatenate([self.ids, ids], axis=1)
    scores = np.concatenate([self.scores, scores], axis=1)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :PROBE_NEIGHBOURS]
    self.scores = np.take_along_axis(scores, order, 1)
    self.ids = np.where(np.isfinite(self.scores), np.take_along_axis(found, order, 1), -1)

  def drop(self, removed: np.ndarray) -> None:
    gone = np.isin(self.ids, removed)
    self.scores = np.where(gone, -np.inf, self.scores)
    self.offer(np.zeros((len(self.ids), 0), np.int64), np.zeros((len(self.ids), 0), np.float32))


def no_neighbours(count: int) -> BestNeighbours:
  return BestNeighbours(np.zeros((count, 0), np.int64), np.zeros((count, 0), np.float32))


def added_probes(collection: Collection, fragment_ids: Sequence[int], since: int,
                 seed: int) -> dict:
  """Up to PROBES_PER_ADD of the rows inserted after version `since` (a tenth of them when fewer
  than 1,000), drawn uniformly: their ids are read (no vector), then the chosen rows' vectors."""
  ids = np.concatenate([np.zeros(0, np.int64)] + [
      row_ids(batch) for fragment_id in fragment_ids
      for batch in read_fragment(collection, fragment_id, [], since)])
  chosen = np.sort(np.random.default_rng(seed).permutation(ids)[:min(PROBES_PER_ADD,
                                                                      len(ids) // 10)])
  return {'ids': chosen,
          'vectors': unit_rows(embedding_rows(collection, chosen)) if len(chosen) else
                     np.zeros((0, collection.feature_size), np.float32)}


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
  """Mean over queries of |found top-k ∩ exact top-k| / k (ids; -1 never counts)."""
  hits = [len(set(f[:k].tolist()) & (set(e[:k].tolist()) - {-1})) for f, e in zip(found, exact)]
  return float(np.mean(hits) / k) if hits else float('nan')


def probe_recall(index, probes: Dict[str, np.ndarray], plan: dict, nprobe: int,
                 id_range: Optional[tuple] = None, selector=None) -> float:
  """recall@10 of the index on a probe set, against the probes' exact neighbours (each probe's
  own vector left out); `id_range` (first, end): search among those ids only, as the probes'
  neighbours were found (e.g. those of the rows one add inserted); `selector`: a FAISS selector
  of the ids searched (an HNSW index's not deleted ones)."""
  faiss = faiss_util.faiss()
  if not len(probes['ids']):
    return float('nan')
  if id_range:
    selector = faiss.IDSelectorRange(*id_range)
  depth = max(nprobe, RECALL_K + 1) if plan['kind'] == 'hnsw' else nprobe
  _, found = index.search(np.ascontiguousarray(probes['vectors'], np.float32), RECALL_K + 1,
                          params=search_parameters(plan, depth, selector))
  found = [row[row != own][:RECALL_K] for row, own in zip(found, probes['ids'])]
  return recall_at(np.array(found), probes['exact_ids'])


def nprobe_curve(index, probes: Dict[str, np.ndarray], plan: dict, vectors_of,
                 target: float) -> tuple:
  """(the smallest power-of-two nprobe whose recall@10 on the probes, re-ranking
  TUNING_RERANK candidates with `vectors_of(ids)`, reaches `target` (else the best one), the
  curve: nprobe, recall@10 without and with re-rank, ms a probe searched alone on one thread)."""
  faiss = faiss_util.faiss()
  curve = []
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  try:
    for nprobe in 2 ** np.arange(int(np.log2(plan['lists'])) + 1):
      parameters = search_parameters(plan, int(nprobe))
      started = time.perf_counter()
      found = [index.search(np.ascontiguousarray(vector[None], np.float32),
                            TUNING_RERANK + 1, params=parameters) for vector in probes['vectors']]
      seconds = time.perf_counter() - started
      candidates = [(None, ids[0][(ids[0] != own) & (ids[0] >= 0)])
                    for (_, ids), own in zip(found, probes['ids'])]
      reranked = rerank_candidates(unit_rows(np.asarray(probes['vectors'], np.float32)),
                                   candidates, vectors_of)
      curve.append({'nprobe': int(nprobe), 'recall_at_10': recall_at(
          _padded([ids for _, ids in candidates]), probes['exact_ids']),
                    'reranked_recall_at_10': recall_at(
                        _padded([ids for _, ids in reranked]), probes['exact_ids']),
                    'ms': 1e3 * seconds / max(len(found), 1)})
      if curve[-1]['reranked_recall_at_10'] >= target:
        break
  finally:
    faiss.omp_set_num_threads(threads)
  if curve[-1]['reranked_recall_at_10'] >= target:
    return curve[-1]['nprobe'], curve
  top = max(point['reranked_recall_at_10'] for point in curve)
  return min(p['nprobe'] for p in curve if p['reranked_recall_at_10'] == top), curve


def _padded(rows: List[np.ndarray], width: int = RECALL_K) -> np.ndarray:
  return np.array([np.pad(row[:width], (0, width - len(row[:width])), constant_values=-1)
                   for row in rows], np.int64).reshape(len(rows), width)


def list_imbalance(index) -> Optional[float]:
  """FAISS's imbalance factor of the IVF lists (1.0: all equal; the cost of a search over
  uneven lists against even ones); None for HNSW."""
  lists = ivf_lists(index)
  return None if lists is None else float(lists.imbalance_factor())


def quantization_error(index, vectors: np.ndarray) -> float:
  """The mean squared distance of unit `vectors` to the points their nearest IVF centroids stand
  for in the input space: what the PCA leaves out (its rows are orthonormal) plus the residual
  to the centroid. It grows as new vectors drift from what the PCA and the lists were trained
  on, whatever the number of vectors searched among (a recall among a night's vectors alone
  falls with the night's share of the index)."""
  faiss = faiss_util.faiss()
  x = np.ascontiguousarray(unit_rows(np.asarray(vectors, np.float32)))
  left_out = np.zeros(len(x), np.float32)
  outer = faiss.downcast_index(index)
  if isinstance(outer, faiss.IndexPreTransform):
    projection = faiss.downcast_VectorTransform(outer.chain.at(0))
    x = projection.apply(x)
    left_out = 1 - ((x - faiss.vector_to_array(projection.b)) ** 2).sum(1)
  residual, _ = ivf_of(index).quantizer.search(np.ascontiguousarray(x), 1)
  return float(np.mean(left_out + residual[:, 0]))


def health(index, plan: dict, probe_file: dict, selector=None) -> dict:
  """What the build records and `add` compares with it: recall@10 on the probes at the plan's
  nprobe (`selector`: see probe_recall), the lists' imbalance."""
  return {'probe_recall_at_10': probe_recall(index, probe_file, plan, plan['nprobe'],
                                             selector=selector),
          'list_imbalance': list_imbalance(index)}


def rebuild_reasons(health_now: dict, build: dict, added_error: Optional[float],
                    recall_drop: float) -> List[str]:
  """Why the index should be built again after an `add`, if it should: `health_now` against the
  build's, and `added_error`, the added runs' probes' quantization error (None: not measured)."""
  reasons = []
  if health_now['probe_recall_at_10'] < build['probe_recall_at_10'] - recall_drop:
    reasons.append(f'recall@10 on the build\'s probes {health_now["probe_recall_at_10"]:.3f}, '
                   f'below the build\'s {build["probe_recall_at_10"]:.3f} by more than '
                   f'{recall_drop}')
  if added_error is not None and (
      added_error > QUANTIZATION_ERROR_GROWTH * build['probe_quantization_error']):
    reasons.append(f'the added runs\' probes are {added_error:.3f} from their lists (squared '
                   f'distance), over {QUANTIZATION_ERROR_GROWTH}x the build\'s probes\' '
                   f'{build["probe_quantization_error"]:.3f}: the lists and the PCA were '
                   f'trained on other vectors')
  if health_now['list_imbalance'] and health_now['list_imbalance'] > IMBALANCE_GROWTH * build[
      'list_imbalance']:
    reasons.append(f'list imbalance {health_now["list_imbalance"]:.2f}, over {IMBALANCE_GROWTH}x '
                   f'the build\'s {build["list_imbalance"]:.2f}')
  return reasons
