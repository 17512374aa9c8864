"""Exact duplicates (same SHA-256) and near duplicates (cosine >= a threshold) in runs.

    python -m embeddings.duplicates --runs RUN_DIR_OR_GLOB... --csv dups.csv \
        [--threshold T] [--sheet dups.png] [--model MODEL_ID] \
        [--method auto|all_pairs|clusters] [--memory_budget 4GB] [Beam options]

Images joined by same bytes or by a cosine at or above the threshold form a group (transitively).
Each group keeps its largest image (most pixels, then most bytes); the CSV lists every member with
its cosine to the kept one, and as `exact` the members whose bytes another member has.

Two methods. `all_pairs` holds the vectors in memory (images x dimension x 8 bytes: the vectors
and their unit copy) and compares every pair exactly, block by block. `clusters`
(jobs/cluster_dedup.py) is a Beam pipeline for collections beyond that: k-means on a
sample, exact pairs inside clusters, each vector also visiting the clusters a near pair of it can
fall in. `auto` takes all_pairs when its memory fits --memory_budget (counted from the runs'
summaries before reading: up to 111,857 4320-d images for the default 4GB) and it is estimated
faster: below about 18,000 4320-d images, where clustering's start-up outweighs all pairs'
square growth (measured with benchmarks/bench_duplicates.py).

Default thresholds were measured with `python -m benchmarks.near_duplicates` on the sample photos
and their resized and re-encoded copies, per built-in untrained network: copies scored at least
0.9863 (large), 0.9733 (mobile) and 0.9638 (tiny), different photos at most 0.9857, 0.9700 and
0.9359. The untrained large network leaves a very narrow margin; for any other model (trained
weights above all) measure with that command and pass --threshold.
"""

import argparse
import csv
import logging
import math
import re
import sys
from typing import List, Optional, Sequence, Tuple

import storage
from embeddings import sheet
from embeddings.duplicate_groups import BLOCK_SCORES, Group, Member, find_groups
from embeddings.runs import command_parser, concatenate, iter_run_shards, parse_job_command
from storage.run_dirs import RUN_ERRORS, find_runs, select_model

# Between the copies' lowest and the other photos' highest cosine, seeds 0 and 1 (mobile: 0).
MEASURED_THRESHOLDS = {'builtin:pnasnet_large': 0.986, 'builtin:pnasnet_mobile': 0.972,
                       'builtin:pnasnet_tiny': 0.95}
FALLBACK_THRESHOLD = MEASURED_THRESHOLDS['builtin:pnasnet_large']
# Measured 2026-12-02 with benchmarks/bench_duplicates.py --all_pairs on 10,000-40,000 synthetic
# 4320-d vectors (docs/performance.md): seconds per pair of images and dimension; and clustering's
# seconds to start (Beam, k-means, stages), then per image and dimension. Only their ratio
# matters to `auto` (all_pairs_faster_below).
ALL_PAIRS_SECONDS = 7.0e-11
CLUSTERS_SECONDS = (81.5, 2.0e-7)
SHEET_GROUPS = 8
SHEET_MEMBERS = 6
CSV_COLUMNS = ['group', 'kind', 'role', 'uri', 'cosine_to_kept', 'same_bytes_as_kept',
               'same_bytes_as', 'sha256', 'width', 'height', 'size_bytes']
_UNTRAINED = re.compile(r'^(builtin:[A-Za-z0-9_]+)@untrained-seed\d+$')
_LOG = logging.getLogger(__name__)


def default_threshold(model: str) -> Tuple[float, bool]:
  """(threshold, whether it was measured for this model's family)."""
  untrained = _UNTRAINED.match(model)
  if untrained and untrained[1] in MEASURED_THRESHOLDS:
    return MEASURED_THRESHOLDS[untrained[1]], True
  return FALLBACK_THRESHOLD, False


def check_threshold(threshold: float) -> Optional[str]:
  """Why a threshold cannot be a cosine separating duplicates, or None."""
  if not 0 < threshold <= 1:
    return (f'--threshold {threshold:g}: a cosine above 0 and at most 1 (the default is '
            f'measured per built-in network; 1 means the same vector)')
  return None


def write_csv(groups: Sequence[Group], path: str) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(groups, 1):
      kept = group.members[0]
      for position, member in enumerate(group.members):
        writer.writerow([number, member.kind, 'keep' if position == 0 else 'duplicate',
                         member.uri, f'{min(member.cosine, 1.0):.6f}',
                         int(bool(member.sha256) and member.sha256 == kept.sha256),
                         member.same_bytes_as, member.sha256, member.width, member.height,
                         member.size_bytes])


def _role(position: int, member: Member) -> sheet.Label:
  if position == 0:
    return sheet.Label('keep')
  if member.same_bytes_as:
    return sheet.Label('same bytes as ', storage.basename(member.same_bytes_as))
  return sheet.Label(f'cosine {min(member.cosine, 1.0):.4f}')


