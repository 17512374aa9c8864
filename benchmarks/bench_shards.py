"""Shards as inputs: the pipeline over images in WebDataset tars against the same images as files,
the requests a shard costs on S3, and the memory of streaming a 1 GB tar.

  * images/s of `pnasnet-embeddings embed` (in-process runner, the null model of
    benchmarks/null_model.py, so that matching, reading and decoding are what is measured) over N
    small JPEGs as files in a folder, and as tars of 1,000 members (each with a `.txt` caption
    beside it, as WebDataset has them), at N = 1,000 and 10,000;
  * the HTTP requests the S3 server (moto, on loopback) answers while a shard's members are read
    (`storage.members.iter_members`, the code the pipeline's shard reader runs), for a 1,000-member
    shard and a 64 MB one;
  * the peak resident memory of a process that streams a 1 GB tar of random-bytes "images" (1 MB
    each) through the same reader, against its memory before.

    python -m benchmarks.bench_shards [--sizes 1000 10000]
"""

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

SHARD_MEMBERS = 1000
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_jpegs(count: int):
  rng = np.random.default_rng(0)
  for number in range(count):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    yield f'{number:06d}', buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def write_inputs(folder: str, count: int) -> None:
  """`folder/files/KEY.jpg` and `folder/shards/NNNNN.tar` holding the same JPEGs."""
  os.makedirs(os.path.join(folder, 'files'))
  os.makedirs(os.path.join(folder, 'shards'))
  archive = None
  for number, (key, data) in enumerate(small_jpegs(count)):
    with open(os.path.join(folder, 'files', f'{key}.jpg'), 'wb') as f:
      f.write(data)
    if number % SHARD_MEMBERS == 0:
      if archive:
        archive.close()
      archive = tarfile.open(os.path.join(folder, 'shards', f'{number // SHARD_MEMBERS:05d}.tar'),
                             'w')
    _add(archive, f'{key}.jpg', data)
    _add(archive, f'{key}.txt', f'caption {key}'.encode())
  archive.close()


def embed(inputs: str, output: str, model: str) -> dict:
  from pipeline.launcher import run
  started = time.perf_counter()
  summary = run([f'--input={inputs}', f'--output={output}', f'--model={model}'])
  seconds = time.perf_counter() - started
  return {'embedded': summary['embedded'], 'matched': summary['matched'], 'seconds': seconds,
          'images_per_second': summary['embedded'] / seconds}


def _child(kind: str, *args: str) -> dict:
  result = subprocess.run([sys.executable, '-m', 'benchmarks.bench_shards', '--child', kind,
                           *args], cwd=PROJECT, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{kind} failed: {result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


class _Requests(logging.Handler):
  """Counts the requests moto's server logs, by method."""

  def __init__(self):
    super().__init__()
    self.counts = {}

  def emit(self, record):
    found = re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) ', record.getMessage())
    if found:
      self.counts[found.group(1)] = self.counts.get(found.group(1), 0) + 1


def shard_requests() -> dict:
  """Requests per shard on S3, by method, for a 1,000-member shard and a 64 MB one."""
  sys.path.insert(0, PROJECT)
  import storage
  from storage.members import ShardFormat, iter_members
  from tests.s3_server import S3Server
  from transforms.shards import is_image_member
  server = S3Server().start()
  server.create_bucket('bench-shards')
  storage.set_filesystem_options(server.options)
  requests = _Requests()
  logging.getLogger('werkzeug').addHandler(requests)
  logging.getLogger('werkzeug').setLevel(logging.INFO)
  results = {}
  try:
    for name, members, size in (('1000 small JPEGs', SHARD_MEMBERS, None),
                                ('64 MB, 64 members of 1 MB', 64, 1 << 20)):
      buffer = io.BytesIO()
      with tarfile.open(fileobj=buffer, mode='w') as archive:
        for key, data in small_jpegs(members):
          _add(archive, f'{key}.jpg', os.urandom(size) if size else data)
          _add(archive, f'{key}.txt', b'caption')
      uri = f's3://bench-shards/{members}.tar'
      server.upload(uri, buffer.getvalue())
      requests.counts.clear()
      read = sum(1 for _ in iter_members(uri, ShardFormat('webdataset'), is_image_member))
      results[name] = {'members': read, 'bytes': len(buffer.getvalue()),
                       'requests': dict(requests.counts)}
  finally:
    server.stop()
  return results


def _status_mib(field: str) -> float:
  """VmRSS or VmHWM (the peak) of this process, from /proc: ru_maxrss would carry the launching
  process's peak across exec."""
  with open('/proc/self/status') as f:
    line = next(line for line in f if line.startswith(field + ':'))
  return int(line.split()[1]) / 1024


def stream_memory(path: str) -> dict:
  """Peak RSS while every member of the tar at `path` is read, one at a time."""
  from storage.members import ShardFormat, iter_members
  from transforms.shards import is_image_member
  before = _status_mib('VmHWM')
  started = time.perf_counter()
  members = total = 0
  for member in iter_members(path, ShardFormat('webdataset'), is_image_member):
    members, total = members + 1, total + len(member.data)
  seconds = time.perf_counter() - started
  return {'members': members, 'bytes': total, 'seconds': seconds,
          'peak_rss_mib_before': before,
          'peak_rss_mib': _status_mib('VmHWM')}


def write_big_tar(path: str, members: int, size: int) -> None:
  with tarfile.open(path, 'w') as archive:
    for number in range(members):
      _add(archive, f'{number:06d}.jpg', os.urandom(size))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 10000])
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('args', nargs='*', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child == 'embed':
    print(json.dumps(embed(*args.args)))
    return
  if args.child == 'memory':
    print(json.dumps(stream_memory(*args.args)))
    return

  print(f'CPU: {os.cpu_count()} cores (shared machine: figures vary run to run)')
  with tempfile.TemporaryDirectory() as tmp:
    from benchmarks.null_model import write_null_model
    model = write_null_model(os.path.join(tmp, 'null_model'))
    for count in args.sizes:
      folder = os.path.join(tmp, str(count))
      write_inputs(folder, count)
      for kind in ('files', 'shards'):
        result = _child('embed', os.path.join(folder, kind), os.path.join(folder, f'out-{kind}'),
                        model)
        held = 'files' if kind == 'files' else \
            f'{-(-count // SHARD_MEMBERS)} tars of {SHARD_MEMBERS}, a caption beside each'
        print(f'{count:>6} JPEGs 64x48 as {held}: {result["embedded"]} embedded of '
              f'{result["matched"]} matched in {result["seconds"]:.1f} s, '
              f'{result["images_per_second"]:.0f} images/s')
    for name, result in shard_requests().items():
      print(f'S3, one shard ({name}, {result["bytes"] / 1e6:.1f} MB): {result["members"]} images '
            f'read with requests {result["requests"]}')
    big = os.path.join(tmp, 'big.tar')
    write_big_tar(big, 1024, 1 << 20)
    result = _child('memory', big)
    print(f'streaming a {os.path.getsize(big) / 2**30:.2f} GiB tar ({result["members"]} members '
          f'of 1 MiB): {result["seconds"]:.1f} s, peak RSS {result["peak_rss_mib"]:.0f} MiB '
          f'(after imports {result["peak_rss_mib_before"]:.0f} MiB)')


if __name__ == '__main__':
  main()
