"""`pnasnet-embeddings export`: puts the collection where users search it, and keeps it there
equal to `embeddings.load` (the Beam job and the targets: jobs/export*.py).

    pnasnet-embeddings export --runs RUN_DIR_OR_GLOB... --to TARGET [--model MODEL_ID] \
        [--batch_size N] [Beam flags: --runner, --direct_num_workers ...]

TARGET: postgresql://USER@HOST:PORT/DB?table=NAME (pgvector), milvus://HOST:PORT/COLLECTION,
milvus-lite:FILE.db?collection=NAME, qdrant://HOST:PORT/COLLECTION,
qdrant-local:DIRECTORY?collection=NAME, or vertex:FOLDER (Vertex AI Vector Search JSONL).

A target that cannot be used is refused before any work (exit 2); an export that failed part way
says what the target holds (exit 1).
"""

import argparse
from typing import Optional, Sequence

from commands.common import BEAM_EPILOG, add_runs_flags, exits, parse, verb_parser
from storage.run_dirs import RUN_ERRORS, find_runs, select_model


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('export', __doc__.split('\n\n')[0], BEAM_EPILOG + ' A PostgreSQL '
                       'password comes from PGPASSWORD or ~/.pgpass, as for psql.')
  add_runs_flags(parser, model_help='the model id to export when the runs hold several')
  parser.add_argument('--to', required=True, help='the target (see above)')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='rows a write sends at once (0: the target\'s own)')
  return parser


def main(argv: Optional[Sequence[str]] = None):
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  if args.batch_size < 0:
    parser.error('--batch_size must be positive')
  from jobs import export, export_target, work_folder  # Beam: once the flags are checked
  with exits(refused=RUN_ERRORS + (export_target.TargetError, work_folder.WorkDirectoryError)):
    export.check_options(beam_flags)
    target = export.open_target(args.to, args.batch_size)
    runs = select_model(find_runs(args.runs), args.model)
    target.check(runs[0].model, runs[0].embedding_size)
  with exits(failed=(export.ExportFailed,)):
    report = export.export(runs, target, beam_flags)
  print(export.summary_line(target, report))
  return report