def sheet_tiles(groups: Sequence[Group]) -> List[List[sheet.Tile]]:
  """One row per group (the first SHEET_GROUPS), the kept image framed, each labelled with its
  group, its role and its name; a group with more members than a row says how many more."""
  rows = []
  for number, group in enumerate(groups[:SHEET_GROUPS], 1):
    shown = group.members[:SHEET_MEMBERS]
    hidden = len(group.members) - len(shown)
    tiles = []
    for position, member in enumerate(shown):
      lines = [sheet.Label(f'group {number} ({member.kind})'), _role(position, member),
               sheet.short_name(member.uri)]
      if hidden and position == len(shown) - 1:
        lines.append(f'+{hidden} more in the CSV')
      tiles.append(sheet.Tile(sheet.thumbnail_of(member.uri), lines, highlight=position == 0))
    rows.append(tiles)
  return rows


def draw(groups: Sequence[Group]):
  rows = sheet_tiles(groups)
  return sheet.draw_sheet(rows, max([len(r) for r in rows] + [1]))


def parse_bytes(text: str) -> int:
  """'4GB', '512MB', '1.5GiB' or a plain count of bytes."""
  match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*', text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f'{text!r} is not a size such as 4GB or 512MB')
  power = ' KMGT'.index(match[2].upper() or ' ')
  return int(float(match[1]) * (1024 if match[3] and match[3].lower() == 'ib' else 1000) ** power)


def all_pairs_bytes(rows: int, dimension: int) -> int:
  """Memory all pairs needs: the vectors and their unit copy (float32), one block of scores."""
  return 2 * rows * dimension * 4 + BLOCK_SCORES * 4


def estimated_seconds(method: str, rows: int, dimension: int) -> float:
  """What `method` costs on the machine ALL_PAIRS_SECONDS and CLUSTERS_SECONDS were measured on:
  all pairs grows with the square of the images; clustering (the local runner) starts a
  pipeline, then grows about linearly."""
  if method == 'all_pairs':
    return ALL_PAIRS_SECONDS * rows * rows * dimension
  start, per_value = CLUSTERS_SECONDS
  return start + per_value * rows * dimension


def all_pairs_faster_below(dimension: int) -> int:
  """The count of images from which clustering is estimated faster than all pairs."""
  square, linear = ALL_PAIRS_SECONDS * dimension, CLUSTERS_SECONDS[1] * dimension
  start = CLUSTERS_SECONDS[0]
  return math.ceil((linear + math.sqrt(linear * linear + 4 * square * start)) / (2 * square))


def choose_method(method: str, rows: int, dimension: int, memory_budget: int) -> str:
  """`auto`: all pairs when it fits `memory_budget` and is estimated faster, else clusters."""
  if method != 'auto':
    return method
  if all_pairs_bytes(rows, dimension) > memory_budget:
    return 'clusters'
  faster = (estimated_seconds('all_pairs', rows, dimension)
            <= estimated_seconds('clusters', rows, dimension))
  return 'all_pairs' if faster else 'clusters'


def main(argv: Optional[Sequence[str]] = None) -> List[Group]:
  parser = command_parser('python -m embeddings.duplicates', __doc__.split('\n\n')[0])
  parser.add_argument('--csv', required=True, help='write the groups here (a local file)')
  parser.add_argument('--threshold', type=float,
                      help='cosine at or above which two images are near duplicates, above 0 and '
                      'at most 1 (default: measured per built-in network, see the module '
                      'docstring)')
  parser.add_argument('--sheet', help='write a contact sheet PNG of the largest groups here')
  parser.add_argument('--method', choices=['auto', 'all_pairs', 'clusters'], default='auto',
                      help='all_pairs: every vector in memory, every pair compared; clusters: '
                      'a Beam pipeline, k-means then exact pairs inside clusters (Beam options '
                      'such as --runner go with the other flags); auto (default): all_pairs when '
                      'it fits in --memory_budget and is estimated faster (below about 18,000 '
                      '4320-d images)')
  parser.add_argument('--memory_budget', type=parse_bytes, default='4GB',
                      help='memory all pairs may use (vectors and their unit copy, 8 bytes per '
                      'dimension per image), for --method auto (default 4GB)')
  args, beam_flags = parse_job_command(parser, argv)
  problems = [p for p in (sheet.output_problem('--csv', args.csv),
                          sheet.output_problem('--sheet', args.sheet),
                          check_threshold(args.threshold) if args.threshold is not None else None)
              if p]
  if problems:
    parser.error('; '.join(problems))
  try:
    runs = select_model(find_runs(args.runs), args.model)
  except RUN_ERRORS as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
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
  if method == 'clusters':
    from jobs import cluster_dedup  # Beam and FAISS: only when clustering
    try:
      cluster_dedup.check_options(beam_flags)
    except cluster_dedup.WorkDirectoryError as exc:
      print(f'error: {exc}', file=sys.stderr)
      sys.exit(2)
  if method == 'all_pairs':
    collection = concatenate(iter_run_shards(runs), model)
    rows = len(collection.uris)
    groups = find_groups(collection, threshold)
  else:
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


if __name__ == '__main__':
  main()
