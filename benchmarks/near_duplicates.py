"""How close are a photo's resized and re-encoded copies to it, against other photos?

Embeds the sample photos and two copies of each (half size, Lanczos, same format; full size
re-encoded as JPEG quality 75) with a model (any handle `--model` takes), then prints per photo
the cosine to each copy, the best cosine to any other photo, and the copies' ranks among the
original's neighbours.
The near-duplicate default threshold of `pnasnet-embeddings duplicates` (embeddings/duplicates.py)
was chosen from these figures.

    python -m benchmarks.near_duplicates [--model builtin:pnasnet_large] [--seed 0] \
        [--checkpoint PATH/model.ckpt]
"""

import argparse
import glob
import io
import os

import numpy as np
from PIL import Image

SAMPLE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'sample_images')
COPIES = ('resized', 'reencoded')


def copies_of(data: bytes) -> dict:
  """The two everyday copies of a photo: {'resized': bytes, 'reencoded': bytes}."""
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    image_format = image.format
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    resized, reencoded = io.BytesIO(), io.BytesIO()
    half.save(resized, format=image_format, **({'quality': 90} if image_format == 'JPEG' else {}))
    image.convert('RGB').save(reencoded, format='JPEG', quality=75)
  return {'resized': resized.getvalue(), 'reencoded': reencoded.getvalue()}


def sample_photos() -> dict:
  return {os.path.basename(p): open(p, 'rb').read()
          for p in sorted(glob.glob(os.path.join(SAMPLE_IMAGES, '*')))
          if not p.endswith('.md')}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='builtin:pnasnet_large')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--checkpoint', help='TF-Slim checkpoint of a builtin: model')
  args = parser.parse_args()
  from models.loading import load_embedding_model
  from transforms.decode import decode_and_resize
  model = load_embedding_model(args.model, args.checkpoint, seed=args.seed)
  description = model.describe()
  names, photo_of, pixels = [], [], []
  for name, data in sample_photos().items():
    for variant, variant_data in [('original', data)] + list(copies_of(data).items()):
      names.append(f'{name}/{variant}')
      photo_of.append(name)
      pixels.append(decode_and_resize(variant_data, description.height, description.width)[2])
  vectors = np.concatenate([model.embed(np.stack(pixels[i:i + 6]))
                            for i in range(0, len(pixels), 6)])
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  cosine = vectors @ vectors.T
  photo_of = np.array(photo_of)
  print(f'{description.model_id}: {description.feature_size}-d')
  print(f'{"photo":<24} {"resized":>8} {"reencoded":>9} {"best other":>10}  copies ranked')
  same, other = [], []
  for i, name in enumerate(names):
    if not name.endswith('/original'):
      continue
    order = [j for j in np.argsort(-cosine[i]) if j != i]
    copy_cosines = [cosine[i, i + 1 + c] for c in range(len(COPIES))]
    best_other = max(cosine[i, j] for j in order if photo_of[j] != photo_of[i])
    ranks = [order.index(i + 1 + c) + 1 for c in range(len(COPIES))]
    same += copy_cosines
    other.append(best_other)
    print(f'{photo_of[i]:<24} {copy_cosines[0]:8.4f} {copy_cosines[1]:9.4f} {best_other:10.4f}'
          f'  {ranks}')
  distinct = cosine[photo_of[:, None] != photo_of[None, :]]
  print(f'copies: min cosine {min(same):.4f}; different photos: max {distinct.max():.4f}, '
        f'mean {distinct.mean():.4f}')


if __name__ == '__main__':
  main()
