"""Drops log lines that read like problems on every healthy run (see docs/running.md, "Log messages")."""

import logging

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


def install() -> None:
  """Idempotent; per process (the launcher and each worker process)."""
  for name, text in HARMLESS.items():
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropHarmless) for f in logger.filters):
      logger.addFilter(_DropHarmless(text))
