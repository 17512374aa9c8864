"""Exact duplicates (same SHA-256) and near duplicates (cosine >= a threshold) in a collection
(`pnasnet-embeddings duplicates`).

Images joined by same bytes or by a cosine at or above the threshold form a group (transitively).
Each group keeps its largest image (most pixels, then most bytes); the CSV lists every member with
its cosine to the kept one, and as `exact` the members whose bytes another member has.

Two methods. `all_pairs` holds the vectors in memory (images x dimension x 8 bytes: the vectors
and their unit copy) and compares every pair exactly, block by block. `clusters`
(jobs/cluster_dedup.py) is a Beam pipeline for collections beyond that: k-means on a
sample, exact pairs inside clusters, each vector also visiting the clusters a near pair of it can
fall in. `auto` takes all_pairs when its memory fits --memory_budget (counted from the
collection's row count before reading: up to 111,857 4320-d images for the default 4GB) and it is estimated
faster: below about 18,000 4320-d images, where clustering's start-up outweighs all pairs'
square growth (measured with benchmarks/bench_duplicates.py).

Default thresholds were measured with `python -m benchmarks.near_duplicates` on the sample photos
and their resized and re-encoded copies, per built-in untrained network: copies scored at least
0.9863 (large), 0.9733 (mobile) and 0.9638 (tiny), different photos at most 0.9857, 0.9700 and
0.9359. The untrained large network leaves a very narrow margin; for any other model (trained
weights above all) measure with that command and pass --threshold.
"""

import csv
import logging
import math
import re
from typing import List, Optional, Sequence, Tuple

import storage
from embeddings import sheet
from embeddings.duplicate_groups import BLOCK_SCORES, Group, Member

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
