"""The dead-letter record: every image that is not embedded ends here, with its reason."""

import json
from typing import NamedTuple, Optional

# The stages name themselves from here; the names are the run format's (run_format.STAGES).
from run_format import DECODE, INFERENCE, READ, STAGES  # pylint: disable=unused-import

FAILURES_TAG = 'failures'


class Failure(NamedTuple):
  uri: str
  stage: str  # one of STAGES
  error: str  # the exception's class name
  message: str
  # What the listing and the read knew, so that an incremental run can tell an unchanged file.
  size_bytes: Optional[int] = None
  last_modified: Optional[int] = None
  sha256: Optional[str] = None

  @classmethod
  def from_exception(cls, uri: str, stage: str, exc: BaseException, **known) -> 'Failure':
    return cls(uri, stage, type(exc).__name__, str(exc) or repr(exc), **known)

  def to_json(self) -> str:
    return json.dumps(self._asdict(), sort_keys=True)
