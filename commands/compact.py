"""`pnasnet-embeddings compact`: consolidates many runs into one, every URI's vector by the load
rule (jobs/compact.py), after which every older run may be deleted (a bucket lifecycle rule on
the nightly prefix, docs/using-embeddings.md).

    pnasnet-embeddings compact --runs "gs://bucket/embeddings/*" \
        --output gs://bucket/embeddings/compact-2026-12-02 [--model MODEL_ID] [--num_shards N] \
        [Beam flags: --runner DataflowRunner --project ... --temp_location ...]

Exit 0 done, 2 refused before any work (no runs, an output that holds a run, a run still going
among --runs), 1 the job failed.
"""

import argparse
import json
from typing import Optional, Sequence

from commands.common import add_runs_flags, exits, parse, verb_parser
from storage.run_dirs import RUN_ERRORS


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('compact', __doc__.split('\n\n')[0])
  add_runs_flags(parser, model_help='the model id to keep when the runs hold several')
  parser.add_argument('--output', required=True,
                      help='the consolidated run directory to create, e.g. beside the nights')
  parser.add_argument('--num_shards', type=int, default=0,
                      help='output shards (0: one per 100,000 rows of the newest index)')
  parser.add_argument('--allow_concurrent', action='store_true',
                      help='compact even while a run among --runs is still going')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  output = args.output.rstrip('/')
  from jobs import compact  # Beam: once the flags are checked
  from pipeline.output_dir import OutputExistsError, OutputNotWritableError
  with exits(refused=RUN_ERRORS + (compact.CompactError, OutputExistsError,
                                   OutputNotWritableError),
             failed=(compact.CompactionFailed,)):
    runs = compact.runs_to_compact(args.runs, args.model, output, args.allow_concurrent)
    shards = args.num_shards or compact.default_shards(runs, compact.SHARD_ROWS)
    summary = compact.compact(runs, output, args.runs, shards, beam_flags)
  print(f'{output}: {summary.embedded} vectors and {summary.failed} undecodable file(s) from '
        f'{len(runs)} run(s), in {len(summary.files)} files; every run it consolidated may now '
        'be deleted')
  return json.loads(summary.to_json())
