"""What the launcher knows of a model before any worker loads it: resolved once per launch, from
the model's files (saved_model.pb, the export mark, the variables index) without loading weights.
Workers describe the model they load the same way, so the two agree.

TensorFlow is imported only where a model's files are read: `--help` and the option checks before
them start in a second, not the 5-18 s TensorFlow's import takes."""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import NamedTuple, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from models.handles import ModelLoadError, builtin_config, is_builtin, is_remote_directory, model_id
from models.staging import check_checkpoint, resolve_model_dir
from pnasnet.config import EXPORT_MARK

SIGNATURE_PREFERENCE = ('image_feature_vector', 'default', 'serving_default')


class ModelDescription(NamedTuple):
  model_id: str  # what the output's `model` feature records
  height: int
  width: int
  feature_size: int
  weights: str  # which weights made the vectors: an index digest, or the untrained seed


class FeatureSignature(NamedTuple):
  name: str
  input_key: str
  output_key: str
  description: ModelDescription


def check_model_options(model_handle: str, checkpoint: Optional[str],
                        compute_dtype: str = 'float32', jit_compile: bool = False) -> None:
  """Options that only the built-in network takes: a module or SavedModel brings its own."""
  if is_builtin(model_handle):
    return
  if checkpoint:
    raise ModelLoadError('--checkpoint goes with --model builtin:pnasnet_large (or _mobile) '
                         'only; a module or SavedModel carries its own weights')
  if compute_dtype != 'float32':
    raise ModelLoadError('--compute_dtype applies to builtin: models only; a module or '
                         'SavedModel computes in the dtype it was exported with')
  if jit_compile:
    raise ModelLoadError('--jit_compile applies to builtin: models only; a module or '
                         'SavedModel runs the graph it was exported with')


def read_export_mark(model_dir: str) -> Optional[dict]:
  """What `pnasnet.export` recorded about the weights of a module it wrote, if it wrote it."""
  path = FileSystems.join(model_dir, EXPORT_MARK)
  if not FileSystems.exists(path):
    return None
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return json.loads(f.read())


def _file_digest(path: str) -> str:
  """A TF variables index holds every tensor's CRC32C, so the digest of that small file
  identifies the weights without reading them."""
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def check_checkpoint_fits(model_handle: str, prefix: str) -> None:
  """The checkpoint's variables against the network's, from the .index file alone.

  The network is built in a TF1 graph, where variables take no memory, so the launcher can refuse
  a wrong checkpoint in a second instead of every worker failing after loading it.
  """
  import tensorflow as tf
  from pnasnet import PNASNet
  from pnasnet.checkpoint import CheckpointMismatchError, check_variables
  from pnasnet.network import zeros_initializer
  config = builtin_config(model_handle)
  with tempfile.TemporaryDirectory() as local:
    index = os.path.join(local, 'model.ckpt.index')
    with FileSystems.open(prefix + '.index',
                          compression_type=CompressionTypes.UNCOMPRESSED) as src:
      with open(index, 'wb') as dst:
        shutil.copyfileobj(src, dst)
    shapes = tf.train.load_checkpoint(index[:-len('.index')]).get_variable_to_shape_map()
  with tf.Graph().as_default():
    network = PNASNet(config, initializer=zeros_initializer)
  try:
    check_variables(network, shapes, prefix)
  except CheckpointMismatchError as exc:
    raise ModelLoadError(str(exc)) from exc


def describe_builtin(model_handle: str, checkpoint: Optional[str], seed: int,
                     compute_dtype: str = 'float32') -> ModelDescription:
  """The built-in network's description, from its config and the checkpoint's index."""
  config = builtin_config(model_handle)
  if checkpoint:
    weights = f'checkpoint {checkpoint} index-sha256:{_file_digest(checkpoint + ".index")}'
  else:
    weights = f'untrained seed {seed}'
  return ModelDescription(model_id(model_handle, checkpoint, seed, compute_dtype),
                          config.image_size, config.image_size, config.feature_size, weights)


