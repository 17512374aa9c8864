"""Consolidates many runs into one: every URI's vector by the load rule, after which every older
run may be deleted (a bucket lifecycle rule on the nightly prefix, docs/using-embeddings.md).

    python -m embeddings.compact --runs "gs://bucket/embeddings/*" \
        --output gs://bucket/embeddings/compact-2026-12-02 [--model MODEL_ID] [--num_shards N] \
        [Beam flags: --runner DataflowRunner --project ... --temp_location ...]

The consolidated run is a finished run like a night's: Parquet shards of the vectors `load`
returns, an index (each URI embedded, or decode for a file done as undecodable) and a summary
whose inputs are all the runs' and whose `incremental_runs` are the runs consolidated, so `load`
over it alone returns the same vectors and the next night with `--incremental_from` over the
prefix reads its index alone and skips everything it holds. Exit 0 done, 2 refused before any
work (no runs, an output that holds a run, a run still going among --runs), 1 the job failed.
"""

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import storage
from embeddings.runs import parse_job_command
from storage.run_dirs import RUN_ERRORS, Run, scan_runs, select_model, warn_of_failed
from run_format import (CLAIM_STALE_SECONDS, DECODE, EMBEDDED, FINISHED, INDEX_GLOB, STAGES,
                        SUMMARY_FILE, RunSummary, utc_now)

_LOG = logging.getLogger(__name__)


class CompactError(ValueError):
  """Refused before any work."""


def consolidated_inputs(runs: Sequence[Run]) -> Dict[str, List[str]]:
  """Inputs that cover every run's (collection.Inputs.covers_all): the union of their patterns
  and manifests, the excludes they all share."""
  excludes = set.intersection(*(set(run.summary.exclude) for run in runs))
  return {'input': sorted({p for run in runs for p in run.summary.input}),
          'input_manifest': sorted({m for run in runs for m in run.summary.input_manifest}),
          'exclude': sorted(excludes)}


def default_shards(runs: Sequence[Run], shard_rows: int) -> int:
  """From the newest run's index rows (its footers): about one collection on a schedule."""
  import pyarrow.parquet as pq
  rows = 0
  for info in storage.match(runs[0].index_glob):
    with storage.open_file(info.path) as f:
      rows += pq.ParquetFile(f).metadata.num_rows
  return max(1, math.ceil(rows / shard_rows))


def _counts(output: str) -> Dict[str, int]:
  import pyarrow.parquet as pq
  counts = {EMBEDDED: 0, DECODE: 0}
  for info in storage.match(storage.join(output, INDEX_GLOB)):
    with storage.open_file(info.path) as f:
      for outcome in pq.read_table(f, columns=['outcome']).column('outcome').to_pylist():
        counts[outcome] += 1
  return counts


def summary_of(runs: Sequence[Run], output: str, patterns: Sequence[str], runner: str,
               started_at: str, started: float, files: List[str]) -> RunSummary:
  newest = runs[0].summary
  counts = _counts(output)
  return dataclasses.replace(
      newest, **consolidated_inputs(runs), incremental_from=list(patterns),
      incremental_runs=[run.path for run in runs], index_carries_forward=True, source_runs=[],
      output=output, output_format='parquet', max_failed_fraction=1.0, runner=runner,
      started_at=started_at, outcome=FINISHED, matched=counts[EMBEDDED] + counts[DECODE],
      skipped=0, embedded=counts[EMBEDDED], failed=counts[DECODE],
      failed_by_stage=dict(dict.fromkeys(STAGES, 0), **{DECODE: counts[DECODE]}),
      example_failures=[], files=sorted(files), finished_at=utc_now(),
      wall_time_seconds=round(time.monotonic() - started, 3), images_per_second=None)


def _check_runs(patterns: Sequence[str], model: Optional[str], output: str,
                allow_concurrent: bool) -> List[Run]:
  scan = scan_runs(list(patterns))
  warn_of_failed(scan.failed)
  live = [u for u in scan.unfinished if u.alive() and u.path != output]
  if live and not allow_concurrent:
    raise CompactError(
        f'{", ".join(u.describe() for u in live)}: a run still going; compacting now would '
        'leave out what it embeds, and deleting older runs after it could lose vectors. Wait '
        f'for it, or add --allow_concurrent (a claim not rewritten for '
        f'{CLAIM_STALE_SECONDS // 60} min counts as dead)')
  runs = [run for run in scan.finished if run.path != output]
  if not runs:
    raise CompactError(f'no finished run in {" ".join(patterns)}')
  return select_model(runs, model)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(
      prog='python -m embeddings.compact', description=__doc__.split('\n\n')[0],
      epilog='Other --flags go to Beam (--runner, --project, --temp_location, ...), whose '
      'FileSystems read and write gs:// and s3:// runs.')
  parser.add_argument('--runs', nargs='+', required=True,
                      help='run directories or globs of them (local, gs://, s3://)')
  parser.add_argument('--output', required=True,
                      help='the consolidated run directory to create, e.g. beside the nights')
  parser.add_argument('--model', help='the model id to keep when the runs hold several')
  parser.add_argument('--num_shards', type=int, default=0,
                      help='output shards (default: one per 100,000 rows of the newest index)')
  parser.add_argument('--allow_concurrent', action='store_true',
                      help='compact even while a run among --runs is still going')
  args, beam_flags = parse_job_command(parser, argv)
  output = args.output.rstrip('/')
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipeline.output_dir import OutputExistsError, OutputNotWritableError, claim_output
  from pipeline.runners import default_runner, runner_name
  options = PipelineOptions(list(beam_flags))
  started_at, started = utc_now(), time.monotonic()
  try:
    runs = _check_runs(args.runs, args.model, output, args.allow_concurrent)
    from jobs.compact import SHARD_ROWS
    shards = args.num_shards or default_shards(runs, SHARD_ROWS)
    dtype = runs[0].summary.embedding_dtype
    claim_output(output, {'compact': [run.path for run in runs], 'started_at': started_at,
                          'runner': runner_name(options)},
                 options)
  except RUN_ERRORS + (CompactError, OutputExistsError, OutputNotWritableError) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  import apache_beam as beam
  from jobs.collection_sources import warn_of_gaps
  from jobs.compact import build_compaction
  from transforms.heartbeat import keep_alive
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  build_compaction(pipeline, runs, output, shards, dtype)
  beating = keep_alive(output)  # a night launched meanwhile sees this run alive, and waits
  try:
    result = pipeline.run()
    state = result.wait_until_finish()
  finally:
    beating.stop()
  warn_of_gaps(result)
  if state != 'DONE':
    print(f'error: the compaction job ended in state {state}; {output} holds no '
          f'{SUMMARY_FILE}', file=sys.stderr)
    sys.exit(1)
  found = sorted(info.path for info in storage.match(storage.join(output, '*.parquet')))
  summary = summary_of(runs, output, args.runs, runner_name(options), started_at, started, found)
  storage.write_bytes(storage.join(output, SUMMARY_FILE), summary.to_json().encode())
  print(f'{output}: {summary.embedded} vectors and {summary.failed} undecodable file(s) from '
        f'{len(runs)} run(s), in {len(found)} files; every run it consolidated may now be '
        'deleted')
  return json.loads(summary.to_json())


if __name__ == '__main__':
  main()
