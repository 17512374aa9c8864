"""Batches handed to a model in another process through shared memory instead of a pickle.

With --large_model or --model_copies, Beam keeps the model in one process of the VM and hands the
others a proxy that pickles every argument through a socket: 20 MB for a batch of 16 images of
331x331x3 float32, 2.5-4 ms per image. Here the caller writes the batch into a memory file of its
own (Linux `memfd_create`) and only a `BatchHandle` (pid, descriptor, token, shape) crosses the
proxy; the model's process maps the same pages through /proc/PID/fd/FD and returns the features
(17 KB per image).

A memory file has no name in /dev/shm: the kernel frees it once no process holds it open or
mapped. So nothing outlives its caller, even one that is killed: the model's process notices at
its next sweep that the caller's descriptor is gone and drops its mapping.
"""

import contextlib
import logging
import math
import mmap
import os
import threading
import time
import uuid
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

MEMORY_FILE_NAME = 'pnasnet-embeddings-batch'  # how /proc/PID/maps lists the segments
MIN_SEGMENT_BYTES = 1 << 20
SWEEP_INTERVAL_SECONDS = 1.0


class BatchHandle(NamedTuple):
  """What crosses the proxy instead of the pixels."""
  pid: int
  fd: int
  token: str  # new for every segment: a mapping cached for an older one is never reused
  shape: Tuple[int, ...]  # float32 images [batch, height, width, channels]


class _Segment:
  """A memory file of the calling process, mapped for writing."""

  def __init__(self, capacity: int):
    self.fd = os.memfd_create(MEMORY_FILE_NAME, os.MFD_CLOEXEC)
    os.ftruncate(self.fd, capacity)  # pages are only allocated where written
    self.capacity = capacity
    self.token = uuid.uuid4().hex
    self._map = mmap.mmap(self.fd, capacity)

  def array(self, shape: Tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(self._map, np.float32, count=math.prod(shape)).reshape(shape)

  def close(self) -> None:
    self._map.close()
    os.close(self.fd)


def _segment_bytes(nbytes: int) -> int:
  """The next power of two: a run of growing batches replaces its segment a few times at most."""
  return max(MIN_SEGMENT_BYTES, 1 << (nbytes - 1).bit_length())


class _SegmentPool:
  """One process's segments: one per concurrent call, reused, grown to the largest batch."""

  def __init__(self):
    self._free: List[_Segment] = []
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def segment(self, nbytes: int) -> Iterator[_Segment]:
    with self._lock:
      segment = self._free.pop() if self._free else None
    if segment is None or segment.capacity < nbytes:
      if segment is not None:
        segment.close()
      segment = _Segment(_segment_bytes(nbytes))
    try:
      yield segment
    finally:
      with self._lock:
        self._free.append(segment)


_pool: Optional[_SegmentPool] = None
_pool_pid: Optional[int] = None
_pool_lock = threading.Lock()


def _process_pool() -> _SegmentPool:
  """This process's pool; a forked child makes its own instead of writing into its parent's."""
  global _pool, _pool_pid
  with _pool_lock:
    if _pool_pid != os.getpid():
      _pool, _pool_pid = _SegmentPool(), os.getpid()
    return _pool


def embed_batch(model, images: Sequence[np.ndarray]) -> np.ndarray:
  """Features of `images` from a SharedBatchModel, or Beam's proxy of one in another process."""
  shape = (len(images),) + tuple(np.shape(images[0]))
  with _process_pool().segment(math.prod(shape) * 4) as segment:
    np.stack(images, out=segment.array(shape))  # the copy np.stack makes in-process anyway
    return model.embed_shared(BatchHandle(os.getpid(), segment.fd, segment.token, shape))


class _Attached(NamedTuple):
  """A caller's segment, mapped read-only in the model's process."""
  pid: int
  fd: int
  inode: int
  pages: mmap.mmap

  @classmethod
  def open(cls, handle: BatchHandle) -> '_Attached':
    fd = os.open(f'/proc/{handle.pid}/fd/{handle.fd}', os.O_RDONLY)
    try:
      status = os.fstat(fd)
      return cls(handle.pid, handle.fd, status.st_ino,
                 mmap.mmap(fd, status.st_size, prot=mmap.PROT_READ))
    finally:
      os.close(fd)  # the mapping keeps the pages

  def caller_holds_it(self) -> bool:
    try:
      return os.stat(f'/proc/{self.pid}/fd/{self.fd}').st_ino == self.inode
    except OSError:  # the caller exited (or was killed), or closed the descriptor
      return False


class SharedBatchModel:
  """The model's side: embeds batches its callers left in their memory files.

  Public methods only: Beam's proxy forwards nothing else.
  """

  def __init__(self, model, sweep_interval: float = SWEEP_INTERVAL_SECONDS):
    self._model = model  # anything with embed(float32 images) -> features
    self._sweep_interval = sweep_interval
    self._attached: Dict[str, _Attached] = {}
    self._lock = threading.Lock()
    self._last_sweep = time.monotonic()

  def embed_shared(self, handle: BatchHandle) -> np.ndarray:
    with self._lock:
      self._sweep_if_due()
      attached = self._attached.get(handle.token)
      if attached is None:
        attached = self._attached[handle.token] = _Attached.open(handle)
    images = np.frombuffer(attached.pages, np.float32, count=math.prod(handle.shape))
    return self._model.embed(images.reshape(handle.shape))

  def _sweep_if_due(self) -> None:
    """Unmaps the segments whose callers closed them or are gone (a call in flight on one keeps
    its pages until it returns: dropping the mapping object only frees them with the last view)."""
    now = time.monotonic()
    if now - self._last_sweep < self._sweep_interval:
      return
    self._last_sweep = now
    gone = [token for token, attached in self._attached.items()
            if not attached.caller_holds_it()]
    for token in gone:
      del self._attached[token]
    if gone:
      logging.info('released %d shared batch segment(s) of callers that closed them or exited',
                   len(gone))
