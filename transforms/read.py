"""Stage 1: match the input patterns on any Beam FileSystem and read each image's bytes."""

import logging
from typing import List, NamedTuple, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.failures import FAILURES_TAG, READ, Failure

METRICS_NAMESPACE = 'read'
DEFAULT_MAX_FILE_BYTES = 256 << 20


class ImageFile(NamedTuple):
  uri: str
  data: bytes


class NoInputError(ValueError):
  """An input pattern matches no file: a typo should not become an empty, successful run."""


def check_patterns_match(patterns: Sequence[str]) -> None:
  """Fails before the pipeline starts when any pattern matches nothing; asks for one file only."""
  empty: List[str] = []
  for pattern in patterns:
    try:
      result = FileSystems.match([pattern], limits=[1])[0]
    except Exception as exc:  # a bad bucket, scheme or permission: say which pattern
      raise NoInputError(f'--input {pattern!r} cannot be listed: {exc}') from exc
    if not result.metadata_list:
      empty.append(pattern)
  if empty:
    raise NoInputError(
        'no file matches --input ' + ', '.join(repr(p) for p in empty) +
        '; check the path, and use a glob such as gs://bucket/images/*.jpg or '
        '"photos/**" (quoted, so that the shell does not expand it)')


class FileTooLargeError(ValueError):
  """Bigger than --max_file_bytes: not read, so one stray video cannot exhaust a worker."""


class _ReadFile(beam.DoFn):
  """Reads one matched file; a file that cannot be read becomes a dead-letter record."""

  def __init__(self, max_file_bytes: int):
    self._max_file_bytes = max_file_bytes
    self._matched = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'matched')
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'failed')

  def process(self, uri_and_size):
    uri, size = uri_and_size
    self._matched.inc()
    try:
      if size > self._max_file_bytes:
        raise FileTooLargeError(f'{size} bytes, over --max_file_bytes {self._max_file_bytes}')
      # UNCOMPRESSED: Beam would otherwise gunzip a file named *.gz behind our back.
      with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()
    except Exception as exc:  # any storage error is this image's failure, not the run's
      logging.warning('cannot read %s: %s', uri, exc)
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(uri, READ, exc))
      return
    yield ImageFile(uri, data)


class ReadImages(beam.PTransform):
  """Patterns -> ImageFile, plus Failure records under FAILURES_TAG.

  A file matched by several patterns is read once. The Distinct also breaks fusion, so that
  runners spread the reads over workers instead of reading on the one that listed them.
  """

  def __init__(self, patterns: Sequence[str], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    super().__init__()
    self._patterns = list(patterns)
    self._max_file_bytes = max_file_bytes

  def expand(self, pbegin):
    uris = (pbegin
            | 'Patterns' >> beam.Create(self._patterns)
            | 'Match' >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | 'SkipDirectories' >> beam.Filter(lambda metadata: not metadata.path.endswith('/'))
            | 'UriAndSize' >> beam.Map(lambda metadata: (metadata.path, metadata.size_in_bytes))
            | 'Distinct' >> beam.Distinct())
    return uris | 'Read' >> beam.ParDo(_ReadFile(self._max_file_bytes)).with_outputs(
        FAILURES_TAG, main='images')
