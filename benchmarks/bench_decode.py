"""Decode+resize milliseconds per image, default path vs jpeg_draft, on the sample photos.

    python -m benchmarks.bench_decode [--runs 20] [--size 331]

Also times a 12-megapixel JPEG made from a sample (the size of a phone photo), where jpeg_draft
matters most; the samples are all at most 1000 pixels wide. Differences are in 1/255 units.
"""

import argparse
import io
import pathlib
import statistics
import time

import numpy as np
from PIL import Image

from transforms.decode import decode_and_resize

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'sample_images'


def _photos() -> list[tuple[str, bytes]]:
  photos = [(path.name, path.read_bytes())
            for path in sorted(SAMPLES.iterdir()) if path.suffix in ('.png', '.jpg')]
  large = Image.open(SAMPLES / 'rocket.jpg').resize((4032, 3024), Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  large.save(buffer, 'JPEG', quality=90)
  return photos + [('rocket_4032x3024.jpg (made)', buffer.getvalue())]


def _median_ms(data: bytes, size: int, runs: int, jpeg_draft: bool) -> tuple[float, np.ndarray]:
  decode_and_resize(data, size, size, jpeg_draft=jpeg_draft)  # Warm the per-size caches.
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    _, _, pixels = decode_and_resize(data, size, size, jpeg_draft=jpeg_draft)
    times.append((time.perf_counter() - start) * 1000)
  return statistics.median(times), pixels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=20)
  parser.add_argument('--size', type=int, default=331)
  args = parser.parse_args()
  print(f'decode+resize to {args.size}x{args.size}, median of {args.runs} runs')
  print(f'{"image":30s} {"W x H":>11s} {"default ms":>10s} {"draft ms":>9s} '
        f'{"draft max diff":>14s} {"draft mean diff":>15s}')
  for name, data in _photos():
    height, width, _ = decode_and_resize(data, args.size, args.size)
    default_ms, default = _median_ms(data, args.size, args.runs, jpeg_draft=False)
    row = f'{name:30s} {f"{width}x{height}":>11s} {default_ms:10.2f}'
    if Image.open(io.BytesIO(data)).format == 'JPEG':
      draft_ms, draft = _median_ms(data, args.size, args.runs, jpeg_draft=True)
      difference = np.abs(draft - default) * 255
      row += f' {draft_ms:9.2f} {difference.max():14.2f} {difference.mean():15.3f}'
    else:
      row += f' {"n/a (not JPEG)":>9s}'
    print(row)


if __name__ == '__main__':
  main()
