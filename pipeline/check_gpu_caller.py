"""A decoding SDK process of the GPU self-check (pipeline/gpu_check.py starts several).

It does what an SDK process of the GPU step does on a Dataflow VM while another process holds the
shared model: decode JPEGs, resize them, hand the batches over through shared memory; no
TensorFlow op. It prints what it did, and whether TensorFlow initialised its devices here.

    python -m pipeline.check_gpu_caller TAG HEIGHT WIDTH BATCH_SIZE SEED
"""

import io
import json
import os
import sys
from typing import Dict

import numpy as np
from apache_beam.utils.multi_process_shared import MultiProcessShared
from PIL import Image

from models.gpus import devices_initialised
from models.shared_batches import embed_batch
from transforms.decode import decode_and_resize

PHOTO_SIZE = (640, 480)
BATCHES = 2


def photo(seed: int) -> bytes:
  """A JPEG the size of a small photo, of smooth random colour (it compresses as photos do)."""
  small = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(small).resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(buffer, 'JPEG',
                                                                            quality=90)
  return buffer.getvalue()


def decode_and_embed(tag: str, height: int, width: int, batch_size: int, seed: int) -> Dict:
  model = MultiProcessShared(lambda: None, tag=tag, always_proxy=True).acquire()
  shapes = set()
  for batch in range(BATCHES):
    first = (seed * BATCHES + batch) * batch_size
    pixels = [decode_and_resize(photo(first + i), height, width)[2] for i in range(batch_size)]
    features = embed_batch(model, pixels)
    if not np.all(np.isfinite(features)):
      raise ValueError('the shared model returned non-finite features')
    shapes.add(tuple(features.shape))
  return {'pid': os.getpid(), 'images': BATCHES * batch_size,
          'feature_shape': sorted(shapes)[-1], 'devices_initialised': devices_initialised()}


if __name__ == '__main__':
  tag, height, width, batch_size, seed = sys.argv[1:]
  print(json.dumps(decode_and_embed(tag, int(height), int(width), int(batch_size), int(seed))))
