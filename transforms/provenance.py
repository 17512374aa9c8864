"""How a run's vectors were made, recorded in every Example, index row and run_summary.json.

Vectors from different weights, precision or preprocessing are not comparable; these fields let a
reader (and an incremental run) tell them apart.
"""

from importlib import metadata
from typing import NamedTuple


class Provenance(NamedTuple):
  model: str  # the model id: handle, untrained mark, reduced precision
  weights: str  # which weights: a checkpoint's or module's index digest, or the untrained seed
  recipe: str  # what else shapes the vector: compute dtype, preprocessing, stored dtype
  version: str  # this project's version


def recipe(compute_dtype: str, center_crop_fraction: float, jpeg_draft: bool,
           jit_compile: bool = False, embedding_dtype: str = 'float32') -> str:
  """XLA (`jit_compile`) changes features by up to 1e-5, float16 storage (`embedding_dtype`) by
  up to 2^-11 of each value: each recorded only when on, so float32 recipes read as before."""
  text = (f'compute_dtype={compute_dtype};center_crop_fraction={center_crop_fraction};'
          f'jpeg_draft={int(jpeg_draft)}')
  if jit_compile:
    text += ';jit_compile=1'
  return text + f';embedding_dtype={embedding_dtype}' if embedding_dtype != 'float32' else text


def project_version() -> str:
  try:
    return f'pnasnet-embeddings {metadata.version("pnasnet-embeddings")}'
  except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    return 'pnasnet-embeddings (not installed)'
