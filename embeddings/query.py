"""Embeds an image as a run did: its model, weights, seed, compute dtype and crop, from
run_summary.json, so the new vector is comparable with the run's.

The first image costs TensorFlow's import and the network's build (PNASNet-5 Large: most of the
half minute a query by a new image takes, docs/performance.md); the network is kept for the
process, so later images of the same model (a browse page, a loop in Python) cost one forward
pass each."""

import functools

import numpy as np

from storage.run_dirs import Run


class UndecodableImage(ValueError):
  """The bytes are not an image the pipeline's decoder can read; the message says why."""


@functools.lru_cache(maxsize=1)  # one network at a time: PNASNet-5 Large holds about 360 MB
def _embedding_model(model_handle, checkpoint, seed, compute_dtype):
  from models.loading import load_embedding_model
  return load_embedding_model(model_handle, checkpoint, seed, compute_dtype)


def embed_image(data: bytes, run: Run) -> np.ndarray:
  """The image's vector under the run's model; checks it is the model the run recorded.

  Raises UndecodableImage before building any network if the pipeline would not decode it."""
  from transforms.decode import decode_and_resize
  summary = run.summary
  height, width = summary.image_size
  try:
    _, _, pixels = decode_and_resize(data, height, width, summary.center_crop_fraction,
                                     jpeg_draft=summary.jpeg_draft)
  except Exception as exc:  # pylint: disable=broad-except; what the pipeline dead-letters
    raise UndecodableImage(f'{type(exc).__name__}: {exc}') from exc
  embedding_model = _embedding_model(summary.model_handle, summary.checkpoint, summary.seed or 0,
                                     summary.compute_dtype)
  description = embedding_model.describe()
  if description.model_id != run.model:
    raise ValueError(f'{run.path} was embedded with {run.model}, but its summary\'s options '
                     f'load {description.model_id}')
  if (description.height, description.width) != (height, width):
    raise ValueError(f'{run.path} records images of {height}x{width}, but its model takes '
                     f'{description.height}x{description.width}')
  return embedding_model.embed(pixels[np.newaxis])[0]
