"""Model handles: resolve, describe (cheaply, for the launcher) and load (on workers).

A handle is a TF-Hub URL, a local or remote (gs://, any Beam FileSystem) directory holding a
TF1-Hub-format module or a TF2 SavedModel, or `builtin:pnasnet_large` / `builtin:pnasnet_mobile`
(this project's own network, with a TF-Slim checkpoint or seeded untrained weights).
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import uuid
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from tensorflow.core.protobuf import saved_model_pb2

from pnasnet.export import EXPORT_MARK
from transforms.xla import PaddedXlaFunction

DEFAULT_MODEL = 'https://tfhub.dev/google/imagenet/pnasnet_large/feature_vector/1'
BUILTIN_PREFIX = 'builtin:'
# `pnasnet_tiny` has the same cells at a toy size: for smoke tests, not for embeddings.
BUILTIN_CONFIGS = {'pnasnet_large': 'large', 'pnasnet_mobile': 'mobile', 'pnasnet_tiny': 'tiny'}
SIGNATURE_PREFERENCE = ('image_feature_vector', 'default', 'serving_default')
COMPUTE_DTYPES = ('float32', 'float16', 'bfloat16')
STAGING_DIR = os.path.join(tempfile.gettempdir(), 'pnasnet-embeddings-staging')

OFFLINE_CHOICES = (
    'Offline choices: --model builtin:pnasnet_large --checkpoint PATH/model.ckpt (the TF-Slim '
    'checkpoint the module was exported from); --model DIR with the module downloaded and '
    'uncompressed (a local or gs:// directory); or TFHUB_CACHE_DIR pointing at a cache that '
    'already holds it. To try the pipeline without any weights: --model builtin:pnasnet_large '
    '(seeded, untrained; the output is labelled so).')


class ModelLoadError(ValueError):
  """The handle cannot be resolved or is not an image feature-vector model."""


class ModelDescription(NamedTuple):
  model_id: str  # what the output's `model` feature records
  height: int
  width: int
  feature_size: int


class FeatureSignature(NamedTuple):
  name: str
  input_key: str
  output_key: str
  description: ModelDescription


def is_builtin(handle: str) -> bool:
  return handle.startswith(BUILTIN_PREFIX)


def model_id(handle: str, checkpoint: Optional[str] = None, seed: int = 0,
             compute_dtype: str = 'float32', untrained_seed: Optional[int] = None) -> str:
  """What the output's `model` feature records: the handle, marked when weights are untrained
  (built-in without a checkpoint, or a module exported from such weights) and when the network
  computes in reduced precision, so that vectors made differently never look interchangeable."""
  if is_builtin(handle) and not checkpoint:
    untrained_seed = seed
  marked = handle if untrained_seed is None else f'{handle}@untrained-seed{untrained_seed}'
  return marked if compute_dtype == 'float32' else f'{marked}+{compute_dtype}'


def read_export_mark(model_dir: str) -> Optional[dict]:
  """What `pnasnet.export` recorded about the weights of a module it wrote, if it wrote it."""
  path = FileSystems.join(model_dir, EXPORT_MARK)
  if not FileSystems.exists(path):
    return None
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return json.loads(f.read())


def _file_digest(path: str) -> str:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def weights_identity(handle: str, checkpoint: Optional[str], seed: int,
                     model_dir: Optional[str] = None) -> str:
  """Which weights made the vectors. A TF variables index holds every tensor's CRC32C, so the
  digest of that small file identifies the weights without reading them."""
  if is_builtin(handle):
    if not checkpoint:
      return f'untrained seed {seed}'
    return f'checkpoint {checkpoint} index-sha256:{_file_digest(checkpoint + ".index")}'
  if model_dir is None:
    model_dir = resolve_model_dir(handle) if handle.startswith(('http://', 'https://')) else handle
  index = FileSystems.join(model_dir, 'variables', 'variables.index')
  digest = f'index-sha256:{_file_digest(index)}' if FileSystems.exists(index) else 'no variables'
  mark = read_export_mark(model_dir)
  if mark and mark.get('untrained'):
    return f'untrained seed {mark["seed"]} (exported by pnasnet.export), {digest}'
  return f'module {digest}'


def _builtin_config(handle: str):
  from pnasnet import CONFIGS  # the network package is only needed for builtin handles
  name = handle[len(BUILTIN_PREFIX):]
  if name not in BUILTIN_CONFIGS:
    raise ModelLoadError(f'unknown built-in model {handle!r}; choose one of ' +
                         ', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_CONFIGS)))
  return CONFIGS[BUILTIN_CONFIGS[name]]


def _stage(uri: str, files: Sequence[FileMetadata], relative_path: Callable[[str], str]) -> str:
  """A local copy of remote files, made once per machine and version.

  The directory's name hashes the URI with every file's path and checksum, so a model replaced
  at the same URI is copied anew. The copy goes to a fresh directory that is then
  renamed into place, so concurrent workers on one VM never see a half-written copy, and a
  failed copy is removed. Object names are untrusted: one that is absolute or holds a `..`
  component would be written outside the copy, and is refused.
  """
  version = json.dumps([uri] + sorted((m.path, FileSystems.checksum(m.path)) for m in files))
  target = os.path.join(STAGING_DIR, hashlib.sha256(version.encode()).hexdigest()[:16])
  if os.path.isdir(target):
    return target
  partial = f'{target}.{uuid.uuid4().hex}.partial'
  try:
    for metadata in files:
      relative = relative_path(metadata.path)
      if os.path.isabs(relative) or '..' in relative.split('/'):
        raise ModelLoadError(f'{uri} holds an object named {metadata.path!r}, which would be '
                             f'staged outside {STAGING_DIR}; refusing to copy the model')
      local = os.path.join(partial, relative)
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
          open(local, 'wb') as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.rename(partial, target)
  except OSError:
    if not os.path.isdir(target):  # not "another process staged it first": a real failure
      raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; else the failed copy
  return target


def _stage_directory(uri: str) -> str:
  prefix = uri.rstrip('/') + '/'
  files = [m for m in FileSystems.match([prefix + '**'])[0].metadata_list
           if not m.path.endswith('/')]
  if not files:
    raise ModelLoadError(f'model directory {uri} is empty or does not exist')
  return _stage(uri, files, lambda path: path[len(prefix):])


def _is_remote(path: str) -> bool:
  """On a Beam FileSystem other than the local disk (TF-Hub URLs are handles, not files)."""
  return '://' in path and not path.startswith(('file://', 'http://', 'https://'))


def resolve_model_dir(handle: str) -> str:
  """A local directory holding the SavedModel the handle names."""
  if handle.startswith(('http://', 'https://')):
    import tensorflow_hub as hub
    try:
      return hub.resolve(handle)
    except urllib.error.HTTPError as exc:  # the server answered: the handle is wrong or gone
      raise ModelLoadError(f'cannot fetch {handle}: the server answered HTTP {exc.code} '
                           f'{exc.reason}. ' + OFFLINE_CHOICES) from exc
    except (urllib.error.URLError, ConnectionError, socket.timeout) as exc:  # DNS, proxy, refused
      raise ModelLoadError(f'cannot fetch {handle} ({type(exc).__name__}: {exc}). '
                           + OFFLINE_CHOICES) from exc
    except Exception as exc:  # the download broke off or is not a module archive
      raise ModelLoadError(
          f'the download of {handle} is not a complete module archive ({type(exc).__name__}: '
          f'{exc}); nothing was cached, so the next run downloads it again. Bake the model into '
          f'the worker image (deploy/README.md) to stop depending on the download.') from exc
  if _is_remote(handle):
    try:
      return _stage_directory(handle)
    except ModelLoadError:
      raise
    except Exception as exc:
      raise ModelLoadError(f'cannot copy the model from {handle}: {exc}') from exc
  if not os.path.isdir(handle):
    raise ModelLoadError(f'--model {handle!r} is neither a TF-Hub URL, a directory, nor '
                         f'builtin:NAME. ' + OFFLINE_CHOICES)
  return handle


def check_checkpoint(prefix: str) -> None:
  if not FileSystems.exists(prefix + '.index'):
    raise ModelLoadError(f'--checkpoint {prefix}: there is no {prefix}.index; give the '
                         'checkpoint prefix, e.g. pnasnet-5_large_2017_12_13/model.ckpt')


def check_checkpoint_fits(handle: str, prefix: str) -> None:
  """The checkpoint's variables against the network's, from the .index file alone.

  The network is built in a TF1 graph, where variables take no memory, so the launcher can refuse
  a wrong checkpoint in a second instead of every worker failing after loading it.
  """
  from pnasnet import PNASNet
  from pnasnet.checkpoint import CheckpointMismatchError, check_variables
  from pnasnet.network import zeros_initializer
  config = _builtin_config(handle)
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


def resolve_checkpoint(prefix: str) -> str:
  """A local path for a TF-Slim checkpoint prefix (staged when remote)."""
  check_checkpoint(prefix)
  if _is_remote(prefix):
    files = FileSystems.match([prefix + '.*'])[0].metadata_list
    return os.path.join(_stage(prefix, files, os.path.basename), os.path.basename(prefix))
  return prefix


def _read_feature_signature(model_dir: str, handle: str) -> FeatureSignature:
  """The image feature-vector signature, read from saved_model.pb without loading variables.

  `model_dir` may be remote: only saved_model.pb is read, so the launcher stays light.
  """
  path = FileSystems.join(model_dir, 'saved_model.pb')
  try:
    exists = FileSystems.exists(path)
  except Exception as exc:  # a missing bucket, no permission: say which handle
    raise ModelLoadError(f'cannot read {handle}: {exc}') from exc
  if not exists:
    raise ModelLoadError(f'{handle} holds no saved_model.pb: not a SavedModel or TF-Hub module')
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  signatures = {}
  for meta_graph in saved_model.meta_graphs:
    for name, sig in meta_graph.signature_def.items():
      signatures.setdefault(name, sig)
  name = next((n for n in SIGNATURE_PREFERENCE if n in signatures), None)
  if name is None:
    raise ModelLoadError(f'{handle} has no image feature-vector signature (looked for '
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
        f'{handle} is not an image feature-vector model: signature {name!r} takes {inputs} and '
        f'returns {outputs}; expected one float32 input [batch, height, width, 3] and an output '
        f'"default" [batch, size]')
  return FeatureSignature(name, input_key, output_key, ModelDescription(
      model_id(handle), image_shape[1], image_shape[2], output_shape[1]))


def check_model_options(handle: str, checkpoint: Optional[str],
                        compute_dtype: str = 'float32', jit_compile: bool = False) -> None:
  """Options that only the built-in network takes: a module or SavedModel brings its own."""
  if is_builtin(handle):
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


def _builtin_description(handle: str, checkpoint: Optional[str], seed: int,
                         compute_dtype: str = 'float32') -> ModelDescription:
  config = _builtin_config(handle)
  return ModelDescription(model_id(handle, checkpoint, seed, compute_dtype), config.image_size,
                          config.image_size, config.feature_size)


def describe_model(handle: str, checkpoint: Optional[str] = None, seed: int = 0,
                   compute_dtype: str = 'float32') -> ModelDescription:
  """What the launcher needs before building the pipeline; raises ModelLoadError early."""
  check_model_options(handle, checkpoint, compute_dtype)
  if is_builtin(handle):
    if checkpoint:
      check_checkpoint(checkpoint)
      check_checkpoint_fits(handle, checkpoint)
    return _builtin_description(handle, checkpoint, seed, compute_dtype)
  model_dir = handle if _is_remote(handle) else resolve_model_dir(handle)
  return _marked(_read_feature_signature(model_dir, handle).description, model_dir, handle)


def _marked(description: ModelDescription, model_dir: str, handle: str) -> ModelDescription:
  """A module exported from untrained weights says so in its model id, as the builtin would."""
  mark = read_export_mark(model_dir)
  if mark and mark.get('untrained'):
    logging.warning('%s holds UNTRAINED weights (exported by pnasnet.export from seed %d); its '
                    'features are not PNASNet embeddings', handle, mark['seed'])
    return description._replace(model_id=model_id(handle, untrained_seed=mark['seed']))
  return description


class EmbeddingModel:
  """A loaded model: float32 images [B, H, W, 3] in [0, 1] -> float32 features [B, D].

  Public methods only: with --large_model Beam serves the model from another process and hands
  workers a proxy, which forwards method calls but neither attributes nor `__call__`.
  """

  def __init__(self, function, description: ModelDescription, owner=None,
               device: Optional[str] = None):
    self._function = function
    self._description = description
    self._owner = owner  # what holds the variables the function reads
    self._device = device  # where the variables are; None: TensorFlow's default device

  def embed(self, images: np.ndarray) -> np.ndarray:
    """A lone image is embedded as a batch of two: on CPUs (oneDNN) a batch of one takes another
    kernel path, up to 1e-4 off the same image's features in any larger batch, and Beam forms
    batches of one at bundle ends, so an image's vector would depend on how it was batched."""
    alone = len(images) == 1
    if alone:
      images = np.concatenate([images, images])
    with tf.device(self._device):
      features = self._function(tf.convert_to_tensor(images, tf.float32)).numpy()
    return features[:1] if alone else features

  def describe(self) -> ModelDescription:
    return self._description

  def devices(self) -> list:
    """Where the weights live (the GPU self-check and the workers' log show it).

    Floating-point variables only: TensorFlow may keep integer ones, such as a step counter, on the
    host even when the model runs on a GPU.
    """
    return sorted({variable.device for variable in getattr(self._owner, 'variables', ())
                   if variable.dtype.is_floating})