def describe_module(model_dir: str, model_handle: str) -> FeatureSignature:
  """The image feature-vector signature and the weights, read from saved_model.pb, the export
  mark and the variables index without loading variables.

  `model_dir` may be remote: only those small files are read, so the launcher stays light. A
  module exported from untrained weights says so in its model id, as the builtin would.
  """
  import tensorflow as tf
  from tensorflow.core.protobuf import saved_model_pb2
  path = FileSystems.join(model_dir, 'saved_model.pb')
  try:
    exists = FileSystems.exists(path)
  except Exception as exc:  # a missing bucket, no permission: say which handle
    raise ModelLoadError(f'cannot read {model_handle}: {exc}') from exc
  if not exists:
    raise ModelLoadError(f'{model_handle} holds no saved_model.pb: not a SavedModel or TF-Hub '
                         f'module')
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  signatures = {}
  for meta_graph in saved_model.meta_graphs:
    for name, sig in meta_graph.signature_def.items():
      signatures.setdefault(name, sig)
  name = next((n for n in SIGNATURE_PREFERENCE if n in signatures), None)
  if name is None:
    raise ModelLoadError(f'{model_handle} has no image feature-vector signature (looked for '
                         f'{", ".join(SIGNATURE_PREFERENCE)}; it has {sorted(signatures)})')
  sig = signatures[name]
  inputs = {k: [d.size for d in v.tensor_shape.dim] for k, v in sig.inputs.items()}
  outputs = {k: [d.size for d in v.tensor_shape.dim] for k, v in sig.outputs.items()}
  output_key = 'default' if 'default' in outputs else next(iter(outputs), None)
  input_key = next(iter(inputs), None)
  image_shape = inputs.get(input_key)
  output_shape = outputs.get(output_key)
  if (len(inputs) != 1 or not image_shape or len(image_shape) != 4 or image_shape[3] != 3 or
      min(image_shape[1:3]) <= 0 or
      sig.inputs[input_key].dtype != tf.float32.as_datatype_enum or
      not output_shape or len(output_shape) != 2 or output_shape[1] <= 0):
    raise ModelLoadError(
        f'{model_handle} is not an image feature-vector model: signature {name!r} takes {inputs} '
        f'and returns {outputs}; expected one float32 input [batch, height, width, 3] and an '
        f'output "default" [batch, size]')
  index = FileSystems.join(model_dir, 'variables', 'variables.index')
  digest = f'index-sha256:{_file_digest(index)}' if FileSystems.exists(index) else 'no variables'
  mark = read_export_mark(model_dir)
  if mark and mark.get('untrained'):
    logging.warning('%s holds UNTRAINED weights (exported by pnasnet.export from seed %d); its '
                    'features are not PNASNet embeddings', model_handle, mark['seed'])
    identity = model_id(model_handle, untrained_seed=mark['seed'])
    weights = f'untrained seed {mark["seed"]} (exported by pnasnet.export), {digest}'
  else:
    identity, weights = model_id(model_handle), f'module {digest}'
  return FeatureSignature(name, input_key, output_key, ModelDescription(
      identity, image_shape[1], image_shape[2], output_shape[1], weights))


def describe_model(model_handle: str, checkpoint: Optional[str] = None, seed: int = 0,
                   compute_dtype: str = 'float32') -> ModelDescription:
  """What the launcher needs before building the pipeline; raises ModelLoadError early.

  The options themselves are checked once, with the other flags (`check_model_options`).
  """
  if is_builtin(model_handle):
    if checkpoint:
      check_checkpoint(checkpoint)
      check_checkpoint_fits(model_handle, checkpoint)
    return describe_builtin(model_handle, checkpoint, seed, compute_dtype)
  model_dir = model_handle if is_remote_directory(model_handle) else resolve_model_dir(model_handle)
  return describe_module(model_dir, model_handle).description
