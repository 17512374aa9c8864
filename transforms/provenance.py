"""How a run's vectors were made, recorded in every Example, index row and run_summary.json.

Vectors from different weights, precision or preprocessing are not comparable; these fields let a
reader (and an incremental run) tell them apart.
"""

from importlib import metadata
from typing import NamedTuple


class Provenance(NamedTuple):
  model: str  # the model id: handle, untrained mark, reduced precision
  weights: str  # which weights: a checkpoint's or module's index digest, or the untrained seed
  recipe: str  # what else shapes the vector: compute dtype and preprocessing
  version: str  # this project's version


def recipe(compute_dtype: str, center_crop_fraction: float, jpeg_draft: bool,
           jit_compile: bool = False) -> str:
  """XLA (`jit_compile`) changes features by up to 1e-5: recorded only when on."""
  text = (f'compute_dtype={compute_dtype};center_crop_fraction={center_crop_fraction};'
          f'jpeg_draft={int(jpeg_draft)}')
  return text + ';jit_compile=1' if jit_compile else text


def project_version() -> str:
  try:
    return f'pnasnet-embeddings {metadata.version("pnasnet-embeddings")}'
  except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    return 'pnasnet-embeddings (not installed)'
