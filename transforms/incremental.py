"""Between matching and reading: skip the files that earlier finished runs already handled.

An anti-join on URI (CoGroupByKey) of this run's listing with earlier runs' indexes, so it scales
with the runner; nothing about the files is held by the launcher.
"""

import datetime
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io.parquetio import ReadAllFromParquet

from run_format import DECODE, EMBEDDED, INCREMENTAL_COLUMNS
from transforms.provenance import Provenance

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class Done(NamedTuple):
  """A file version an earlier run finished with: embedded it, or found it undecodable."""
  size_bytes: Optional[int]
  last_modified: Optional[int]
  model: str
  recipe: str


def _microseconds(value) -> Optional[int]:
  if value is None:
    return None
  if value.tzinfo is None:
    value = value.replace(tzinfo=datetime.timezone.utc)
  return (value - _EPOCH) // datetime.timedelta(microseconds=1)


class _KeepDone(beam.DoFn):

  def __init__(self, retry_failed: bool):
    self._outcomes = {EMBEDDED} if retry_failed else {EMBEDDED, DECODE}

  def process(self, row: dict):
    if row['outcome'] in self._outcomes:
      yield row['uri'], Done(row['size_bytes'], _microseconds(row['last_modified']),
                             row['model'], row['recipe'])


class _NewOrChanged(beam.DoFn):
  """Read and inference failures are always retried: they say nothing about the file."""

  def __init__(self, provenance: Provenance):
    self._provenance = provenance
    self._skipped = beam.metrics.Metrics.counter('incremental', 'skipped')

  def process(self, joined):
    _, grouped = joined
    done = set(grouped['done'])
    for ref in grouped['current']:
      version = Done(ref.size_bytes, ref.last_modified, self._provenance.model,
                     self._provenance.recipe)
      if ref.size_bytes is not None and version in done:
        self._skipped.inc()
        yield beam.pvalue.TaggedOutput('skipped', ref)
      else:
        yield ref


class SkipUnchanged(beam.PTransform):
  """FileRef -> FileRef to embed (main) and FileRef skipped (tag 'skipped').

  A file is skipped when an earlier run embedded (or could not decode, unless `retry_failed`)
  the same URI with the same size, modification time, model id and recipe.
  """

  def __init__(self, index_patterns: Sequence[str], provenance: Provenance,
               retry_failed: bool = False):
    super().__init__()
    self._index_patterns = list(index_patterns)
    self._provenance = provenance
    self._retry_failed = retry_failed

  def expand(self, refs):
    done = (refs.pipeline
            | 'Indexes' >> beam.Create(self._index_patterns)
            | 'ReadIndexes' >> ReadAllFromParquet(columns=INCREMENTAL_COLUMNS)
            | 'KeepDone' >> beam.ParDo(_KeepDone(self._retry_failed)))
    current = refs | 'KeyByUri' >> beam.Map(lambda ref: (ref.uri, ref))
    return ({'current': current, 'done': done}
            | 'JoinOnUri' >> beam.CoGroupByKey()
            | 'NewOrChanged' >> beam.ParDo(_NewOrChanged(self._provenance)).with_outputs(
                'skipped', main='new'))
