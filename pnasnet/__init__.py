"""PNASNet-5 in TensorFlow 2, as TF-Slim defines it; no Beam here.

The configurations import without TensorFlow; the network (and TensorFlow) loads when first
asked for, so `pnasnet-embeddings embed --help` and the option checks start in a second."""

from typing import Optional

import numpy as np

from pnasnet.config import CONFIGS, PUBLIC_NAMES, InputContract, PNASNetConfig

_NETWORK_NAMES = ('PNASNet', 'count_parameters')


def __getattr__(name: str):
  if name in _NETWORK_NAMES:
    from pnasnet import network
    return getattr(network, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

__all__ = ['CONFIGS', 'PUBLIC_NAMES', 'InputContract', 'PNASNet', 'PNASNetConfig', 'build_model',
           'count_parameters']

CALIBRATION_BATCH = 4


def build_model(config_name: str, checkpoint: Optional[str] = None, seed: int = 0,
                num_classes: Optional[int] = None, compute_dtype='float32') -> 'PNASNet':
  """The network with a TF-Slim checkpoint's weights, or seeded untrained ones without one.

  Seeded weights get batch-norm statistics calibrated on seeded noise images, so that their
  features keep a unit scale (see `PNASNet.calibrate_batch_norm`).
  """
  from pnasnet.checkpoint import load_slim_checkpoint
  from pnasnet.network import PNASNet, seeded_initializer
  if config_name not in CONFIGS:
    raise ValueError(f'unknown PNASNet configuration {config_name!r}; '
                     f'choose one of {", ".join(sorted(CONFIGS))}')
  config = CONFIGS[config_name]
  model = PNASNet(config, num_classes=num_classes, initializer=seeded_initializer(seed),
                  compute_dtype=compute_dtype)
  if checkpoint:
    load_slim_checkpoint(model, checkpoint)
  else:
    noise = np.random.default_rng(seed).random(
        (CALIBRATION_BATCH, config.image_size, config.image_size, 3), dtype=np.float32)
    model.calibrate_batch_norm(noise)
  return model
