"""Callers of a shared model, run in processes of their own by tests/test_shared_batches.py.

No TensorFlow here: the processes start in a moment.
"""

import os
import threading
import time

import numpy as np
from apache_beam.utils.multi_process_shared import MultiProcessShared

from models.shared_batches import MEMORY_FILE_NAME, SharedBatchModel, embed_batch


class FingerprintModel:
  """Features that tell every image apart (first and last pixel, mean, sum), after a pause that
  keeps several calls in flight at once."""

  def embed(self, images: np.ndarray) -> np.ndarray:
    time.sleep(0.01)
    flat = images.reshape(len(images), -1).astype(np.float64)
    return np.stack([flat[:, 0], flat[:, -1], flat.mean(1), flat.sum(1)], axis=1)


def fingerprint_server():
  return SharedBatchModel(FingerprintModel(), sweep_interval=0)  # sweeps at every call


def shared(tag, constructor=fingerprint_server, spawn_process=False):
  return MultiProcessShared(constructor, tag=tag, always_proxy=True,
                            spawn_process=spawn_process).acquire()


def images(seed: int, count: int, size: int = 331) -> list:
  rng = np.random.default_rng(seed)
  return [rng.random((size, size, 3), dtype=np.float32) for _ in range(count)]


def shm_files() -> set:
  """/dev/shm besides multiprocessing's semaphores (test queues and Beam's runner make some) and
  PostgreSQL's segments (the export tests' server, in the other test process, makes and drops
  them): what a shared-memory batch would leave behind if it had a name."""
  return {name for name in os.listdir('/dev/shm')
          if not name.startswith(('sem.mp-', 'PostgreSQL.'))}


def segment_inodes(pid='self') -> set:
  """Inodes of the batch segments a process maps, as its /proc maps lists them."""
  with open(f'/proc/{pid}/maps') as maps:
    return {int(line.split()[4]) for line in maps if MEMORY_FILE_NAME in line}


def call_from_threads(tag, caller, threads, batches, errors):
  """One process, several threads, each sending ragged batches of its own images."""
  model = shared(tag)

  def send(thread):
    for batch in range(batches):
      batch_images = images(1000 * caller + 100 * thread + batch, 1 + (thread + batch) % 5)
      features = embed_batch(model, batch_images)
      if not np.array_equal(features, FingerprintModel().embed(np.stack(batch_images))):
        errors.put(f'caller {caller} thread {thread} batch {batch}: wrong features')

  workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()


def grow_then_wait(tag, reports, leave):
  """A batch of one, then a batch that outgrows its segment; reports the segments it holds after
  each, then waits until told to leave (or is killed)."""
  model = shared(tag)
  for count in (1, 8):
    embed_batch(model, images(count, count))
    reports.put(segment_inodes())
  leave.wait(600)


class OverlapCountingModel(FingerprintModel):
  """Counts the calls in flight at once (the most seen) and all calls."""

  def __init__(self):
    self._lock = threading.Lock()
    self._inside = 0
    self.most_at_once = 0
    self.calls = 0

  def embed(self, images: np.ndarray) -> np.ndarray:
    with self._lock:
      self._inside += 1
      self.calls += 1
      self.most_at_once = max(self.most_at_once, self._inside)
    try:
      return super().embed(images)
    finally:
      with self._lock:
        self._inside -= 1


counting_models = []  # the models this process serves, for the test to read


def counting_server():
  model = OverlapCountingModel()
  counting_models.append(model)
  return SharedBatchModel(model, sweep_interval=0)


def call_undumpable(tag, reports):
  """A caller whose descriptors no other process of its user may open (not dumpable): sends
  three batches and reports whether their features were right and what it warned."""
  import ctypes
  import logging
  ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
  warnings = []

  class Keep(logging.Handler):

    def emit(self, record):
      warnings.append(record.getMessage())

  logging.getLogger().addHandler(Keep(logging.WARNING))
  model = shared(tag)
  right = []
  for seed, count in enumerate((2, 3, 1)):
    batch = images(seed, count, 32)
    right.append(np.array_equal(embed_batch(model, batch),
                                FingerprintModel().embed(np.stack(batch))))
  reports.put((right, warnings, model.attached_segments()))
