"""The dead-letter record: every image that is not embedded ends here, with its reason."""

import json
from typing import NamedTuple, Optional

# The stages name themselves from here; the names are the run format's (run_format.STAGES).
from run_format import DECODE, INFERENCE, READ, STAGES  # pylint: disable=unused-import

FAILURES_TAG = 'failures'


def _message(exc: BaseException, uri: str) -> str:
  """Beam's GcsIO raises NotFound('Object %s not found', path), which keeps the '%s' and drops
  the path (and its FileSystems wrap it in a BeamIOError keyed by path): name the object the
  failure is about instead."""
  details = getattr(exc, 'exception_details', None)
  if isinstance(details, dict) and len(details) == 1:
    exc = next(iter(details.values()))
  text = str(exc) or repr(exc)
  template = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ''
  return text.replace('%s', uri) if '%s' in template and uri not in text else text


class Failure(NamedTuple):
  uri: str
  stage: str  # one of STAGES
  error: str  # the exception's class name
  message: str
  # What the listing and the read knew, so that an incremental run can tell an unchanged file.
  size_bytes: Optional[int] = None
  last_modified: Optional[int] = None
  sha256: Optional[str] = None
  content_id: Optional[str] = None  # GCS crc32c, S3 ETag: see transforms/listing.py

  @classmethod
  def from_exception(cls, uri: str, stage: str, exc: BaseException, **known) -> 'Failure':
    return cls(uri, stage, type(exc).__name__, _message(exc, uri), **known)

  def to_json(self) -> str:
    return json.dumps(self._asdict(), sort_keys=True)
