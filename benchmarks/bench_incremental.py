"""What a nightly incremental run costs against the first full run.

Run 1 embeds a folder of small JPEGs into a new collection (--collection); a few per cent more are
added; run 2 over the whole folder, against the same collection, reads and embeds only the new
files and commits them. Both with the null
model (the pipeline's own cost) or a real network, through the launcher, timed end to end.

    python -m benchmarks.bench_incremental [--images 2000] [--new_fraction 0.05] [--model M]
"""

import argparse
import os
import shutil
import tempfile
import time

from benchmarks.bench_memory import write_images
from benchmarks.null_model import write_null_model
from pipeline.launcher import run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--new_fraction', type=float, default=0.05)
  parser.add_argument('--model', default=None, help='default: the null model')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench-incremental-')
  try:
    model = args.model or write_null_model(os.path.join(work, 'null_model'))
    everything = os.path.join(work, 'all')
    write_images(everything, args.images)
    photos = os.path.join(work, 'photos')
    os.makedirs(photos)
    names = sorted(os.listdir(everything))
    new = max(1, int(len(names) * args.new_fraction))
    for name in names[:-new]:
      shutil.copy(os.path.join(everything, name), photos)
    runs = []
    for number in (1, 2):
      if number == 2:
        for name in names[-new:]:
          shutil.copy(os.path.join(everything, name), photos)
      started = time.monotonic()
      summary = run([f'--input={photos}', f'--model={model}', f'--output={work}/runs/{number}',
                     f'--collection={work}/collection'])
      runs.append((time.monotonic() - started, summary))
    for number, (seconds, summary) in enumerate(runs, 1):
      print(f'run {number}: matched {summary["matched"]}, embedded {summary["embedded"]}, '
            f'skipped {summary["skipped"]}: {seconds:.1f} s')
    print(f'run 2 / run 1 wall time: {runs[1][0] / runs[0][0]:.2f} '
          f'({new} new of {args.images} images)')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
