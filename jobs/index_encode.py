"""Encoding, on every worker, a fragment of the collection at a time (its rows inserted after a
version, for `add`): the rows become the fragment's pieces (jobs/index_pieces.py), which this
process merges into the index directory."""

from typing import Dict, Optional

import apache_beam as beam
import numpy as np

from embeddings import faiss_util
from embeddings.similarity import unit_rows
from jobs.collection_reads import Snapshot, read_fragment, row_ids, vectors
from jobs.index_pieces import METRICS_NAMESPACE, FragmentRef, write_piece
from jobs.index_plan import ivf_of
from jobs.index_quality import PROBE_NEIGHBOURS


class EncodeFragment(beam.DoFn):
  """A fragment's rows (inserted after `since`, if given): their codes in inverted lists (IVF
  plans) or their float16 unit vectors (HNSW), their ids, and the probes' exact neighbours among
  them, as piece files (so nothing larger than a fragment travels through the runner)."""

  def __init__(self, snapshot: Snapshot, pieces: str, kind: str, since: Optional[int] = None):
    self._snapshot = snapshot
    self._pieces = pieces
    self._kind = kind
    self._since = since

  def setup(self):
    self._collection = self._snapshot.open()

  def process(self, ref: FragmentRef, trained: bytes, probes: Dict[str, np.ndarray]):
    if not hasattr(self, '_trained'):
      self._trained = trained
      self._probe_vectors = unit_rows(probes['vectors'])
    ids, parts = [np.zeros(0, np.int64)], [np.zeros((0, self._collection.feature_size), np.float32)]
    for batch in read_fragment(self._collection, ref.fragment_id, ['embedding'], self._since):
      ids.append(row_ids(batch))
      parts.append(unit_rows(vectors(batch)))
    ids, unit = np.concatenate(ids), np.concatenate(parts)
    lists = b''
    if self._kind != 'hnsw':
      piece = faiss_util.from_bytes(self._trained)  # empty: this fragment's lists alone
      ivf = ivf_of(piece)
      if len(ids):
        ivf.add_sa_codes(piece.sa_encode(np.ascontiguousarray(unit)), ids)
      lists = _lists_bytes(ivf.invlists)
    scores = self._probe_vectors @ unit.T
    scores[probes['ids'][:, None] == ids[None, :]] = -np.inf
    keep_best = min(PROBE_NEIGHBOURS, len(ids))
    top = np.argpartition(-scores, keep_best - 1, axis=1)[:, :keep_best] if keep_best else (
        np.zeros((len(scores), 0), np.int64))
    stored = unit.astype(np.float16) if self._kind == 'hnsw' else np.zeros((0, 0), np.float16)
    write_piece(self._pieces, ref.number, lists, ids, stored, ids[top],
                np.take_along_axis(scores, top, 1))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'encoded').inc(len(ids))
    yield ref.number


def _lists_bytes(lists) -> bytes:
  faiss = faiss_util.faiss()
  writer = faiss.VectorIOWriter()
  faiss.write_InvertedLists(lists, writer)
  return faiss.vector_to_array(writer.data).tobytes()
