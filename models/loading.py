"""Loading a model on a worker: the built-in network or a TF-Hub module / SavedModel, as an
EmbeddingModel that embeds batches of preprocessed images."""

import logging
from typing import Optional

import numpy as np
import tensorflow as tf

from models.description import ModelDescription, describe_builtin, describe_module
from models.handles import builtin_config, is_builtin, model_id
from models.staging import resolve_checkpoint, resolve_model_dir
from models.xla import PaddedXlaFunction


class EmbeddingModel:
  """A loaded model: float32 images [B, H, W, 3] in [0, 1] -> float32 features [B, D].

  Public methods only: with --large_model Beam serves the model from another process and hands
  workers a proxy, which forwards method calls but neither attributes nor `__call__`.
  """

  def __init__(self, function, description: ModelDescription, owner=None,
               device: Optional[str] = None, batch_invariant_padding: bool = True):
    self._function = function
    self._description = description
    self._owner = owner  # what holds the variables the function reads
    self._device = device  # where the variables are; None: TensorFlow's default device
    self._pads_last_row = batch_invariant_padding and self._on_cpu()

  def embed(self, images: np.ndarray) -> np.ndarray:
    """On a CPU every batch gets one more row, a copy of its last image, whose features are
    dropped: TensorFlow's CPU kernels round a batch's last row differently from the others (up to
    5e-6 relative), so without it an image's vector would depend on where Beam's batching put it
    (docs/reliability.md, Determinism)."""
    if self._pads_last_row:
      images = np.concatenate([images, images[-1:]])
    with tf.device(self._device):
      features = self._function(tf.convert_to_tensor(images, tf.float32)).numpy()
    return features[:-1] if self._pads_last_row else features

  def describe(self) -> ModelDescription:
    return self._description

  def devices(self) -> list:
    """Where the weights live (the GPU self-check and the workers' log show it).

    Floating-point variables only: TensorFlow may keep integer ones, such as a step counter, on the
    host even when the model runs on a GPU.
    """
    return sorted({variable.device for variable in getattr(self._owner, 'variables', ())
                   if variable.dtype.is_floating})

  def _on_cpu(self) -> bool:
    """GPUs make no promise across batch shapes (cuDNN picks algorithms per shape): no padding."""
    devices = self.devices() or [self._device or
                                 ('GPU' if tf.config.list_logical_devices('GPU') else 'CPU')]
    return all('GPU' not in device.upper() for device in devices)


def load_embedding_model(model_handle: str, checkpoint: Optional[str] = None, seed: int = 0,
                         compute_dtype: str = 'float32', device: Optional[str] = None,
                         jit_compile: bool = False, max_batch_size: int = 16) -> EmbeddingModel:
  """The model on `device` (a TensorFlow device name; None: TensorFlow's default).

  `jit_compile` (built-in models) compiles with XLA for batch sizes up to `max_batch_size`.
  The options are those `check_model_options` accepted at launch.
  """
  with tf.device(device):
    if is_builtin(model_handle):
      embedding_model = _load_builtin(model_handle, checkpoint, seed, compute_dtype, device,
                                      jit_compile, max_batch_size)
    else:
      embedding_model = _load_module(model_handle, device)
  # Once per load: a worker whose model landed on the CPU says so in the job's log.
  logging.info('model %s loaded on %s', embedding_model.describe().model_id,
               ', '.join(embedding_model.devices()) or 'no variables')
  return embedding_model


def _load_builtin(model_handle, checkpoint, seed, compute_dtype, device, jit_compile,
                  max_batch_size) -> EmbeddingModel:
  from pnasnet import build_model
  config = builtin_config(model_handle)
  if not checkpoint:
    logging.warning('%s has NO checkpoint: UNTRAINED weights (seed %d); its features are '
                    'not PNASNet embeddings and are labelled %s', model_handle, seed,
                    model_id(model_handle, None, seed))
  local_checkpoint = resolve_checkpoint(checkpoint) if checkpoint else None
  network = build_model(config.name, local_checkpoint, seed=seed, compute_dtype=compute_dtype)
  size = config.image_size
  if jit_compile:
    function = PaddedXlaFunction(network.__call__, max_batch_size)  # pads to its own sizes
  else:
    function = tf.function(network.__call__, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32)])
  return EmbeddingModel(function, describe_builtin(model_handle, checkpoint, seed, compute_dtype),
                        owner=network, device=device, batch_invariant_padding=not jit_compile)


def _load_module(model_handle, device) -> EmbeddingModel:
  import tensorflow_hub as hub
  model_dir = resolve_model_dir(model_handle)
  signature = describe_module(model_dir, model_handle)
  loaded = hub.load(model_dir)
  concrete = loaded.signatures[signature.name]

  def function(images):
    return concrete(**{signature.input_key: images})[signature.output_key]

  return EmbeddingModel(function, signature.description, owner=loaded, device=device)
