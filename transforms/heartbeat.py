"""From where the work is: the run's claim is rewritten every HEARTBEAT_SECONDS while anything
works on the run, so that a later launch can tell a live run from a dead one by when the store
last wrote the claim (storage.run_dirs.Unfinished), on any runner and with no launcher waiting.

A process beats for an output while something in it holds the run: a bundle of the stage beside
the matching or of the GPU step (`Heartbeat`), a shard of the run being written
(transforms/write.py), a batch of collection fragments being written, the launcher waiting for
its job (pipeline/launcher.py). So the beat goes on wherever the job still works: on Dataflow
with right fitting, the workers that matched can be gone hours before the GPU step and the
writes end. One thread per process and output beats when the run is first held, then every
HEARTBEAT_SECONDS while it is held (never more often, however many hold it or let go in
between); nothing is written once the run's summary exists or its claim is gone.
"""

import contextlib
import json
import logging
import threading
import time
from typing import Dict, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from run_format import CLAIM_FILE, HEARTBEAT_SECONDS, SUMMARY_FILE, utc_now

_LOG = logging.getLogger(__name__)


def update_claim(output: str, **fields) -> bool:
  """Rewrites the claim with `fields` added; False (nothing written) once the run is over."""
  claim = FileSystems.join(output, CLAIM_FILE)
  if FileSystems.exists(FileSystems.join(output, SUMMARY_FILE)) or not FileSystems.exists(claim):
    return False
  with FileSystems.open(claim, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    body = json.loads(f.read())
  body.update(fields)
  with FileSystems.create(claim, mime_type='application/json',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(json.dumps(body).encode())
  return True


def beat(output: str) -> bool:
  """Rewrites the claim with `heartbeat_at` now; False (nothing written) once the run is over."""
  return update_claim(output, heartbeat_at=utc_now())


class _Beating:
  """The process's beat for one output: a thread that runs while the output is held."""

  def __init__(self, output: str):
    self.holders = 0
    self._output = output
    self._last: Optional[float] = None  # time.monotonic() of the last beat
    self._thread: Optional[threading.Thread] = None

  def hold(self) -> None:
    """Under _LOCK."""
    self.holders += 1
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name='claim-heartbeat', daemon=True)
      self._thread.start()

  def _run(self) -> None:
    while True:
      with _LOCK:
        if not self.holders:
          self._thread = None
          return
        wait = 0.0 if self._last is None else self._last + HEARTBEAT_SECONDS - time.monotonic()
        if wait <= 0:
          self._last = time.monotonic()
      if wait > 0:
        time.sleep(wait)
      elif not self._beat():
        with _LOCK:
          self._thread = None
        return

  def _beat(self) -> bool:
    try:
      return beat(self._output)
    except Exception as exc:  # pylint: disable=broad-except; the next beat may work
      _LOG.warning('heartbeat: could not rewrite %s/%s: %s', self._output, CLAIM_FILE, exc)
      return True


_BEATING: Dict[str, _Beating] = {}
_LOCK = threading.Lock()


def hold(output: str) -> None:
  """This process works on the run at `output`: it beats until as many `release`s."""
  with _LOCK:
    if output not in _BEATING:
      _BEATING[output] = _Beating(output)
    _BEATING[output].hold()


def release(output: str) -> None:
  with _LOCK:
    _BEATING[output].holders -= 1


@contextlib.contextmanager
def beating(output: str):
  """Holds the run at `output` for the `with` block."""
  hold(output)
  try:
    yield
  finally:
    release(output)


class _Heartbeat(beam.DoFn):
  """Holds the run while a bundle of its fused stage is in progress."""

  def __init__(self, output: str):
    self._output = output
    self._holding = False

  def start_bundle(self):
    hold(self._output)
    self._holding = True

  def process(self, element):
    return ()

  def finish_bundle(self):
    self._let_go()

  def teardown(self):  # a bundle that failed: finish_bundle was not called
    self._let_go()

  def _let_go(self):
    if self._holding:
      self._holding = False
      release(self._output)


class Heartbeat(beam.PTransform):
  """Any PCollection of the run (its elements are dropped) -> nothing; keeps the claim fresh
  while the stage it is fused with works."""

  def __init__(self, output: str):
    super().__init__()
    self._output = output

  def expand(self, elements):
    return elements | 'Beat' >> beam.ParDo(_Heartbeat(self._output))
