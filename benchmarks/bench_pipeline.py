"""The whole pipeline against the bare model, in-process and with the model shared across processes.

One run measures, one after the other on the same JPEGs, decode and batch size:
  * the bare model: one process reads, decodes, stacks batches and calls the model in a loop;
  * the pipeline with a model in each worker process (the default);
  * the pipeline with one model per machine fed through shared memory (`--large_model`);
and prints images/s, each pipeline's ratio to the bare model, shared/in-process, and the peak
resident memory of every process. Each measurement runs in a process of its own; model loading and
(for the pipeline) worker start-up are included, as a user waits for them. `--model null` is the
near-zero-compute SavedModel of benchmarks/null_model.py, which exposes the pipeline's overhead.

    python -m benchmarks.bench_pipeline --model null --images 600
    python -m benchmarks.bench_pipeline --model builtin:pnasnet_mobile --images 64
    python -m benchmarks.bench_pipeline --micro  # the shared path alone, to an instant model
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

FEATURE_SIZE = 4320
IMAGE_SIZE = 331
PIPELINES = {'pipeline, in-process': [], 'pipeline, shared (--large_model)': ['--large_model']}


def write_jpegs(folder: str, count: int) -> None:
  """Small photos-like JPEGs (smooth colour fields with noise), 320x240, all different."""
  from PIL import Image
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:240, 0:320].astype(np.float32)
  for i in range(count):
    a, b, c = rng.random(3) * 0.05
    field = np.stack([np.sin(a * x + i), np.cos(b * y), np.sin(c * (x + y))], axis=-1)
    pixels = (field + 1) * 110 + rng.normal(0, 8, field.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def bare_model(folder: str, handle: str, batch_size: int) -> dict:
  from models.description import describe_model
  from models.loading import load_embedding_model
  from transforms.decode import decode_and_resize
  started = time.perf_counter()
  model_description = describe_model(handle)
  embedding_model = load_embedding_model(handle)
  loaded = time.perf_counter()
  paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      with open(path, 'rb') as f:
        batch.append(decode_and_resize(f.read(), model_description.height,
                                       model_description.width)[2])
    embedding_model.embed(np.stack(batch))
  finished = time.perf_counter()
  return {'images': len(paths), 'seconds': finished - started,
          'images_per_second': len(paths) / (finished - started),
          'load_seconds': loaded - started}


def pipeline(folder: str, handle: str, batch_size: int, runner_args: list, extra: list) -> dict:
  from pipeline.launcher import run
  started = time.perf_counter()
  summary = run([f'--input={folder}/*.jpg', f'--output={tempfile.mkdtemp()}/out',
                 f'--model={handle}', f'--min_batch_size={batch_size}',
                 f'--max_batch_size={batch_size}'] + runner_args + extra)
  seconds = time.perf_counter() - started
  assert summary['failed'] == 0, summary
  return {'images': summary['embedded'], 'seconds': seconds,
          'images_per_second': summary['embedded'] / seconds}


class InstantModel:
  """Returns features at once, without looking at the pixels."""

  def embed(self, images: np.ndarray) -> np.ndarray:
    return np.zeros((len(images), FEATURE_SIZE), np.float32)


def _shared_instant_model():
  from models.shared_batches import SharedBatchModel
  return SharedBatchModel(InstantModel())


def micro(batch_size: int, seconds: float) -> dict:
  """Images/s from this process to a model in another that returns at once: through shared
  memory, and pickled through Beam's proxy (the path before shared memory)."""
  from apache_beam.utils.multi_process_shared import MultiProcessShared
  from models.shared_batches import embed_batch
  images = list(np.random.default_rng(0).random((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                dtype=np.float32))
  paths = {
      'shared memory': (_shared_instant_model, lambda model: embed_batch(model, images)),
      'pickled through the proxy': (InstantModel,
                                    lambda model: model.embed(np.stack(images))),
  }
  rates = {}
  for name, (constructor, call) in paths.items():
    model = MultiProcessShared(constructor, tag=f'bench_{uuid.uuid4().hex}', always_proxy=True,
                               spawn_process=True).acquire()
    call(model)  # connect, map, touch the pages once
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
      call(model)
      calls += 1
    rates[name] = calls * batch_size / (time.perf_counter() - started)
  return rates


class PeakMemory:
  """Peak resident memory (VmHWM) of a process and all its descendants, sampled while it runs."""

  def __init__(self, pid: int):
    self._root = pid
    self.peaks = {}  # pid -> (command, peak MiB)
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def _descendants(self) -> list:
    children = {}
    for entry in os.listdir('/proc'):
      if entry.isdigit():
        try:
          with open(f'/proc/{entry}/stat') as f:
            ppid = int(f.read().rsplit(')', 1)[1].split()[1])
          children.setdefault(ppid, []).append(int(entry))
        except OSError:
          pass
    found, todo = [], [self._root]
    while todo:
      pid = todo.pop()
      found.append(pid)
      todo += children.get(pid, [])
    return found

  def _sample(self):
    while os.path.exists(f'/proc/{self._root}'):
      for pid in self._descendants():
        try:
          with open(f'/proc/{pid}/status') as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith('VmHWM'))
          with open(f'/proc/{pid}/cmdline', 'rb') as f:
            command = f.read().replace(b'\0', b' ').decode(errors='replace')
        except (OSError, StopIteration):
          continue
        self.peaks[pid] = (command, max(peak / 1024, self.peaks.get(pid, ('', 0))[1]))
      time.sleep(0.2)

  def summary(self) -> str:
    self._thread.join()
    rows = sorted(((_role(cmd, pid == self._root), mib) for pid, (cmd, mib) in self.peaks.items()
                   if mib > 50), key=lambda row: -row[1])
    return ', '.join(f'{role} {mib:,.0f}' for role, mib in rows)


