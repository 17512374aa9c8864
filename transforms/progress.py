"""Progress a person can read: images done of the run's total, the rate and the time left, logged
every 30 s by each process that embeds, with a text bar when stderr is a terminal.

The total (the files this run reads and embeds) is known once matching has ended: the GPU step
gets it as a side input, and StartProgress hands it to the process's reporter before the process
reads any of them. An image is done when it reaches its outcome: embed.py's _ToEmbedding adds
each embedded one, CountFailed each failed one (read, decode or inference). When one process does
all of a run's work (the local runner in one process) its line is the run's: done/total and the
time left; elsewhere (Dataflow, several local processes) each process says its own share.
"""

import logging
import sys
import threading
import time
from typing import Optional

import apache_beam as beam

LOG_INTERVAL_SECONDS = 30.0
BAR_WIDTH = 20


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


def _rate(per_second: float) -> str:
  return f'{per_second:.2f}/s' if per_second < 10 else f'{per_second:,.0f}/s'


def progress_line(done: int, total: Optional[int], elapsed: float, whole_run: bool,
                  bar_width: int = 0) -> str:
  """What a progress log line says after `elapsed` seconds: `total` None (not known yet) gives
  the count alone; `whole_run` says the count is the run's, so the time left can be told;
  `bar_width` > 0 draws a bar of that many characters in front (for a terminal)."""
  rate = done / max(elapsed, 1e-9)
  if total is None:
    return f'embedded {done:,} images in {_duration(elapsed)} ({_rate(rate)})'
  # A bundle that a runner retries counts again: a log line's count, not the summary's.
  percent = min(100, 100 * done // max(total, 1))
  if not whole_run:
    return (f'this worker process: {done:,} images in {_duration(elapsed)} ({_rate(rate)}), '
            f'{percent}% of the run\'s {total:,}')
  if done >= total:
    left = 'none left'
  else:
    left = f'about {_duration((total - done) / rate)} left' if done else 'time left not known yet'
  filled = bar_width * percent // 100
  bar = f'[{"#" * filled}{"." * (bar_width - filled)}] ' if bar_width else ''
  return (f'{bar}{done:,}/{total:,} images ({percent}%) in {_duration(elapsed)}, {_rate(rate)}, '
          f'{left}')


class ProgressReporter:
  """One per process, shared by the DoFn instances (threads) of that process.

  A timer thread logs even while no element arrives (a model still loading, a stalled read),
  which is exactly when an operator wants to know the worker is alive; it stops once a whole
  run's images are all done. A process that runs several pipelines (tests, a notebook) counts
  each run from its start.
  """

  _instance = None
  _instance_lock = threading.Lock()

  def __init__(self, interval: float):
    self._interval = interval
    self._lock = threading.Lock()
    self._count = 0
    self._started = time.monotonic()
    self._run: Optional[str] = None
    self._total: Optional[int] = None
    self._whole_run = False
    self._thread = threading.Thread(target=self._log_every_interval, name='embedding-progress',
                                    daemon=True)
    self._thread.start()

  @classmethod
  def for_process(cls, interval: float = LOG_INTERVAL_SECONDS) -> 'ProgressReporter':
    with cls._instance_lock:
      if cls._instance is None:
        cls._instance = cls(interval)
      return cls._instance

  def begin(self, run: str, total: int, whole_run: bool) -> None:
    """The run's total; called before this process reads any image of `run`, so that a new run
    starts counting from zero."""
    with self._lock:
      if run != self._run:
        self._run, self._total, self._whole_run = run, total, whole_run
        self._count, self._started = 0, time.monotonic()

  def add(self, count: int = 1) -> None:
    with self._lock:
      self._count += count

  def line(self, bar_width: int = 0) -> str:
    with self._lock:
      count, total, whole_run = self._count, self._total, self._whole_run
      elapsed = time.monotonic() - self._started
    return progress_line(count, total, elapsed, whole_run, bar_width)

  def _all_done(self) -> bool:
    with self._lock:
      return self._whole_run and self._count >= self._total

  def _log_every_interval(self) -> None:
    while True:
      time.sleep(self._interval)
      if not self._all_done():
        logging.info('progress: %s', self.line(BAR_WIDTH if sys.stderr.isatty() else 0))


class StartProgress(beam.DoFn):
  """FileRef -> the same FileRef, once the process's reporter knows the run's total (a side
  input). `run`: the run's output; `whole_run`: this process does all of the run's work."""

  def __init__(self, run: str, whole_run: bool):
    self._run = run
    self._whole_run = whole_run

  def setup(self):
    self._reporter = ProgressReporter.for_process()

  def process(self, ref, total: int):
    self._reporter.begin(self._run, total, self._whole_run)
    yield ref


class CountFailed(beam.DoFn):
  """A Failure -> nothing: counts it as done (the embedded ones are counted where they are
  made)."""

  def setup(self):
    self._reporter = ProgressReporter.for_process()

  def process(self, failure):
    self._reporter.add()
    return ()
