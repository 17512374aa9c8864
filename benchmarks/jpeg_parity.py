"""JPEG decoding without TensorFlow against `tf.io.decode_jpeg` (the recipe's decoder).

Two corpora made from the sample photos: every JPEG variant Pillow writes (qualities, chroma
subsampling, progressive, greyscale, odd sizes), where the pixels must be equal bit for bit; and
corrupted copies of the sample JPEGs (bytes changed, cut short, both), where what matters is that
both accept and refuse the same files, and agree on the pixels of the files both accept.

    python -m benchmarks.jpeg_parity [--corrupted 300]
"""

import argparse
import io
import os
from typing import Dict, Iterator, Tuple

import numpy as np
from PIL import Image

from transforms.decode import _jpeg_pixels

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'sample_images')


def _encode(image: Image.Image, **params) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', **params)
  return buffer.getvalue()


def jpeg_variants(qualities=(50, 75, 95, 100), subsamplings=(0, 1, 2)) -> Dict[str, bytes]:
  """The sample JPEGs as they are, and each sample photo re-encoded in every variant."""
  cases = {}
  for name in sorted(os.listdir(SAMPLES)):
    path = os.path.join(SAMPLES, name)
    if name.endswith('.jpg'):
      with open(path, 'rb') as f:
        cases[name] = f.read()
    if not name.endswith(('.jpg', '.png')):
      continue
    image = Image.open(path).convert('RGB')
    for quality in qualities:
      for subsampling in subsamplings:
        for progressive in (False, True):
          cases[f'{name} q{quality} subsampling {subsampling}'
                f'{" progressive" if progressive else ""}'] = _encode(
                    image, quality=quality, subsampling=subsampling, progressive=progressive)
    cases[f'{name} greyscale'] = _encode(image.convert('L'), quality=90)
    cases[f'{name} 333x217'] = _encode(image.resize((333, 217)), quality=85)
  return cases


def corrupted_jpegs(count: int, seed: int = 0) -> Iterator[Tuple[str, bytes]]:
  """Copies of the sample JPEGs with 1-3 bytes changed past the headers, cut short, or both."""
  rng = np.random.default_rng(seed)
  for name in ('hubble_deep_field.jpg', 'rocket.jpg'):
    with open(os.path.join(SAMPLES, name), 'rb') as f:
      original = f.read()
    for i in range(count):
      data = bytearray(original)
      kind = ('bytes changed', 'cut short', 'both')[i % 3]
      if kind != 'cut short':
        for _ in range(rng.integers(1, 4)):
          data[int(rng.integers(600, len(data) - 10))] = int(rng.integers(0, 256))
      if kind != 'bytes changed':
        data = data[:int(rng.integers(600, len(data)))]
      yield f'{name} {kind}', bytes(data)


def tf_pixels(data: bytes):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    return tf.io.decode_jpeg(data, channels=3).numpy()
  except tf.errors.InvalidArgumentError:
    return None


def our_pixels(data: bytes):
  try:
    return _jpeg_pixels(data)
  except OSError:
    return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--corrupted', type=int, default=300, help='corrupted copies per sample JPEG')
  args = parser.parse_args()
  variants = jpeg_variants()
  unequal = [name for name, data in variants.items()
             if not np.array_equal(tf_pixels(data), our_pixels(data))]
  print(f'clean JPEGs: {len(variants)}, pixels equal to tf.io.decode_jpeg in '
        f'{len(variants) - len(unequal)}' + (f'; unequal: {unequal}' if unequal else ''))
  outcomes = {}
  pixel_mismatches = 0
  for kind, data in corrupted_jpegs(args.corrupted):
    theirs, ours = tf_pixels(data), our_pixels(data)
    key = (kind.split(' ', 1)[1], 'TF decodes' if theirs is not None else 'TF refuses',
           'we decode' if ours is not None else 'we refuse')
    outcomes[key] = outcomes.get(key, 0) + 1
    pixel_mismatches += theirs is not None and ours is not None and not np.array_equal(theirs, ours)
  print('corrupted JPEGs:')
  for (kind, theirs, ours), n in sorted(outcomes.items()):
    print(f'  {kind}: {theirs}, {ours}: {n}')
  print(f'  files both decode with different pixels: {pixel_mismatches}')


if __name__ == '__main__':
  main()
