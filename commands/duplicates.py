"""`pnasnet-embeddings duplicates`: exact duplicates (same SHA-256) and near duplicates (cosine >=
a threshold) in runs, as a CSV and a contact sheet (embeddings/duplicates.py; by clustering,
jobs/cluster_dedup.py).

    pnasnet-embeddings duplicates --runs RUN_DIR_OR_GLOB... --csv dups.csv [--threshold T] \
        [--sheet dups.png] [--model MODEL_ID] [--method auto|all_pairs|clusters] \
        [--memory_budget 4GB] [Beam flags]
"""

import argparse
import logging
from typing import List, Optional, Sequence

from commands.common import add_runs_flags, exits, parse, parse_size, verb_parser
from embeddings import sheet
from embeddings.duplicate_groups import Group, find_groups
from embeddings.duplicates import (check_threshold, choose_method, default_threshold, draw,
                                   write_csv)
from embeddings.runs import concatenate, iter_run_shards
from storage.run_dirs import RUN_ERRORS, find_runs, select_model

_LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('duplicates', __doc__.split('\n\n')[0])
  add_runs_flags(parser)
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
  with exits(refused=RUN_ERRORS):
    runs = select_model(find_runs(args.runs), args.model)
  model = runs[0].model
  threshold = args.threshold
  if threshold is None:
    threshold, measured = default_threshold(model)
    if not measured:
      _LOG.warning('no measured threshold for %s: using %.3f, measured for untrained weights; '
                   'measure yours with python -m benchmarks.near_duplicates and pass --threshold',
                   model, threshold)
  rows = sum(r.summary.embedded for r in runs)  # at most: runs may share URIs
  method = choose_method(args.method, rows, runs[0].embedding_size or 0, args.memory_budget)
  if method == 'all_pairs':
    collection = concatenate(iter_run_shards(runs), model)
    rows = len(collection.uris)
    groups = find_groups(collection, threshold)
  else:
    from jobs import cluster_dedup  # Beam and FAISS: only when clustering
    with exits(refused=(cluster_dedup.WorkDirectoryError,)):
      cluster_dedup.check_options(beam_flags)
    groups, stats = cluster_dedup.find_groups(runs, threshold, beam_flags)
    rows = stats.rows
    print(f'clustering: {stats}')
  write_csv(groups, args.csv)
  members = [m for g in groups for m in g.members[1:]]
  copies = sum(bool(m.same_bytes_as) for m in members)
  print(f'{rows} images, {model}, threshold {threshold}, {method.replace("_", " ")}: groups: '
        f'{len(groups)} (exact copies only: {sum(g.kind == "exact" for g in groups)}); images '
        f'to drop: {len(members)} (byte-identical copies: {copies}, near duplicates: '
        f'{len(members) - copies}); CSV: {args.csv}')
  if args.sheet:
    sheet.save_png(draw(groups), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return groups
