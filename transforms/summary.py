"""The job's last step: `run_summary.json`, counted from the data, after every sink finalized.

Written by the pipeline itself, so a launch that returns at once (a Flex Template, a scheduler)
still gets one, and counted from the PCollections rather than from metrics, so the counts are exact
under retries on every runner. Its presence marks a finished run; its `outcome` says whether the
run stayed within --max_failed_fraction, for a scheduler that never sees the launcher's exit code.
"""

import datetime
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from run_format import FINISHED, STAGES, SUMMARY_FILE, RunLaunch, RunSummary, outcome, utc_now

EXAMPLE_FAILURES = 5


class _WriteSummary(beam.DoFn):

  def __init__(self, output_dir: str, launch: RunLaunch):
    self._path = FileSystems.join(output_dir, SUMMARY_FILE)
    self._launch = launch

  def process(self, _, matched, skipped, skipped_by_name, embedded, failed_by_stage, examples,
              files):
    failed = dict.fromkeys(STAGES, 0)
    failed.update(dict(failed_by_stage))
    finished_at = utc_now()
    started = datetime.datetime.fromisoformat(self._launch.started_at)
    wall_time = (datetime.datetime.fromisoformat(finished_at) - started).total_seconds()
    summary = RunSummary(
        **self._launch.to_dict(),
        outcome=outcome(matched, sum(failed.values()), self._launch.max_failed_fraction),
        matched=matched, skipped=skipped, skipped_by_name=skipped_by_name, embedded=embedded,
        failed=sum(failed.values()), failed_by_stage=failed,
        example_failures=sorted(examples, key=lambda f: f['uri']),
        files=sorted(files), finished_at=finished_at, wall_time_seconds=wall_time,
        images_per_second=round(embedded / wall_time, 3) if wall_time > 0 else None)
    with FileSystems.create(self._path, mime_type='application/json') as f:
      f.write(summary.to_json().encode())
    if summary.outcome != FINISHED:  # for a log-based alert where no one sees the exit code
      logging.error('run outcome %s: %d of %d matched images failed, more than '
                    '--max_failed_fraction %s; see %s', summary.outcome, summary.failed,
                    matched, self._launch.max_failed_fraction, self._path)
    yield self._path


class WriteRunSummary(beam.PTransform):
  """{'matched', 'skipped', 'skipped_by_name', 'embeddings', 'failures', 'files': PCollection}
  -> the summary's path, written once every file in 'files' exists (the sinks' outputs, known
  after finalizing)."""

  def __init__(self, output_dir: str, launch: RunLaunch):
    super().__init__()
    self._output_dir = output_dir
    self._launch = launch

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
                _WriteSummary(self._output_dir, self._launch), count('matched'),
                count('skipped'), count('skipped_by_name'), count('embeddings'),
                beam.pvalue.AsList(by_stage), beam.pvalue.AsList(examples),
                beam.pvalue.AsList(parts['files'])))
