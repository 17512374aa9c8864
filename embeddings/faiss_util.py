"""Helpers of the neighbour index (its build, its reader) and the browse page: FAISS imported on
first use, stored vectors read by row, samples of shards, and indexes as bytes (to travel as Beam
side inputs).

Vectors are compared by cosine: on rows scaled to length 1 the squared L2 distance is
2 - 2 cosine, so FAISS's L2 indexes (PCA centring included) rank by cosine.
"""

from typing import Sequence

import numpy as np

from embeddings.shards import ParquetVectors, is_parquet, read_shard


def faiss():
  """The faiss module, imported on first use (it is large)."""
  import faiss as module  # pylint: disable=import-outside-toplevel
  return module


def cosine_from_l2(distances: np.ndarray) -> np.ndarray:
  """Squared L2 distances between unit rows -> cosine similarities."""
  return 1.0 - np.asarray(distances, np.float32) / 2.0


def read_rows(path: str, rows: Sequence[int]) -> np.ndarray:
  """The float32 vectors at `rows` (positions in the shard, in the order given): for Parquet
  only the row groups holding them are read."""
  if not is_parquet(path):
    return read_shard(path, '').vectors[np.asarray(rows, np.int64)]
  return ParquetVectors.open(path, '').vectors_at(rows)


def sample_rows(path: str, fraction: float, seed: int) -> tuple:
  """(row positions, float32 vectors) of about `fraction` of a shard's rows: whole Parquet row
  groups chosen at random (only those are read), or rows of a TFRecord shard."""
  rng = np.random.default_rng(seed)
  if is_parquet(path):
    sizes = ParquetVectors.open(path, '').row_group_rows
    chosen = [g for g in range(len(sizes)) if rng.random() < fraction]
    if not chosen:
      return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in chosen])
    return rows, read_rows(path, rows)
  vectors = read_shard(path, '').vectors
  rows = np.flatnonzero(rng.random(len(vectors)) < fraction)
  return rows, vectors[rows]


def to_bytes(index) -> bytes:
  return faiss().serialize_index(index).tobytes()


def from_bytes(data: bytes):
  return faiss().deserialize_index(np.frombuffer(data, np.uint8))
