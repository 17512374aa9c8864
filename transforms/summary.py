"""The job's last step: with --collection, the night's commit; then `run_summary.json`, counted
from the data, after every sink finalized.

Written by the pipeline itself, so a launch that returns at once (a Flex Template, a scheduler)
still commits and gets a summary, and counted from the PCollections rather than from metrics, so
the counts are exact under retries on every runner. Its presence marks a finished run; its
`outcome` says whether the run stayed within --max_failed_fraction (only such a night commits),
or that its commit was refused (`failed`: another night committed after this one read), for a
scheduler that never sees the launcher's exit code.
"""

import datetime
import logging
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from collection import ConcurrentNightError, NightChanges, commit_night, open_collection
from run_format import (FAILED, FINISHED, STAGES, SUMMARY_FILE, RunLaunch, RunSummary, outcome,
                        utc_now)
from transforms.incremental import NightState

EXAMPLE_FAILURES = 5


def _committed_already(state: NightState, run: str) -> Optional[int]:
  """The version this run committed, if a retry of this step finds its own commit there."""
  latest = open_collection(state.uri, options=state.storage_options)
  for version in range(latest.version, state.read_version, -1):
    record = latest.record(version)
    if record is not None and record.kind == 'night' and record.run == run:
      return version
  return None


def commit(state: NightState, run: str, fragments: Sequence[str],
           removed: Sequence[Tuple[int, int]]) -> Optional[int]:
  """The night's one commit: its new version, or None when it changes nothing."""
  if not fragments and not removed:
    return None
  done = _committed_already(state, run)
  if done is not None:
    return done
  return commit_night(state.uri, NightChanges(run, state.read_version, list(fragments),
                                              [tuple(pair) for pair in removed]),
                      options=state.storage_options)


class _WriteSummary(beam.DoFn):

  def __init__(self, output_dir: str, launch: RunLaunch, state: Optional[NightState]):
    self._output_dir = output_dir
    self._path = FileSystems.join(output_dir, SUMMARY_FILE)
    self._launch = launch
    self._state = state

  def process(self, _, matched, skipped, skipped_by_name, embedded, failed_by_stage, examples,
              files, fragments, removed):
    failed = dict.fromkeys(STAGES, 0)
    failed.update(dict(failed_by_stage))
    ended = outcome(matched, sum(failed.values()), self._launch.max_failed_fraction)
    version, message = None, None
    if self._state is not None and ended == FINISHED:
      try:
        version = commit(self._state, self._output_dir, fragments, removed)
      except ConcurrentNightError as exc:
        ended, message = FAILED, str(exc)
    finished_at = utc_now()
    started = datetime.datetime.fromisoformat(self._launch.started_at)
    wall_time = (datetime.datetime.fromisoformat(finished_at) - started).total_seconds()
    summary = RunSummary(
        **self._launch.to_dict(), outcome=ended,
        matched=matched, skipped=skipped, skipped_by_name=skipped_by_name, embedded=embedded,
        failed=sum(failed.values()), failed_by_stage=failed,
        example_failures=sorted(examples, key=lambda f: f['uri']),
        files=sorted(files), finished_at=finished_at, wall_time_seconds=wall_time,
        images_per_second=round(embedded / wall_time, 3) if wall_time > 0 else None,
        collection_version=version,
        collection_added=embedded if version is not None else 0,
        collection_removed=len(removed) if version is not None else 0,
        outcome_message=message)
    with FileSystems.create(self._path, mime_type='application/json') as f:
      f.write(summary.to_json().encode())
    if ended == FAILED:
      logging.error('run outcome failed: %s; see %s', message, self._path)
    elif ended != FINISHED:  # for a log-based alert where no one sees the exit code
      logging.error('run outcome %s: %d of %d matched images failed, more than '
                    '--max_failed_fraction %s%s; see %s', summary.outcome, summary.failed,
                    matched, self._launch.max_failed_fraction,
                    ': nothing committed to ' + self._state.uri if self._state else '',
                    self._path)
    yield self._path


class WriteRunSummary(beam.PTransform):
  """{'matched', 'skipped', 'skipped_by_name', 'embeddings', 'failures', 'files', 'fragments',
  'removed': PCollection} -> the summary's path, written once every file in 'files' exists (the
  sinks' outputs, known after finalizing), after the night's commit to `state`'s collection
  ('fragments': the new rows' fragments as JSON, 'removed': (fragment id, row id) pairs; None:
  no collection)."""

  def __init__(self, output_dir: str, launch: RunLaunch, state: Optional[NightState] = None):
    super().__init__()
    self._output_dir = output_dir
    self._launch = launch
    self._state = state

  def expand(self, parts):
    def count(name: str):
      counted = parts[name] | f'Count{name.title()}' >> beam.combiners.Count.Globally()
      return beam.pvalue.AsSingleton(counted)

    failures = parts['failures']
    by_stage = failures | 'Stage' >> beam.Map(lambda f: f.stage) | 'PerStage' >> (
        beam.combiners.Count.PerElement())
    examples = (failures
                | 'Examples' >> beam.combiners.Sample.FixedSizeGlobally(EXAMPLE_FAILURES)
                | 'AsDicts' >> beam.FlatMap(lambda sample: [f._asdict() for f in sample]))
    return (parts['matched'].pipeline
            | 'Once' >> beam.Create([None])
            | 'Write' >> beam.ParDo(
                _WriteSummary(self._output_dir, self._launch, self._state), count('matched'),
                count('skipped'), count('skipped_by_name'), count('embeddings'),
                beam.pvalue.AsList(by_stage), beam.pvalue.AsList(examples),
                beam.pvalue.AsList(parts['files']), beam.pvalue.AsList(parts['fragments']),
                beam.pvalue.AsList(parts['removed'])))