def load_model(handle: str, checkpoint: Optional[str] = None, seed: int = 0,
               compute_dtype: str = 'float32', device: Optional[str] = None,
               jit_compile: bool = False, max_batch_size: int = 16) -> EmbeddingModel:
  """The model on `device` (a TensorFlow device name; None: TensorFlow's default).

  `jit_compile` (built-in models) compiles with XLA for batch sizes up to `max_batch_size`.
  """
  with tf.device(device):
    model = _load_model(handle, checkpoint, seed, compute_dtype, device, jit_compile,
                        max_batch_size)
  # Once per load: a worker whose model landed on the CPU says so in the job's log.
  logging.info('model %s loaded on %s', model.describe().model_id,
               ', '.join(model.devices()) or 'no variables')
  return model


def _load_model(handle, checkpoint, seed, compute_dtype, device, jit_compile, max_batch_size):
  if is_builtin(handle):
    from pnasnet import build_model
    config = _builtin_config(handle)
    if not checkpoint:
      logging.warning('%s has NO checkpoint: UNTRAINED weights (seed %d); its features are '
                      'not PNASNet embeddings and are labelled %s', handle, seed,
                      model_id(handle, None, seed))
    network = build_model(config.name, resolve_checkpoint(checkpoint) if checkpoint else None,
                          seed=seed, compute_dtype=compute_dtype)
    size = config.image_size
    if jit_compile:
      function = PaddedXlaFunction(network.__call__, max_batch_size)
    else:
      function = tf.function(network.__call__, input_signature=[
          tf.TensorSpec([None, size, size, 3], tf.float32)])
    return EmbeddingModel(function, _builtin_description(handle, checkpoint, seed, compute_dtype),
                          owner=network, device=device)
  check_model_options(handle, checkpoint, compute_dtype, jit_compile)
  import tensorflow_hub as hub
  model_dir = resolve_model_dir(handle)
  signature = _read_feature_signature(model_dir, handle)
  loaded = hub.load(model_dir)
  concrete = loaded.signatures[signature.name]

  def function(images):
    return concrete(**{signature.input_key: images})[signature.output_key]

  return EmbeddingModel(function, _marked(signature.description, model_dir, handle),
                        owner=loaded, device=device)
