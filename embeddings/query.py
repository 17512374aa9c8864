"""Embeds an image as a run did: its model, weights, seed, compute dtype and crop, from
run_summary.json, so the new vector is comparable with the run's."""

import re
from typing import NamedTuple, Optional

import numpy as np

from embeddings.runs import Run

_UNTRAINED = re.compile(r'^(?P<handle>builtin:[A-Za-z0-9_]+)@untrained-seed(?P<seed>\d+)$')


class RunModel(NamedTuple):
  handle: str
  checkpoint: Optional[str]
  seed: int
  compute_dtype: str
  center_crop_fraction: float
  jpeg_draft: bool


def run_model(summary: dict) -> RunModel:
  """The run's model options; a summary without them names the model only, so an untrained
  builtin id (`builtin:NAME@untrained-seedN`) gives handle and seed, and anything else is the
  handle itself."""
  handle, seed = summary.get('model_handle'), summary.get('seed')
  if handle is None:
    untrained = _UNTRAINED.match(summary['model'])
    handle = untrained['handle'] if untrained else summary['model']
    if untrained and seed is None:
      seed = int(untrained['seed'])
  return RunModel(handle, summary.get('checkpoint'), int(seed or 0),
                  summary.get('compute_dtype') or 'float32',
                  float(summary.get('center_crop_fraction') or 1.0),
                  bool(summary.get('jpeg_draft', False)))


def embed_image(data: bytes, run: Run) -> np.ndarray:
  """The image's vector under the run's model; checks it is the model the run recorded."""
  from models.loading import load_embedding_model
  from transforms.decode import decode_and_resize
  options = run_model(run.summary)
  model = load_embedding_model(options.handle, options.checkpoint, options.seed,
                               options.compute_dtype)
  description = model.describe()
  if description.model_id != run.model:
    raise ValueError(f'{run.path} was embedded with {run.model}, but its summary\'s options '
                     f'load {description.model_id}')
  _, _, pixels = decode_and_resize(data, description.height, description.width,
                                   options.center_crop_fraction, jpeg_draft=options.jpeg_draft)
  return model.embed(pixels[np.newaxis])[0]
