"""`pnasnet-embeddings export`: puts a version of the collection where users search it, and keeps it
there equal to the collection by applying only the changes since the version it last applied
(the Beam job and the targets: jobs/export*.py).

    pnasnet-embeddings export --collection URI [--version N] --to TARGET [--replace] \
        [--batch_size N] [--json] [Beam flags: --runner, --direct_num_workers ...]

TARGET: postgresql://USER@HOST:PORT/DB?table=NAME (pgvector: any libpq URI, or a keyword/value
string "host=HOST dbname=DB table=NAME"), milvus[+https]://HOST:PORT/COLLECTION,
milvus-lite:FILE.db?collection=NAME, qdrant[+https]://HOST:PORT/COLLECTION,
qdrant-local:DIRECTORY?collection=NAME, or vertex:FOLDER (Vertex AI Vector Search JSONL);
docs/exporting.md has every form.

A target that cannot be used, or that follows another collection (without --replace), is refused
before any work (exit 2); an export that failed part way says what the target holds (exit 1).
"""

import argparse
from typing import Optional, Sequence

import collection
from commands.common import BEAM_EPILOG, add_collection_flags, exits, parse, verb_parser


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('export', __doc__.split('\n\n')[0], BEAM_EPILOG + ' Secrets: a '
                       'PostgreSQL password from PGPASSWORD, ~/.pgpass or a service file, as for '
                       'psql; a Milvus token from MILVUS_TOKEN; a Qdrant API key from '
                       'QDRANT_API_KEY. Messages show a password in --to as ***.')
  add_collection_flags(parser)
  parser.add_argument('--to', required=True,
                      help='the target: postgresql://...?table=NAME or "host=... table=NAME" '
                           '(pgvector), milvus[+https]://HOST:PORT/COLLECTION, '
                           'milvus-lite:FILE.db?collection=NAME, '
                           'qdrant[+https]://HOST:PORT/COLLECTION, '
                           'qdrant-local:DIRECTORY?collection=NAME or vertex:FOLDER')
  parser.add_argument('--replace', action='store_true',
                      help='the target follows another collection (or holds an export of run '
                           'directories): replace what it holds by this collection, every row '
                           'written again')
  parser.add_argument('--json', action='store_true',
                      help='print the export\'s report as JSON (rows read, written, deleted, '
                           'seconds, the target\'s state) instead of one line')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='rows a write sends at once (0: the target\'s own)')
  return parser


def main(argv: Optional[Sequence[str]] = None):
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  if args.batch_size < 0:
    parser.error('--batch_size must be positive')
  from jobs import export, export_target, work_folder  # Beam: once the flags are checked
  with exits(refused=(collection.CollectionError, export_target.TargetError,
                      work_folder.WorkDirectoryError)):
    export.check_options(beam_flags)
    target = export.open_target(args.to, args.batch_size)
    source = collection.open_collection(args.collection, args.version)
    previous = export.check_source(target, source, args.replace)
  with exits(failed=(export.ExportFailed,)):
    report = export.export(source, target, beam_flags, args.replace, previous)
  print(report.to_json() if args.json else export.summary_line(target, report))
  return report
