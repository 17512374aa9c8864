"""Batches handed to a model in another process through shared memory instead of a pickle.

With --large_model or --model_copies, Beam keeps the model in one process of the VM and hands the
others a proxy that pickles every argument through a socket: 20 MB for a batch of 16 images of
331x331x3 float32, 2.5-4 ms per image. Here the caller writes the batch into a memory file of its
own (Linux `memfd_create`) and only a `BatchHandle` (pid, descriptor, token, shape) crosses the
proxy; the model's process maps the same pages through /proc/PID/fd/FD and returns the features
(17 KB per image).

Bounded: a process holds at most `MAX_SEGMENTS` segments (callers beyond that wait for one), each
the next power of two above its batch, and closes a segment once it has been idle for
`IDLE_SECONDS`. A memory file has no name in /dev/shm: the kernel frees it once no process holds
it open or mapped, so nothing outlives its caller, even one that is killed: the model's process
notices at its next sweep that the caller's descriptor is gone and drops its mapping.

One batch at a time: `multiprocessing.managers` serves every connection (one per calling thread)
on a thread of its own, so the model's process runs each call under one lock: a GPU holding one
model never gets two batches at once (two would need twice the activation memory).

Fallback: where /proc/PID/fd/FD cannot be opened (a container runtime that forbids it, a caller
that is not dumpable), the model's process says so (`HandoffUnavailableError`) and the caller,
after one warning, sends its batches pickled through Beam's proxy instead: slower, never failing.

Checked: before mapping, the model's process checks that the handle names a memory file of this
project (the descriptor's link target) and that the segment starts with this project's mark and
the handle's token, which only the caller that wrote it knows; anything else is refused.
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
LINK_TARGET = f'/memfd:{MEMORY_FILE_NAME} (deleted)'  # what /proc/PID/fd/FD links to
MARK = b'pnasnet-embeddings batch\n'
TOKEN_BYTES = 16
HEADER_BYTES = 64  # mark and token, then the float32 images
MIN_SEGMENT_BYTES = 1 << 20
MAX_SEGMENTS = 2  # per calling process; the model's process runs the batches in turn anyway
IDLE_SECONDS = 30.0
WAIT_SECONDS = 600.0  # a caller waiting longer for a segment gives up (the bundle is retried)
SWEEP_INTERVAL_SECONDS = 1.0


class BatchHandle(NamedTuple):
  """What crosses the proxy instead of the pixels."""
  pid: int
  fd: int
  token: str  # hex; new for every segment, and written at its start
  shape: Tuple[int, ...]  # float32 images [batch, height, width, channels]


class ForgedHandleError(PermissionError):
  """A handle that does not name a batch segment its caller wrote for this project."""


class HandoffUnavailableError(RuntimeError):
  """The model's process cannot open the caller's memory file: send the pixels instead."""


class _Segment:
  """A memory file of the calling process, mapped for writing, marked with its token."""

  def __init__(self, capacity: int):
    self.fd = os.memfd_create(MEMORY_FILE_NAME, os.MFD_CLOEXEC)
    os.ftruncate(self.fd, capacity)  # pages are only allocated where written
    self.capacity = capacity
    self.token = uuid.uuid4().hex
    self.idle_since = time.monotonic()
    self._map = mmap.mmap(self.fd, capacity)
    self._map[:len(MARK) + TOKEN_BYTES] = MARK + bytes.fromhex(self.token)

  def array(self, shape: Tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(self._map, np.float32, count=math.prod(shape),
                         offset=HEADER_BYTES).reshape(shape)

  def close(self) -> None:
    self._map.close()
    os.close(self.fd)


def segment_bytes(nbytes: int) -> int:
  """The next power of two above the images and the header: a run of growing batches replaces
  its segment a few times at most."""
  return max(MIN_SEGMENT_BYTES, 1 << (nbytes + HEADER_BYTES - 1).bit_length())


class SegmentPool:
  """One process's segments: at most `max_segments`, reused, grown to the largest batch, closed
  after `idle_seconds` unused."""

  def __init__(self, max_segments: int = MAX_SEGMENTS, idle_seconds: float = IDLE_SECONDS):
    self._max_segments = max_segments
    self._idle_seconds = idle_seconds
    self._free: List[_Segment] = []
    self._in_use = 0
    self._changed = threading.Condition()
    self._reaper: Optional[threading.Timer] = None

  @contextlib.contextmanager
  def segment(self, nbytes: int) -> Iterator[_Segment]:
    segment = self._take(nbytes)
    try:
      yield segment
    finally:
      with self._changed:
        segment.idle_since = time.monotonic()
        self._free.append(segment)
        self._in_use -= 1
        self._changed.notify()
        self._arm_reaper()

  def segments(self) -> int:
    """Segments this process holds, in use or idle."""
    with self._changed:
      return self._in_use + len(self._free)

  def _take(self, nbytes: int) -> _Segment:
    deadline = time.monotonic() + WAIT_SECONDS
    with self._changed:
      while not self._free and self._in_use >= self._max_segments:
        if not self._changed.wait(timeout=deadline - time.monotonic()):
          raise TimeoutError(f'no shared batch segment free after {WAIT_SECONDS:.0f} s: the '
                             'model\'s process is not answering')
      fits = [s for s in self._free if s.capacity >= nbytes + HEADER_BYTES]
      segment = min(fits, key=lambda s: s.capacity) if fits else (
          self._free[0] if self._free else None)
      if segment is not None:
        self._free.remove(segment)
      self._in_use += 1
    if segment is not None and segment.capacity >= nbytes + HEADER_BYTES:
      return segment
    if segment is not None:  # too small: replaced, so the count stays bounded
      segment.close()
    try:
      return _Segment(segment_bytes(nbytes))
    except BaseException:
      with self._changed:
        self._in_use -= 1
        self._changed.notify()
      raise

  def _arm_reaper(self) -> None:
    """Called with the lock held: a timer closes what is idle long enough, then re-arms."""
    if self._reaper is None and self._free:
      self._reaper = threading.Timer(self._idle_seconds, self._close_idle)
      self._reaper.daemon = True
      self._reaper.start()

  def _close_idle(self) -> None:
    with self._changed:
      self._reaper = None
      cutoff = time.monotonic() - self._idle_seconds + 1e-3
      idle = [s for s in self._free if s.idle_since <= cutoff]
      for segment in idle:
        self._free.remove(segment)
        segment.close()
      self._arm_reaper()
    if idle:
      logging.info('closed %d idle shared batch segment(s)', len(idle))


_pool: Optional[SegmentPool] = None
_pool_pid: Optional[int] = None
_pool_lock = threading.Lock()


def process_pool() -> SegmentPool:
  """This process's pool; a forked child makes its own instead of writing into its parent's."""
  global _pool, _pool_pid
  with _pool_lock:
    if _pool_pid != os.getpid():
      _pool, _pool_pid = SegmentPool(), os.getpid()
    return _pool


_handoff_failed_pid: Optional[int] = None  # this process's batches go pickled (after a warning)


def embed_batch(model, images: Sequence[np.ndarray]) -> np.ndarray:
  """Features of `images` from a SharedBatchModel, or Beam's proxy of one in another process."""
  global _handoff_failed_pid
  if _handoff_failed_pid == os.getpid():
    return model.embed_pickled(np.stack(images))
  shape = (len(images),) + tuple(np.shape(images[0]))
  with process_pool().segment(math.prod(shape) * 4) as segment:
    np.stack(images, out=segment.array(shape))  # the copy np.stack makes in-process anyway
    try:
      return model.embed_shared(BatchHandle(os.getpid(), segment.fd, segment.token, shape))
    except HandoffUnavailableError as exc:
      with _pool_lock:
        first = _handoff_failed_pid != os.getpid()
        _handoff_failed_pid = os.getpid()
      if first:
        logging.warning('shared-memory batches unavailable (%s); this process sends its batches '
                        'to the shared model pickled instead (slower, same features)', exc)
  return model.embed_pickled(np.stack(images))


