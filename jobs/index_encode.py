"""Encoding, on every worker, a shard at a time: the rows the collection keeps become the
shard's pieces (jobs/index_pieces.py), which this process merges into the index directory."""

from typing import Dict

import apache_beam as beam
import numpy as np
import pyarrow as pa

from embeddings import faiss_util
from embeddings.shards import read_shard
from embeddings.similarity import unit_rows
from jobs.index_kept import kept_mask, row_ids
from jobs.index_pieces import METRICS_NAMESPACE, write_piece
from jobs.index_plan import ivf_of
from jobs.index_quality import PROBE_NEIGHBOURS
from jobs.shard_refs import ShardRef


class EncodeShard(beam.DoFn):
  """The rows of a shard the collection keeps: their codes in inverted lists (IVF plans), their
  unit vectors in float16, their metadata, and the probes' exact neighbours among them, as piece
  files (so nothing larger than a shard travels through the runner)."""

  def __init__(self, pieces: str, kind: str):
    self._pieces = pieces
    self._kind = kind

  def process(self, ref: ShardRef, trained: bytes, probes: Dict[str, np.ndarray]):
    if not hasattr(self, '_trained'):
      self._trained = trained
      self._probe_vectors = unit_rows(probes['vectors'])
    shard = read_shard(ref.path, ref.run)
    keep = kept_mask(ref, len(shard.uris))
    rows = np.flatnonzero(keep)
    vectors = unit_rows(shard.vectors[keep])
    ids = row_ids(ref, rows)
    lists = b''
    if self._kind != 'hnsw':
      piece = faiss_util.from_bytes(self._trained)  # empty: this shard's lists alone
      ivf = ivf_of(piece)
      if len(ids):
        ivf.add_sa_codes(piece.sa_encode(np.ascontiguousarray(vectors)), ids)
      lists = _lists_bytes(ivf.invlists)
    scores = self._probe_vectors @ vectors.T
    scores[probes['ids'][:, None] == ids[None, :]] = -np.inf
    keep_best = min(PROBE_NEIGHBOURS, len(ids))
    top = np.argpartition(-scores, keep_best - 1, axis=1)[:, :keep_best] if keep_best else (
        np.zeros((len(scores), 0), np.int64))
    metadata = shard.metadata.filter(pa.array(keep)).append_column(
        'id', pa.array(ids)).append_column(
            'shard', pa.array([ref.path] * len(ids), pa.string())).append_column(
                'row', pa.array(rows, pa.int64()))
    write_piece(self._pieces, ref.number, lists, vectors.astype(np.float16), ids[top],
                np.take_along_axis(scores, top, 1), metadata)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'encoded').inc(len(ids))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'superseded').inc(int((~keep).sum()))
    yield ref.number


def _lists_bytes(lists) -> bytes:
  faiss = faiss_util.faiss()
  writer = faiss.VectorIOWriter()
  faiss.write_InvertedLists(lists, writer)
  return faiss.vector_to_array(writer.data).tobytes()
