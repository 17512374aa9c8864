"""Drops log lines that read like problems on every healthy run (see docs/running.md, "Log
messages"), and Pillow's decompression-bomb warning, which our decoding turns into a failure."""

import logging
import warnings

HARMLESS = {
    # Beam 2.77's RunInference imports torch to measure memory; without torch it says this on
    # every batch, though nothing is wrong.
    '': 'Resource module is not available for current platform',
    # Our sinks skip empty shards on purpose (S3 refuses empty multipart uploads).
    'apache_beam.io.filebasedsink': 'No shards found to finalize',
}


class _DropHarmless(logging.Filter):

  def __init__(self, text: str):
    super().__init__()
    self._text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self._text not in record.getMessage()


def ignore_pillow_bomb_warnings() -> None:
  """Pillow warns on images over its global pixel limit (below twice it, where it raises). Our
  decoding enforces its own limit on every image and fails with its own reason (a `decode`
  failure, or a refused query), so the warning would only repeat that, raw, in the log.

  Process-wide, as Python's warning filters are; cheap enough to call before every decode, so a
  filter list reset since (warnings.catch_warnings, pytest) gets it back."""
  from PIL import Image
  if not any(action == 'ignore' and category is Image.DecompressionBombWarning and not message
             for action, message, category, *_ in warnings.filters):
    warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)


def install() -> None:
  """Idempotent; per process (the launcher and each worker process)."""
  for name, text in HARMLESS.items():
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropHarmless) for f in logger.filters):
      logger.addFilter(_DropHarmless(text))
