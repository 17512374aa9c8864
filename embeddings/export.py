"""Puts the collection where users search it, and keeps it there equal to `embeddings.load`.

    python -m embeddings.export --runs RUN_DIR_OR_GLOB... --to TARGET [--model MODEL_ID]
        [--batch_size N] [Beam flags: --runner, --direct_num_workers ...]

TARGET: postgresql://USER@HOST:PORT/DB?table=NAME (pgvector), milvus://HOST:PORT/COLLECTION,
milvus-lite:FILE.db?collection=NAME, qdrant://HOST:PORT/COLLECTION,
qdrant-local:DIRECTORY?collection=NAME, or vertex:FOLDER (Vertex AI Vector Search JSONL).

The command: the Beam job and the targets are jobs/export*.py, imported only once the flags are
checked (this package imports without Beam). A target that cannot be used is refused before any
work (exit 2); an export that failed part way says what the target holds (exit 1).
"""

import sys
from typing import Optional, Sequence

from embeddings.runs import parse_job_command
from storage.run_dirs import RUN_ERRORS, find_runs, select_model


def main(argv: Optional[Sequence[str]] = None):
  import argparse
  parser = argparse.ArgumentParser(
      prog='python -m embeddings.export', description=__doc__.split('\n\n')[0],
      epilog='Other --flags go to Beam (--runner, --direct_num_workers, --project, ...), whose '
      'FileSystems read gs:// and s3:// runs. A PostgreSQL password comes from PGPASSWORD or '
      '~/.pgpass, as for psql.')
  parser.add_argument('--runs', nargs='+', required=True,
                      help='run directories or globs of them (local, gs://, s3://)')
  parser.add_argument('--to', required=True, help='the target (see above)')
  parser.add_argument('--model', help='the model id to export when the runs hold several')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='rows a write sends at once (default: the target\'s own)')
  args, beam_flags = parse_job_command(parser, argv)
  if args.batch_size < 0:
    parser.error('--batch_size must be positive')
  from jobs import export, export_target, work_folder
  try:
    export.check_options(beam_flags)
    target = export.open_target(args.to, args.batch_size)
    runs = select_model(find_runs(args.runs), args.model)
    target.check(runs[0].model, runs[0].embedding_size)
  except RUN_ERRORS + (export_target.TargetError, work_folder.WorkDirectoryError) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  try:
    report = export.export(runs, target, beam_flags)
  except export.ExportFailed as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(1)
  print(export.summary_line(target, report))
  return report


if __name__ == '__main__':
  main()
