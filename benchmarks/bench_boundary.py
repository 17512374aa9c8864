"""Bytes per image at each place the GPU step could start (Dataflow right fitting).

Steps with different resource hints run on different workers, so every element between them
crosses Dataflow's shuffle: the encoded file (`ImageFile`), uint8 pixels, or the float32 pixels the
model takes (`DecodedImage`), each pickled as Beam moves it.

    python -m benchmarks.bench_boundary [--size 331]
"""

import argparse
import hashlib
import os
import pickle

import numpy as np

from transforms.decode import DecodedImage, decode_and_resize
from transforms.read import ImageFile

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'sample_images')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=331)
  args = parser.parse_args()
  rows = []
  for name in sorted(os.listdir(SAMPLES)):
    if name.endswith('.md'):
      continue
    with open(os.path.join(SAMPLES, name), 'rb') as f:
      data = f.read()
    encoded = ImageFile(f'gs://bucket/photos/{name}', len(data), 0, data)
    height, width, pixels = decode_and_resize(data, args.size, args.size)
    decoded = DecodedImage(encoded.uri, hashlib.sha256(data).hexdigest(), height, width,
                           len(data), 0, pixels)
    uint8 = np.round(pixels * 255).astype(np.uint8)
    rows.append((name, len(pickle.dumps(encoded)), len(pickle.dumps(uint8)),
                 len(pickle.dumps(decoded))))
  print('| photo | encoded file (ImageFile) | uint8 pixels | float32 pixels (DecodedImage) |')
  print('| --- | --- | --- | --- |')
  for name, *sizes in rows:
    print(f'| {name} | ' + ' | '.join(f'{s:,}' for s in sizes) + ' |')
  means = [sum(row[i] for row in rows) // len(rows) for i in (1, 2, 3)]
  print('| mean | ' + ' | '.join(f'{s:,}' for s in means) + ' |')


if __name__ == '__main__':
  main()
