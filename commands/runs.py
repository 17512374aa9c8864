"""`pnasnet-embeddings runs`: run directories and their state, counts and model, as a table or
JSON (embeddings/list_runs.py).

Exit 0 when every listed run finished with outcome "finished", 3 when one finished with more
failures than its --max_failed_fraction allowed, 1 when one is unfinished (claimed, no summary:
running, interrupted or failed), 2 when the arguments name no run directory at all; so a
scheduler can check a night's run with the run's directory as the argument.
"""

import argparse
import json
import sys
from typing import Optional, Sequence

from commands.common import FILESYSTEM_EPILOG, PROGRAM, parse, verb_parser
from embeddings.list_runs import exit_code, format_table, list_runs
from run_format import CLAIM_FILE, SUMMARY_FILE
from storage.run_dirs import holds_run_directories


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('runs', __doc__.split('\n\n')[0], FILESYSTEM_EPILOG)
  parser.add_argument('runs', nargs='+', help='run directories or globs of them (local, gs://, '
                      's3://), e.g. "gs://bucket/embeddings/*"')
  parser.add_argument('--json', action='store_true', help='one JSON list instead of a table')
  return parser


def _glob_hint(patterns: Sequence[str]) -> str:
  """What to type when a folder holds run directories rather than being one: its `/*`."""
  parents = [p.rstrip('/') for p in patterns if holds_run_directories(p)]
  if not parents:
    return ''
  return (f'; {", ".join(parents)} holds run directories: add /* to list them: {PROGRAM} runs '
          + ' '.join(f'"{p}/*"' for p in parents))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args, _ = parse(parser, argv)
  states = list_runs(args.runs)
  if not states:
    print(f'error: no run directory (no {CLAIM_FILE} or {SUMMARY_FILE}) in '
          f'{" ".join(args.runs)}{_glob_hint(args.runs)}', file=sys.stderr)
  elif args.json:
    print(json.dumps([s.as_dict() for s in states], indent=2))
  else:
    print(format_table(states))
  return exit_code(states)
