"""Stage 3: RunInference with the project's ModelHandler, one model per process (or per VM).

A batch that runs out of memory (TensorFlow's ResourceExhaustedError) is split in two and each half
tried again, down to single images, with a warning and the `oom_batch_splits` counter: a
--max_batch_size too large for the GPU still embeds every image. A single image out of memory
raises like any other infrastructure error below.

Only data errors are dead-lettered: an input the model refuses (TensorFlow's InvalidArgumentError,
or a ValueError / TypeError for an input it cannot take) becomes an `inference` failure of that
image alone (a refused batch is retried image by image). Anything else (one image out of memory,
a device error, a lost connection to the process that serves a shared model) raises, so the
runner retries the bundle (Dataflow: four times, then the job fails) instead of draining a
broken machine's share of the input into the failures file. A retried bundle's set-up acquires
the shared model anew; Beam starts a new server when the old one no longer answers.
"""

import logging
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterable, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

from models.gpus import configure_gpus, device_for_load
from models.handles import model_id as default_model_id
from models.shared_batches import SharedBatchModel, embed_batch
from transforms.decode import DecodedImage
from transforms.failures import FAILURES_TAG, INFERENCE, Failure
from transforms import quiet_logs
from transforms.progress import ProgressReporter

if TYPE_CHECKING:  # TensorFlow: imported by the workers' load_model, not by the launcher
  from models.loading import EmbeddingModel

METRICS_NAMESPACE = 'embed'


class ImageKey(NamedTuple):
  """What travels beside the pixels through RunInference, to be written with the embedding."""
  uri: str
  sha256: str
  height: int
  width: int
  size_bytes: int
  last_modified: Optional[int]
  content_id: Optional[str] = None
  byte_offset: Optional[int] = None  # a shard member's bytes in its shard, for reading back
  byte_length: Optional[int] = None


class Embedding(NamedTuple):
  uri: str
  sha256: str
  height: int
  width: int
  size_bytes: int
  last_modified: Optional[int]  # microseconds since the Unix epoch, from the file listing
  model: str
  embedding: np.ndarray  # float32 [feature_size]
  content_id: Optional[str] = None  # the store's identity of the bytes (transforms/listing.py)
  byte_offset: Optional[int] = None  # a shard member's bytes in its shard (transforms/shards.py)
  byte_length: Optional[int] = None


class RefusedImage(NamedTuple):
  """In place of an image's features: the model refused this input (a data error)."""
  error: str
  message: str


def _errors():
  """(the errors that say the input is wrong for the model, out of memory); every other error is
  the machine's. TensorFlow's, imported here: the launcher imports this module for the graph,
  where TensorFlow would cost seconds before every option check."""
  import tensorflow as tf
  return (tf.errors.InvalidArgumentError, ValueError, TypeError), tf.errors.ResourceExhaustedError


def _refused(exc: Exception) -> RefusedImage:
  """TensorFlow's messages span lines (the node, then the reason): one line, bounded."""
  message = ' '.join((getattr(exc, 'message', None) or str(exc)).split())
  return RefusedImage(type(exc).__name__, message[:1000])


class ImageEmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, 'EmbeddingModel']):
  """Loads a TF-Hub module, SavedModel or built-in PNASNet (Beam's TFModelHandler* cannot load
  TF1 Hub format) and embeds batches of preprocessed images.

  A model shared across processes (--large_model, --model_copies) receives its batches through
  shared memory (models/shared_batches.py); the i-th model a run loads on a machine runs on
  its GPU i mod G (models/gpus.py). The launcher checked the options (`check_model_options`).
  """

  def __init__(self, model_handle: str, checkpoint: Optional[str] = None, seed: int = 0,
               compute_dtype: str = 'float32', min_batch_size: int = 1,
               max_batch_size: int = 16, large_model: bool = False,
               model_copies: Optional[int] = None, jit_compile: bool = False,
               model_id: Optional[str] = None):
    super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                     large_model=large_model, model_copies=model_copies)
    self._model_handle = model_handle
    self._checkpoint = checkpoint
    self._seed = seed
    self._compute_dtype = compute_dtype
    self._max_batch_size = max_batch_size
    self._jit_compile = jit_compile
    # Known without the model (the launcher describes it): asking a shared model's proxy would
    # cost a round trip per batch.
    self._model_id = model_id or default_model_id(model_handle, checkpoint, seed, compute_dtype)
    self._run_token = uuid.uuid4().hex  # the same in every worker: numbers this run's loads
    self._splits = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'oom_batch_splits')
    self._warned_sizes = set()  # one warning per batch size and process, not one per batch

  def load_model(self) -> Union['EmbeddingModel', SharedBatchModel]:
    from models.loading import load_embedding_model
    gpus = configure_gpus()
    device = device_for_load(self._run_token)
    embedding_model = load_embedding_model(
        self._model_handle, self._checkpoint, self._seed, self._compute_dtype, device=device,
        jit_compile=self._jit_compile, max_batch_size=self._max_batch_size)
    logging.info('%s runs on %s (%d GPU(s) here%s%s)', self._model_handle, device or 'the CPU',
                 len(gpus), ', shared across processes' if self.share_model_across_processes()
                 else '', ', XLA' if self._jit_compile else '')
    if self.share_model_across_processes():
      return SharedBatchModel(embedding_model)
    return embedding_model

  def run_inference(self, batch: Sequence[np.ndarray],
                    model: Union['EmbeddingModel', SharedBatchModel],
                    inference_args: Optional[Dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    """Features, or a RefusedImage for each image the model refused; other errors raise."""
    data_errors, _ = _errors()
    try:
      outputs = list(self._embed_fitting(batch, model))
    except data_errors as exc:
      if len(batch) == 1:
        outputs = [_refused(exc)]
      else:
        logging.warning('a batch of %d was refused (%s: %s); embedding its images one by one',
                        len(batch), type(exc).__name__, _refused(exc).message)
        outputs = [self._embed_alone(image, model) for image in batch]
    return [PredictionResult(None, output, self._model_id) for output in outputs]

  def _embed_fitting(self, batch: Sequence[np.ndarray], model) -> np.ndarray:
    """`_embed`, halving the batch while it runs out of memory; one image out of memory
    raises."""
    _, out_of_memory = _errors()
    try:
      return self._embed(batch, model)
    except out_of_memory as exc:
      if len(batch) == 1:
        raise
      half = len(batch) // 2
      self._splits.inc()
      if len(batch) not in self._warned_sizes:
        self._warned_sizes.add(len(batch))
        logging.warning('out of memory for a batch of %d (%s); embedding it as batches of %d '
                        'and %d: a smaller --max_batch_size avoids the retries', len(batch),
                        _refused(exc).message[:200], half, len(batch) - half)
    return np.concatenate([self._embed_fitting(batch[:half], model),
                           self._embed_fitting(batch[half:], model)])

  def _embed(self, batch: Sequence[np.ndarray], model) -> np.ndarray:
    if self.share_model_across_processes():
      return embed_batch(model, batch)  # `model` is Beam's proxy of a SharedBatchModel
    return model.embed(np.stack(batch))

  def _embed_alone(self, image: np.ndarray, model):
    try:
      return self._embed([image], model)[0]
    except _errors()[0] as exc:
      return _refused(exc)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


class _ToEmbedding(beam.DoFn):
  """A result: the image's Embedding, or its dead-letter record if the model refused it."""

  def __init__(self):
    self._embedded = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'embedded')
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'failed')

  def setup(self):
    quiet_logs.install()
    self._progress = ProgressReporter.for_process()

  def process(self, keyed_result):
    key, result = keyed_result
    if isinstance(result.inference, RefusedImage):
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
          key.uri, INFERENCE, result.inference.error, result.inference.message, key.size_bytes,
          key.last_modified, key.sha256, key.content_id))
      return
    self._embedded.inc()
    self._progress.add()
    yield Embedding(**key._asdict(), model=result.model_id,
                    embedding=np.asarray(result.inference, np.float32))


def _key_pixels(image: DecodedImage):
  return ImageKey(image.uri, image.sha256, image.height, image.width, image.size_bytes,
                  image.last_modified, image.content_id, image.byte_offset,
                  image.byte_length), image.pixels


class EmbedImages(beam.PTransform):
  """DecodedImage -> Embedding, plus Failure records under FAILURES_TAG."""

  def __init__(self, handler: ImageEmbeddingModelHandler):
    super().__init__()
    self._handler = handler

  def expand(self, images):
    keyed = images | 'Key' >> beam.Map(_key_pixels)
    results = keyed | 'RunInference' >> RunInference(KeyedModelHandler(self._handler))
    split = results | 'ToEmbedding' >> beam.ParDo(_ToEmbedding()).with_outputs(
        FAILURES_TAG, main='embeddings')
    return {'embeddings': split.embeddings, FAILURES_TAG: split[FAILURES_TAG]}
