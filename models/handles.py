"""Model handles and the ids recorded for them.

A handle (`model_handle`, the string the user gives) is a TF-Hub URL, a local or remote (gs://,
any Beam FileSystem) directory holding a TF1-Hub-format module or a TF2 SavedModel, or
`builtin:NAME`, this project's own network under one of its public names (pnasnet/network.py),
with a TF-Slim checkpoint or seeded untrained weights.
"""

from typing import Optional

import storage
from pnasnet import PUBLIC_NAMES, PNASNetConfig

DEFAULT_MODEL_HANDLE = 'https://tfhub.dev/google/imagenet/pnasnet_large/feature_vector/1'
BUILTIN_PREFIX = 'builtin:'
COMPUTE_DTYPES = ('float32', 'float16', 'bfloat16')
# How every model's images are prepared: the network's input contract, which TF-Hub image modules
# share, each at its own size.
IMAGE_INPUT = PUBLIC_NAMES['pnasnet_large'].input_contract


class ModelLoadError(ValueError):
  """The handle cannot be resolved or is not an image feature-vector model."""


def is_builtin(model_handle: str) -> bool:
  return model_handle.startswith(BUILTIN_PREFIX)


def is_remote_directory(model_handle: str) -> bool:
  """A model directory on a Beam FileSystem other than the local disk (TF-Hub URLs are handles,
  not files)."""
  return storage.is_remote(model_handle) and not model_handle.startswith(('http://', 'https://'))


def builtin_config(model_handle: str) -> PNASNetConfig:
  name = model_handle[len(BUILTIN_PREFIX):]
  if name not in PUBLIC_NAMES:
    raise ModelLoadError(f'unknown built-in model {model_handle!r}; choose one of ' +
                         ', '.join(BUILTIN_PREFIX + n for n in sorted(PUBLIC_NAMES)))
  return PUBLIC_NAMES[name]


def model_id(model_handle: str, checkpoint: Optional[str] = None, seed: int = 0,
             compute_dtype: str = 'float32', untrained_seed: Optional[int] = None) -> str:
  """What the output's `model` feature records: the handle, marked when weights are untrained
  (built-in without a checkpoint, or a module exported from such weights) and when the network
  computes in reduced precision, so that vectors made differently never look interchangeable."""
  if is_builtin(model_handle) and not checkpoint:
    untrained_seed = seed
  marked = (model_handle if untrained_seed is None
            else f'{model_handle}@untrained-seed{untrained_seed}')
  return marked if compute_dtype == 'float32' else f'{marked}+{compute_dtype}'
