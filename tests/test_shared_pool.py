"""Shared-memory batches: a bounded pool that lets idle segments go, and handles that are checked."""

import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from models.shared_batches import (MAX_SEGMENTS, MEMORY_FILE_NAME, BatchHandle,
                                   ForgedHandleError, SegmentPool, SharedBatchModel, embed_batch,
                                   process_pool, segment_bytes)
from tests.shared_callers import FingerprintModel, images, shared

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A process that holds one batch segment of this project, written as a caller writes it, and
# another descriptor (a plain file); it prints both and waits to be told to leave.
HOLDER = f'''
import os, sys, tempfile
from models.shared_batches import SegmentPool
pool = SegmentPool()
with pool.segment(4 * 2 * 8 * 8 * 3) as segment:
  plain = tempfile.TemporaryFile()
  print(segment.fd, segment.token, plain.fileno(), flush=True)
  sys.stdin.readline()
'''


def _memory_files() -> dict:
  """This process's batch segments, open or mapped, by inode: their sizes (a mapping holds a
  descriptor of its own, so descriptors are not counted)."""
  sizes = {}
  for fd in os.listdir('/proc/self/fd'):
    try:
      if MEMORY_FILE_NAME in os.readlink(f'/proc/self/fd/{fd}'):
        status = os.stat(f'/proc/self/fd/{fd}')
        sizes[status.st_ino] = status.st_size
    except OSError:  # closed meanwhile
      pass
  return sizes


def test_pool_stays_bounded_over_many_batches_of_growing_size():
  """Eight threads, 60 batches each of 1 to 60 images of 96x96: never more than MAX_SEGMENTS
  segments in the calling process, each at most the next power of two above the largest batch,
  and every feature right. Prints the figures it measured."""
  model = SharedBatchModel(FingerprintModel(), sweep_interval=0)
  pool = process_pool()
  largest = 60 * 96 * 96 * 3 * 4
  seen, errors, done = [], [], threading.Event()
  earlier = set(_memory_files())  # segments that earlier tests' pools in this process still hold

  def watch():
    while not done.is_set():
      seen.append((pool.segments(), len(set(_memory_files()) - earlier),
                   model.attached_segments()))
      time.sleep(0.002)

  def send(thread):
    for batch in range(60):
      batch_images = images(100 * thread + batch, 1 + (batch + thread) % 60, 96)
      features = embed_batch(model, batch_images)
      if not np.array_equal(features, FingerprintModel().embed(np.stack(batch_images))):
        errors.append((thread, batch))

  watcher = threading.Thread(target=watch)
  watcher.start()
  senders = [threading.Thread(target=send, args=(t,)) for t in range(8)]
  for sender in senders:
    sender.start()
  for sender in senders:
    sender.join()
  done.set()
  watcher.join()
  assert not errors
  assert max(s[0] for s in seen) == MAX_SEGMENTS  # reached, never passed
  # The model's side (this process too, here) maps at most the callers' live segments plus the
  # ones replaced since its last sweep (at every call here), and so keeps them alive.
  assert max(s[1] for s in seen) <= 2 * MAX_SEGMENTS
  assert max(s[2] for s in seen) <= 2 * MAX_SEGMENTS
  sizes = set(_memory_files().values())
  assert sizes and max(sizes) <= segment_bytes(largest)
  print(f'pool: {len(seen)} samples, at most {max(s[0] for s in seen)} segments held, '
        f'{max(s[1] for s in seen)} memory files alive, {max(s[2] for s in seen)} mapped by the '
        f'model; largest segment {max(sizes) >> 20} MiB for batches up to {largest >> 20} MiB')


def test_idle_segments_are_released():
  pool = SegmentPool(max_segments=2, idle_seconds=0.2)
  before = len(_memory_files())
  with pool.segment(1 << 20):
    with pool.segment(3 << 20):
      assert pool.segments() == 2 and len(_memory_files()) == before + 2
  assert pool.segments() == 2  # idle, kept for the next batch
  deadline = time.monotonic() + 10
  while pool.segments() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert pool.segments() == 0 and len(_memory_files()) == before


def test_a_caller_beyond_the_bound_waits_for_a_segment():
  pool = SegmentPool(max_segments=1, idle_seconds=60)
  order = []

  def second_caller():
    with pool.segment(1 << 20):
      order.append('second')

  with pool.segment(1 << 20):
    waiter = threading.Thread(target=second_caller)
    waiter.start()
    time.sleep(0.3)
    order.append('first released')
  waiter.join(timeout=10)
  assert order == ['first released', 'second'] and pool.segments() == 1


@pytest.fixture
def holder():
  process = subprocess.Popen([sys.executable, '-c', HOLDER], cwd=PROJECT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=PROJECT))
  segment_fd, token, plain_fd = process.stdout.readline().split()
  yield process.pid, int(segment_fd), token, int(plain_fd)
  process.communicate('leave\n', timeout=60)


def test_forged_handles_are_refused_before_mapping(holder):
  pid, segment_fd, token, plain_fd = holder
  model = SharedBatchModel(FingerprintModel(), sweep_interval=0)
  shape = (2, 8, 8, 3)
  with pytest.raises(ForgedHandleError, match='not a batch segment of this project'):
    model.embed_shared(BatchHandle(pid, plain_fd, token, shape))  # another kind of descriptor
  with pytest.raises(ForgedHandleError, match="does not carry the handle's token"):
    model.embed_shared(BatchHandle(pid, segment_fd, uuid.uuid4().hex, shape))
  with pytest.raises(ForgedHandleError, match='too small'):
    model.embed_shared(BatchHandle(pid, segment_fd, token, (4096, 331, 331, 3)))
  assert model.attached_segments() == 0  # nothing refused was mapped
  # The same segment with its own token is what a real caller sends: accepted.
  assert model.embed_shared(BatchHandle(pid, segment_fd, token, shape)).shape == (2, 4)


def test_a_forged_handle_is_refused_through_the_proxy_too(holder):
  pid, segment_fd, _, _ = holder
  proxy = shared(f'forged_{uuid.uuid4().hex}')
  with pytest.raises(ForgedHandleError):
    proxy.embed_shared(BatchHandle(pid, segment_fd, uuid.uuid4().hex, (1, 8, 8, 3)))
  assert embed_batch(proxy, images(1, 2, 8)).shape == (2, 4)  # the next real batch goes through
