"""Per-process progress log: images embedded and the rate, every 30 s while the worker runs."""

import logging
import threading
import time

LOG_INTERVAL_SECONDS = 30.0


class ProgressReporter:
  """One per process, shared by the DoFn instances (threads) of that process.

  A timer thread logs even while no element arrives (a model still loading, a stalled read),
  which is exactly when an operator wants to know the worker is alive.
  """

  _instance = None
  _instance_lock = threading.Lock()

  def __init__(self, interval: float):
    self._interval = interval
    self._lock = threading.Lock()
    self._count = 0
    self._started = time.monotonic()
    self._thread = threading.Thread(target=self._run, name='embedding-progress', daemon=True)
    self._thread.start()

  @classmethod
  def for_process(cls, interval: float = LOG_INTERVAL_SECONDS) -> 'ProgressReporter':
    with cls._instance_lock:
      if cls._instance is None:
        cls._instance = cls(interval)
      return cls._instance

  def add(self, count: int = 1) -> None:
    with self._lock:
      self._count += count

  def line(self) -> str:
    with self._lock:
      count = self._count
    elapsed = time.monotonic() - self._started
    return f'embedded {count} images in {elapsed:.0f} s ({count / max(elapsed, 1e-9):.2f}/s)'

  def _run(self) -> None:
    while True:
      time.sleep(self._interval)
      logging.info('progress: %s', self.line())
