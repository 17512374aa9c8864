"""Helpers of the neighbour index (its build, its reader) and the browse page: FAISS imported on
first use, and indexes as bytes (to travel as Beam side inputs).

Vectors are compared by cosine: on rows scaled to length 1 the squared L2 distance is
2 - 2 cosine, so FAISS's L2 indexes (PCA centring included) rank by cosine.
"""

import numpy as np


def faiss():
  """The faiss module, imported on first use (it is large)."""
  import faiss as module  # pylint: disable=import-outside-toplevel
  return module


def cosine_from_l2(distances: np.ndarray) -> np.ndarray:
  """Squared L2 distances between unit rows -> cosine similarities."""
  return 1.0 - np.asarray(distances, np.float32) / 2.0


def to_bytes(index) -> bytes:
  return faiss().serialize_index(index).tobytes()


def from_bytes(data: bytes):
  return faiss().deserialize_index(np.frombuffer(data, np.uint8))
