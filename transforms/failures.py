"""The dead-letter record: every image that is not embedded ends here, with its reason."""

import json
from typing import NamedTuple

FAILURES_TAG = 'failures'

READ = 'read'
DECODE = 'decode'
INFERENCE = 'inference'


class Failure(NamedTuple):
  uri: str
  stage: str  # one of READ, DECODE, INFERENCE
  error: str  # the exception's class name
  message: str

  @classmethod
  def from_exception(cls, uri: str, stage: str, exc: BaseException) -> 'Failure':
    return cls(uri, stage, type(exc).__name__, str(exc) or repr(exc))

  def to_json(self) -> str:
    return json.dumps(self._asdict(), sort_keys=True)
