"""Peak memory of a run as the input grows: 1,000 and 5,000 small images, the null model.

Each run is `pnasnet-embeddings embed` (started as `run_pipeline.py`) in a subprocess; the peak
resident set (the kernel's VmHWM) of the launcher and of every worker process it starts is sampled
from /proc until the run ends. With
the null model the figures are the pipeline's own memory, not a network's.

    python -m benchmarks.bench_memory [--sizes 1000 5000] [--runners in_memory multi_processing]
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.null_model import write_null_model

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = {
    'in_memory': [],
    'multi_processing': ['--direct_running_mode=multi_processing', '--direct_num_workers=2'],
}


def write_images(folder: str, count: int) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  for index in range(count):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    with open(os.path.join(folder, f'img{index:05d}.jpg'), 'wb') as f:
      f.write(buffer.getvalue())


def _children() -> dict:
  """pid -> parent pid, for every process visible in /proc."""
  parents = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
      except OSError:
        pass
  return parents


def _peak_rss_mib(pid: int):
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    return None


def measure(argv: list) -> dict:
  """Runs the command; the peak RSS of the launcher and of its largest descendant, in MiB."""
  started = time.monotonic()
  process = subprocess.Popen([sys.executable, 'run_pipeline.py'] + argv, cwd=PROJECT,
                             env=dict(os.environ, PYTHONPATH=PROJECT),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  peaks = {}
  while process.poll() is None:
    parents = _children()
    family = {process.pid}
    grew = True
    while grew:
      found = {pid for pid, parent in parents.items() if parent in family} - family
      family |= found
      grew = bool(found)
    for pid in family:
      peak = _peak_rss_mib(pid)
      if peak is not None:
        peaks[pid] = max(peak, peaks.get(pid, 0))
    time.sleep(0.2)
  _, stderr = process.communicate()
  if process.returncode:
    raise RuntimeError(stderr.decode()[-2000:])
  workers = [peak for pid, peak in peaks.items() if pid != process.pid]
  return {'launcher': peaks.get(process.pid), 'worker': max(workers, default=None),
          'seconds': time.monotonic() - started}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 5000])
  parser.add_argument('--runners', nargs='+', choices=sorted(RUNNERS),
                      default=['in_memory', 'multi_processing'])
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as work:
    model = write_null_model(os.path.join(work, 'null_model'))
    for size in args.sizes:
      images = os.path.join(work, f'images{size}')
      write_images(images, size)
      for runner in args.runners:
        figures = measure([f'--input={images}/*', f'--output={work}/out-{size}-{runner}',
                           f'--model={model}', '--max_batch_size=16'] + RUNNERS[runner])
        worker = f'{figures["worker"]:.0f} MiB' if figures['worker'] else '-'
        print(f'{size} images, {runner}: peak RSS launcher {figures["launcher"]:.0f} MiB, '
              f'largest worker {worker}; {figures["seconds"]:.1f} s', flush=True)


if __name__ == '__main__':
  main()
