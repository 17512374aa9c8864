"""Embeds an image as a run did: its model, weights, seed, compute dtype and crop, from
run_summary.json, so the new vector is comparable with the run's."""

import numpy as np

from embeddings.runs import Run


def embed_image(data: bytes, run: Run) -> np.ndarray:
  """The image's vector under the run's model; checks it is the model the run recorded."""
  from models.loading import load_embedding_model
  from transforms.decode import decode_and_resize
  summary = run.summary
  embedding_model = load_embedding_model(summary.model_handle, summary.checkpoint,
                                         summary.seed or 0, summary.compute_dtype)
  description = embedding_model.describe()
  if description.model_id != run.model:
    raise ValueError(f'{run.path} was embedded with {run.model}, but its summary\'s options '
                     f'load {description.model_id}')
  _, _, pixels = decode_and_resize(data, description.height, description.width,
                                   summary.center_crop_fraction, jpeg_draft=summary.jpeg_draft)
  return embedding_model.embed(pixels[np.newaxis])[0]
