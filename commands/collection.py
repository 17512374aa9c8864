"""`pnasnet-embeddings collection import|compact|cleanup|history`: the collection itself (one
versioned Lance table, collection/): built once from run directories, kept small and fast, and
its versions listed.

    pnasnet-embeddings collection import --runs RUN_DIR_OR_GLOB... --collection URI \
        [--model MODEL_ID] [Beam flags]
    pnasnet-embeddings collection compact --collection URI
    pnasnet-embeddings collection cleanup --collection URI --older_than 7d
    pnasnet-embeddings collection history --collection URI

Run directories may be deleted at any time: the collection holds every vector it returns.
Versions are what readers (--version) and followers (an export, an index) read; `cleanup`
removes those older than --older_than, and a follower whose last synced version is among them
re-syncs whole at its next run.
"""

import argparse
import datetime
import re
from typing import Optional, Sequence

import collection
from commands.common import BEAM_EPILOG, add_runs_flags, exits, parse, sub_verb, verb_parser
from storage.run_dirs import RUN_ERRORS

LIFECYCLE = ('Run directories may be deleted at any time: the collection holds every vector it '
             'returns. A follower (export, index) whose last synced version was removed here '
             're-syncs whole at its next run: keep --older_than longer than the longest gap '
             'between a follower\'s syncs.')
_UNITS = {'d': 'days', 'h': 'hours', 'm': 'minutes', 's': 'seconds'}


def parse_age(text: str) -> datetime.timedelta:
  """'7d', '12h', '30m', '0s'."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([dhms])\s*', text)
  if not match:
    raise argparse.ArgumentTypeError(f'{text!r} is not an age such as 7d, 12h, 30m or 0s')
  return datetime.timedelta(**{_UNITS[match[2]]: float(match[1])})


def _collection_flag(parser: argparse.ArgumentParser, text: str) -> None:
  parser.add_argument('--collection', required=True, help=text)


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('collection', __doc__.split('\n\n')[0], BEAM_EPILOG)
  verbs = parser.add_subparsers(dest='command', required=True)
  build = sub_verb(parser, verbs, 'import', 'build a new collection once from finished run '
                   'directories (a Beam job, one commit)')
  add_runs_flags(build, model_help='the model id to import when the runs hold several')
  _collection_flag(build, 'the collection to create (a local folder, gs://, s3://), or an '
                   'empty one of the runs\' model')
  compact = sub_verb(parser, verbs, 'compact', 'rewrite small fragments and deleted rows into '
                     'larger fragments; no row id changes')
  _collection_flag(compact, 'the collection (a local folder, gs://, s3://)')
  cleanup = sub_verb(parser, verbs, 'cleanup', 'remove old versions and the files only they name')
  _collection_flag(cleanup, 'the collection (a local folder, gs://, s3://)')
  cleanup.add_argument('--older_than', type=parse_age, required=True,
                       help='remove versions older than this (7d, 12h, 30m); the latest is '
                       'always kept')
  history = sub_verb(parser, verbs, 'history', 'one line per version kept: when, what, which run')
  _collection_flag(history, 'the collection (a local folder, gs://, s3://)')
  return parser


def format_history(entries: Sequence[collection.HistoryEntry]) -> str:
  lines = [f'{"version":>7}  {"committed (UTC)":19}  {"kind":10}  {"added":>9}  '
           f'{"removed":>9}  {"rows":>11}  run']
  for e in entries:
    lines.append(f'{e.version:>7}  {e.committed_at:%Y-%m-%d %H:%M:%S}  {e.kind:10}  '
                 f'{"+" + str(e.added):>9}  {"-" + str(e.removed):>9}  {e.rows:>11}  '
                 f'{e.run or "-"}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None):
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  if args.command == 'import':
    from jobs import collection_import  # Beam: once the flags are checked
    with exits(refused=RUN_ERRORS + (collection.CollectionError,
                                     collection_import.work_folder.WorkDirectoryError),
               failed=(collection.ConcurrentNightError,)):
      imported = collection_import.run_import(args.collection, args.runs, args.model,
                                              beam_flags)
    print(f'imported {imported.rows} rows from {imported.runs} run(s) into {args.collection} '
          f'version {imported.version}; {imported.failed_in_newer} URI(s) left out because a '
          f'newer run failed them, {imported.not_in_shards} an index named but no shard held. '
          'Files deleted since the runs are removed by the first night with --collection.')
    return imported
  with exits(refused=(collection.CollectionError,)):
    if args.command == 'compact':
      before = len(collection.open_collection(args.collection).fragment_ids())
      compacted = collection.compact(args.collection)
      after = len(collection.open_collection(args.collection).fragment_ids())
      print(f'{args.collection}: version {compacted.version_before} -> {compacted.version}; '
            f'fragments {before} -> {after} ({compacted.fragments_removed} rewritten into '
            f'{compacted.fragments_added}); row ids unchanged: followers have nothing to apply')
      return compacted
    if args.command == 'cleanup':
      cleaned = collection.cleanup(args.collection, args.older_than)
      print(f'{args.collection}: removed {cleaned.versions_removed} version(s) and '
            f'{cleaned.bytes_removed} bytes; the oldest version kept is {cleaned.oldest_kept}. '
            + LIFECYCLE)
      return cleaned
    entries = collection.history(args.collection)
  print(format_history(entries))
  return entries
