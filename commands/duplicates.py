"""`pnasnet-embeddings duplicates`: exact duplicates (same SHA-256) and near duplicates (cosine >=
a threshold) in a collection, as a CSV and a contact sheet (embeddings/duplicates.py; by clustering,
jobs/cluster_dedup.py).

    pnasnet-embeddings duplicates --collection URI [--version N] --csv dups.csv \
        [--threshold T] [--sheet dups.png] [--method auto|all_pairs|clusters] \
        [--memory_budget 4GB] [Beam flags]
"""

import argparse
import logging
from typing import List, Optional, Sequence

from collection import CollectionError
from commands.common import add_collection_flags, exits, parse, parse_size, verb_parser
from embeddings import sheet
from embeddings.duplicate_groups import Group, find_groups
from embeddings.duplicates import (check_threshold, choose_method, default_threshold, draw,
                                   write_csv)
from embeddings.runs import load, open_snapshot
from storage.run_dirs import RUN_ERRORS

_LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('duplicates', __doc__.split('\n\n')[0])
  add_collection_flags(parser)
  parser.add_argument('--csv', required=True, help='write the groups here (a local file)')
  parser.add_argument('--threshold', type=float,
                      help='cosine at or above which two images are near duplicates, above 0 and '
                      'at most 1 (default: measured per built-in network, as '
                      'embeddings/duplicates.py says)')
  parser.add_argument('--sheet', help='write a contact sheet PNG of the largest groups here')
  parser.add_argument('--method', choices=['auto', 'all_pairs', 'clusters'], default='auto',
                      help='all_pairs: every vector in memory, every pair compared; clusters: '
                      'a Beam pipeline, k-means then exact pairs inside clusters (Beam options '
                      'such as --runner go with the other flags); auto: all_pairs when it fits '
                      'in --memory_budget and is estimated faster (below about 18,000 4320-d '
                      'images)')
  parser.add_argument('--memory_budget', type=parse_size, default='4GB',
                      help='memory all pairs may use (vectors and their unit copy, 8 bytes per '
                      'dimension per image), for --method auto')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Group]:
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  problems = [p for p in (sheet.output_problem('--csv', args.csv),
                          sheet.output_problem('--sheet', args.sheet),
                          check_threshold(args.threshold) if args.threshold is not None else None)
              if p]
  if problems:
    parser.error('; '.join(problems))
  with exits(refused=RUN_ERRORS + (CollectionError,)):
    snapshot = open_snapshot(args.collection, args.version)
  model = snapshot.model
  threshold = args.threshold
  if threshold is None:
    threshold, measured = default_threshold(model)
    if not measured:
      _LOG.warning('no measured threshold for %s: using %.3f, measured for untrained weights; '
                   'measure yours with python -m benchmarks.near_duplicates and pass --threshold',
                   model, threshold)
  rows = snapshot.num_rows
  method = choose_method(args.method, rows, snapshot.feature_size, args.memory_budget)
  if method == 'all_pairs':
    groups = find_groups(load(snapshot.uri, snapshot.version), threshold)
  else:
    from jobs import cluster_dedup  # Beam and FAISS: only when clustering
    with exits(refused=(cluster_dedup.WorkDirectoryError,)):
      cluster_dedup.check_options(beam_flags)
    groups, stats = cluster_dedup.find_groups(snapshot, threshold, beam_flags)
    print(f'clustering: {stats}')
  write_csv(groups, args.csv)
  members = [m for g in groups for m in g.members[1:]]
  copies = sum(bool(m.same_bytes_as) for m in members)
  print(f'{rows} images, {model}, {snapshot.uri} version {snapshot.version}, threshold '
        f'{threshold}, {method.replace("_", " ")}: groups: {len(groups)} (exact copies only: '
        f'{sum(g.kind == "exact" for g in groups)}); images to drop: {len(members)} '
        f'(byte-identical copies: {copies}, near duplicates: {len(members) - copies}); CSV: '
        f'{args.csv}')
  if args.sheet:
    sheet.save_png(draw(groups), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return groups
