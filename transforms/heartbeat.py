"""Beside the matching: the job rewrites its run's claim every HEARTBEAT_SECONDS while it runs, so
that a later launch can tell a live run from a dead one by when the store last wrote the claim
(storage.run_dirs.Unfinished.alive), on any runner and with no launcher left waiting.

The first DoFn instance's `setup` in a worker process beats once, then starts one thread per
process and output that beats every HEARTBEAT_SECONDS; it stops when the run's summary exists (the
run finished), when the claim is gone (cleaned), or when the last DoFn instance of the process is
torn down.
"""

import json
import logging
import threading
from typing import Dict

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from run_format import CLAIM_FILE, HEARTBEAT_SECONDS, SUMMARY_FILE, utc_now

_LOG = logging.getLogger(__name__)


def beat(output: str) -> bool:
  """Rewrites the claim with `heartbeat_at` now; False (nothing written) once the run is over."""
  claim = FileSystems.join(output, CLAIM_FILE)
  if FileSystems.exists(FileSystems.join(output, SUMMARY_FILE)) or not FileSystems.exists(claim):
    return False
  with FileSystems.open(claim, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    body = json.loads(f.read())
  body['heartbeat_at'] = utc_now()
  with FileSystems.create(claim, mime_type='application/json',
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(json.dumps(body).encode())
  return True


class _Beating:
  """The process's heartbeat thread for one output, shared by its DoFn instances."""

  def __init__(self, output: str, interval: float):
    self.users = 0
    self._output = output
    self._interval = interval
    self._stopped = threading.Event()
    if self._beat():  # the first one now: the job has started
      threading.Thread(target=self._run, name='claim-heartbeat', daemon=True).start()

  def stop(self) -> None:
    self._stopped.set()

  def _beat(self) -> bool:
    try:
      return beat(self._output)
    except Exception as exc:  # pylint: disable=broad-except; the next beat may work
      _LOG.warning('heartbeat: could not rewrite %s/%s: %s', self._output, CLAIM_FILE, exc)
      return True

  def _run(self) -> None:
    while not self._stopped.wait(self._interval):
      if not self._beat():
        return


_BEATING: Dict[str, _Beating] = {}
_LOCK = threading.Lock()


class _Heartbeat(beam.DoFn):

  def __init__(self, output: str, interval: float):
    self._output = output
    self._interval = interval

  def setup(self):
    with _LOCK:
      beating = _BEATING.get(self._output)
      if beating is None:
        beating = _BEATING[self._output] = _Beating(self._output, self._interval)
      beating.users += 1

  def process(self, element):
    return ()

  def teardown(self):
    with _LOCK:
      beating = _BEATING.get(self._output)
      if beating is not None:
        beating.users -= 1
        if beating.users <= 0:
          beating.stop()
          del _BEATING[self._output]


class Heartbeat(beam.PTransform):
  """Any PCollection of the run (its elements are dropped) -> nothing; keeps the claim fresh."""

  def __init__(self, output: str, interval: float = HEARTBEAT_SECONDS):
    super().__init__()
    self._output = output
    self._interval = interval

  def expand(self, elements):
    return elements | 'Beat' >> beam.ParDo(_Heartbeat(self._output, self._interval))