def _role(command: str, root: bool) -> str:
  if root:
    return 'main'
  if 'sdk_worker' in command:
    return 'worker'
  if 'multiprocessing' in command:
    return 'spawned'
  return command.split()[-1][:40]


def _child(mode: str, args, folder: str, handle: str, runner_args: list) -> dict:
  """Runs one measurement in a process of its own, sampling its memory."""
  command = [sys.executable, '-m', 'benchmarks.bench_pipeline', '--child', mode,
             '--folder', folder, '--model', handle, '--batch_size', str(args.batch_size),
             '--runner_args', json.dumps(runner_args)]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
  memory = PeakMemory(process.pid)
  stdout, _ = process.communicate()
  if process.returncode:
    raise RuntimeError(f'{mode} failed ({process.returncode})')
  result = json.loads(stdout.strip().splitlines()[-1])
  result['peak_rss_mib'] = memory.summary()
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='null',
                      help='null (benchmarks/null_model.py), a builtin: handle or a model path')
  parser.add_argument('--images', type=int, default=600)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--runner_args', default=json.dumps(
      ['--direct_running_mode=multi_processing', '--direct_num_workers=2']),
                      help='JSON list of Beam runner flags for the pipeline runs')
  parser.add_argument('--micro', action='store_true',
                      help='only the shared path alone, to a model that returns at once')
  parser.add_argument('--seconds', type=float, default=5.0, help='per path, with --micro')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--folder', help=argparse.SUPPRESS)
  args = parser.parse_args()
  runner_args = json.loads(args.runner_args)

  if args.child:
    if args.child == 'bare':
      result = bare_model(args.folder, args.model, args.batch_size)
    elif args.child == 'micro':
      result = micro(args.batch_size, args.seconds)
    else:
      result = pipeline(args.folder, args.model, args.batch_size, runner_args,
                        PIPELINES[args.child])
    print(json.dumps(result))
    return

  print(f'CPU: {os.cpu_count()} cores (shared machine: figures vary run to run)')
  if args.micro:
    command = [sys.executable, '-m', 'benchmarks.bench_pipeline', '--child', 'micro',
               '--batch_size', str(args.batch_size), '--seconds', str(args.seconds)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    memory = PeakMemory(process.pid)
    rates = json.loads(process.communicate()[0].strip().splitlines()[-1])
    print(f'{args.batch_size} float32 images of {IMAGE_SIZE}x{IMAGE_SIZE}x3 per call, one '
          f'calling process, a model in another process that returns at once:')
    for name, rate in rates.items():
      print(f'  {name:<28}{rate:>9,.0f} images/s')
    print(f'  peak RSS MiB: {memory.summary()}')
    return

  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'images')
    os.makedirs(folder)
    write_jpegs(folder, args.images)
    handle = args.model
    if handle == 'null':
      from benchmarks.null_model import write_null_model
      handle = write_null_model(os.path.join(tmp, 'null_model'))
    print(f'{args.images} JPEGs 320x240, model {args.model}, batch {args.batch_size}, '
          f'pipeline runner flags {" ".join(runner_args)}')
    results = {'bare model': _child('bare', args, folder, handle, runner_args)}
    for name in PIPELINES:
      results[name] = _child(name, args, folder, handle, runner_args)
    bare = results['bare model']['images_per_second']
    for name, result in results.items():
      ratio = '' if name == 'bare model' else f'  {result["images_per_second"] / bare:.2f}x bare'
      print(f'{name:<34}{result["images"]:>5} images {result["seconds"]:>7.1f} s '
            f'{result["images_per_second"]:>8.1f} images/s{ratio}')
      print(f'{"":<34}peak RSS MiB: {result["peak_rss_mib"]}')
    in_process, shared = (results[name]['images_per_second'] for name in PIPELINES)
    print(f'shared / in-process: {shared / in_process:.2f}x; bare model load '
          f'{results["bare model"]["load_seconds"]:.1f} s (included above)')


if __name__ == '__main__':
  main()
