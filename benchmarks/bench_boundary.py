"""Bytes per image at each place the GPU step could start and end (Dataflow right fitting).

Steps with different resource hints run on different workers, so every element between them
crosses Dataflow's shuffle, encoded by Beam's coder for these (untyped) PCollections
(`FastPrimitivesCoder`, which pickles NamedTuples). Candidates for the way in: the file reference
(`FileRef`: uri, size, modification time; the boundary used), the encoded file (`ImageFile`),
uint8 pixels, the float32 pixels the model takes (`DecodedImage`). The way out: the `Embedding`
(the vector and its metadata) that the CPU workers write.

    python -m benchmarks.bench_boundary [--size 331] [--feature_size 4320]
"""

import argparse
import hashlib
import os

import apache_beam as beam
import numpy as np

from transforms.decode import DecodedImage, decode_and_resize
from transforms.embed import Embedding
from transforms.read import FileRef, ImageFile

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'sample_images')
# A URI as long as a dated photo path in a bucket, the same for every photo.
URI = 'gs://my-photo-bucket/photos/2026/11/27/{name}'
MODEL_ID = 'builtin:pnasnet_large+float16'
COLUMNS = ('file reference (FileRef)', 'encoded file (ImageFile)', 'uint8 pixels',
           'float32 pixels (DecodedImage)', 'embedding (Embedding)')


def element_sizes(name: str, data: bytes, size: int, feature_size: int) -> tuple:
  coder = beam.coders.FastPrimitivesCoder()
  uri = URI.format(name=name)
  modified = 1_796_116_991_000_000
  height, width, pixels = decode_and_resize(data, size, size)
  sha256 = hashlib.sha256(data).hexdigest()
  elements = (
      FileRef(uri, len(data), modified),
      ImageFile(uri, len(data), modified, data),
      np.round(pixels * 255).astype(np.uint8),
      DecodedImage(uri, sha256, height, width, len(data), modified, pixels),
      Embedding(uri, sha256, height, width, len(data), modified, MODEL_ID,
                np.zeros(feature_size, np.float32)),
  )
  return tuple(len(coder.encode(element)) for element in elements)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=331)
  parser.add_argument('--feature_size', type=int, default=4320)
  args = parser.parse_args()
  rows = []
  for name in sorted(os.listdir(SAMPLES)):
    if name.endswith('.md'):
      continue
    with open(os.path.join(SAMPLES, name), 'rb') as f:
      rows.append((name, element_sizes(name, f.read(), args.size, args.feature_size)))
  print('| photo | ' + ' | '.join(COLUMNS) + ' |')
  print('|' + ' --- |' * (len(COLUMNS) + 1))
  for name, sizes in rows:
    print(f'| {name} | ' + ' | '.join(f'{s:,}' for s in sizes) + ' |')
  means = [sum(sizes[i] for _, sizes in rows) / len(rows) for i in range(len(COLUMNS))]
  print('| mean | ' + ' | '.join(f'{round(s):,}' for s in means) + ' |')
  print('| per 100M images | ' + ' | '.join(f'{s * 1e8 / 1e12:,.3f} TB' for s in means) + ' |')


if __name__ == '__main__':
  main()
