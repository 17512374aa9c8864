"""Embeds an image as a run did: its model, weights, seed, compute dtype and crop, from
run_summary.json, so the new vector is comparable with the run's."""

import numpy as np

from embeddings.runs import Run


def embed_image(data: bytes, run: Run) -> np.ndarray:
  """The image's vector under the run's model; checks it is the model the run recorded."""
  from transforms.decode import decode_and_resize
  from transforms.models import load_model
  options = run.summary
  model = load_model(options.model_handle, options.checkpoint, options.seed or 0,
                     options.compute_dtype)
  description = model.describe()
  if description.model_id != run.model:
    raise ValueError(f'{run.path} was embedded with {run.model}, but its summary\'s options '
                     f'load {description.model_id}')
  _, _, pixels = decode_and_resize(data, description.height, description.width,
                                   options.center_crop_fraction, jpeg_draft=options.jpeg_draft)
  return model.embed(pixels[np.newaxis])[0]
