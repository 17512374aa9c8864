"""Stage 3: RunInference with the project's ModelHandler, one model per process (or per VM)."""

import logging
import uuid
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

from models.gpus import configure_gpus, device_for_load
from models.handles import model_id as default_model_id
from models.loading import EmbeddingModel, load_embedding_model
from models.shared_batches import SharedBatchModel, embed_batch
from transforms.decode import DecodedImage
from transforms.failures import FAILURES_TAG, INFERENCE, Failure
from transforms import quiet_logs
from transforms.progress import ProgressReporter

METRICS_NAMESPACE = 'embed'


class ImageKey(NamedTuple):
  """What travels beside the pixels through RunInference, to be written with the embedding."""
  uri: str
  sha256: str
  height: int
  width: int
  size_bytes: int
  last_modified: Optional[int]


class Embedding(NamedTuple):
  uri: str
  sha256: str
  height: int
  width: int
  size_bytes: int
  last_modified: Optional[int]  # microseconds since the Unix epoch, from the file listing
  model: str
  embedding: np.ndarray  # float32 [feature_size]


class ImageEmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, EmbeddingModel]):
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

  def load_model(self) -> Union[EmbeddingModel, SharedBatchModel]:
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
                    model: Union[EmbeddingModel, SharedBatchModel],
                    inference_args: Optional[Dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    if self.share_model_across_processes():
      features = embed_batch(model, batch)  # `model` is Beam's proxy of a SharedBatchModel
    else:
      features = model.embed(np.stack(batch))
    return [PredictionResult(None, vector, self._model_id) for vector in features]

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


class _ToEmbedding(beam.DoFn):

  def __init__(self):
    self._embedded = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'embedded')

  def setup(self):
    quiet_logs.install()
    self._progress = ProgressReporter.for_process()

  def process(self, keyed_result):
    key, result = keyed_result
    self._embedded.inc()
    self._progress.add()
    yield Embedding(*key, model=result.model_id,
                    embedding=np.asarray(result.inference, np.float32))


class _FailedBatch(beam.DoFn):
  """A batch that failed inference: one dead-letter record per image in it."""

  def __init__(self):
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'failed')

  def process(self, failed):
    batch, (error, message, _) = failed[0], failed[1]
    for key, _pixels in batch:
      self._failed.inc()
      yield Failure(key.uri, INFERENCE, getattr(error, '__name__', str(error)), str(message),
                    key.size_bytes, key.last_modified, key.sha256)


def _key_pixels(image: DecodedImage):
  return ImageKey(image.uri, image.sha256, image.height, image.width, image.size_bytes,
                  image.last_modified), image.pixels


class EmbedImages(beam.PTransform):
  """DecodedImage -> Embedding, plus Failure records under FAILURES_TAG."""

  def __init__(self, handler: ImageEmbeddingModelHandler):
    super().__init__()
    self._handler = handler

  def expand(self, images):
    keyed = images | 'Key' >> beam.Map(_key_pixels)
    results, dead_letters = (keyed | 'RunInference' >> RunInference(
        KeyedModelHandler(self._handler)).with_exception_handling())
    embeddings = results | 'ToEmbedding' >> beam.ParDo(_ToEmbedding())
    failures = dead_letters.failed_inferences | 'FailedBatch' >> beam.ParDo(_FailedBatch())
    return {'embeddings': embeddings, FAILURES_TAG: failures}