class _Attached(NamedTuple):
  """A caller's segment, mapped read-only in the model's process."""
  pid: int
  fd: int
  inode: int
  pages: mmap.mmap

  @classmethod
  def open(cls, handle: BatchHandle) -> '_Attached':
    """Checks what the handle names, then maps it (ForgedHandleError if it is not a segment of
    this project written by the handle's caller, with room for the handle's shape)."""
    path = f'/proc/{int(handle.pid)}/fd/{int(handle.fd)}'
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
      raise HandoffUnavailableError(f'the model\'s process cannot open {path}: {exc}') from None
    try:
      target = os.readlink(f'/proc/self/fd/{fd}')  # what was opened, not what is there now
      if target != LINK_TARGET:
        raise ForgedHandleError(f'pid {handle.pid} fd {handle.fd} is {target!r}, not a batch '
                                f'segment of this project ({LINK_TARGET!r})')
      header = os.pread(fd, len(MARK) + TOKEN_BYTES, 0)
      if header != MARK + bytes.fromhex(handle.token):
        raise ForgedHandleError(f'pid {handle.pid} fd {handle.fd}: the segment does not carry '
                                'the handle\'s token')
      status = os.fstat(fd)
      needed = HEADER_BYTES + 4 * math.prod(handle.shape)
      if status.st_size < needed:
        raise ForgedHandleError(f'pid {handle.pid} fd {handle.fd}: {status.st_size} bytes, '
                                f'too small for images of shape {tuple(handle.shape)}')
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
    with self._lock:  # held through the model call: one batch at a time on this model's GPU
      self._sweep_if_due()
      attached = self._attached.get(handle.token)
      if attached is None or attached.pid != handle.pid or attached.fd != handle.fd:
        attached = _Attached.open(handle)
        self._attached[handle.token] = attached
      images = np.frombuffer(attached.pages, np.float32, count=math.prod(handle.shape),
                             offset=HEADER_BYTES)
      return self._model.embed(images.reshape(handle.shape))

  def embed_pickled(self, images: np.ndarray) -> np.ndarray:
    """The fallback: pixels pickled through the proxy, still one batch at a time."""
    with self._lock:
      return self._model.embed(images)

  def attached_segments(self) -> int:
    """Caller segments this process maps now (for the tests and the GPU self-check)."""
    with self._lock:
      return len(self._attached)

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
