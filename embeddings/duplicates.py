"""Exact duplicates (same SHA-256) and near duplicates (cosine >= a threshold) in runs.

    python -m embeddings.duplicates --runs RUN_DIR_OR_GLOB... --csv dups.csv \
        [--threshold T] [--sheet dups.png] [--model MODEL_ID]

Images joined by same bytes or by a cosine at or above the threshold form a group (transitively).
Each group keeps its largest image (most pixels, then most bytes); the CSV lists every member with
its cosine to the kept one. The vectors are held in memory (images x dimension x 4 bytes) and all
pairs are compared exactly, block by block.

Default thresholds were measured with `python -m benchmarks.near_duplicates` on the sample photos
and their resized and re-encoded copies, per built-in untrained network: copies scored at least
0.9863 (large), 0.9733 (mobile) and 0.9638 (tiny), different photos at most 0.9857, 0.9700 and
0.9359. The untrained large network leaves a very narrow margin; for any other model (trained
weights above all) measure with that command and pass --threshold.
"""

import csv
import logging
import re
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from embeddings import sheet, storage
from embeddings.runs import (RUN_ERRORS, Embeddings, command_parser, concatenate, find_runs,
                             iter_run_shards, parse_command, select_model)
from embeddings.similarity import unit_rows

# Between the copies' lowest and the other photos' highest cosine, seeds 0 and 1 (mobile: 0).
MEASURED_THRESHOLDS = {'builtin:pnasnet_large': 0.986, 'builtin:pnasnet_mobile': 0.972,
                       'builtin:pnasnet_tiny': 0.95}
FALLBACK_THRESHOLD = MEASURED_THRESHOLDS['builtin:pnasnet_large']
BLOCK_SCORES = 1 << 25  # similarity entries computed at once (128 MiB of float32)
SHEET_GROUPS = 8
SHEET_MEMBERS = 6
CSV_COLUMNS = ['group', 'kind', 'role', 'uri', 'cosine_to_kept', 'same_bytes_as_kept', 'sha256',
               'width', 'height', 'size_bytes']
_UNTRAINED = re.compile(r'^(builtin:[A-Za-z0-9_]+)@untrained-seed\d+$')
_LOG = logging.getLogger(__name__)


class Member(NamedTuple):
  index: int  # row in the collection
  cosine: float  # to the group's kept image
  same_bytes: bool  # as the kept image


class Group(NamedTuple):
  kind: str  # 'exact': all members have the same bytes; 'near' otherwise
  members: List[Member]  # the kept image first


def default_threshold(model: str) -> Tuple[float, bool]:
  """(threshold, whether it was measured for this model's family)."""
  untrained = _UNTRAINED.match(model)
  if untrained and untrained[1] in MEASURED_THRESHOLDS:
    return MEASURED_THRESHOLDS[untrained[1]], True
  return FALLBACK_THRESHOLD, False


def similar_pairs(units: np.ndarray, threshold: float) -> Iterator[Tuple[int, int]]:
  """(i, j) with i < j and cosine >= threshold, over unit rows, exactly."""
  count = len(units)
  block = max(1, min(count, BLOCK_SCORES // max(count, 1)))
  for start in range(0, count, block):
    scores = units[start:start + block] @ units[start:].T
    rows, columns = np.nonzero(scores >= threshold)
    later = columns > rows  # columns are offset by `start`, as the rows are
    yield from zip((rows[later] + start).tolist(), (columns[later] + start).tolist())


def _components(count: int, pairs) -> List[List[int]]:
  parent = list(range(count))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i, j in pairs:
    parent[root(i)] = root(j)
  members: Dict[int, List[int]] = {}
  for i in range(count):
    members.setdefault(root(i), []).append(i)
  return [m for m in members.values() if len(m) > 1]


def find_groups(collection: Embeddings, threshold: float) -> List[Group]:
  """Groups of two or more, largest first."""
  units = unit_rows(collection.vectors)
  sha256 = collection.metadata.column('sha256').to_pylist()
  pixels = [(h or 0) * (w or 0) for h, w in zip(collection.metadata.column('height').to_pylist(),
                                                collection.metadata.column('width').to_pylist())]
  sizes = [s or 0 for s in collection.metadata.column('size_bytes').to_pylist()]
  first_with_bytes: Dict[str, int] = {}
  same_bytes = []
  for i, digest in enumerate(sha256):
    if digest:
      same_bytes.append((first_with_bytes.setdefault(digest, i), i))
  pairs = [p for p in same_bytes if p[0] != p[1]] + list(similar_pairs(units, threshold))
  groups = []
  for component in _components(len(units), pairs):
    kept = min(component, key=lambda i: (-pixels[i], -sizes[i], collection.uris[i]))
    cosines = units[component] @ units[kept]
    members = sorted((Member(i, float(c), bool(sha256[i]) and sha256[i] == sha256[kept])
                      for i, c in zip(component, cosines)),
                     key=lambda m: (m.index != kept, -m.cosine, collection.uris[m.index]))
    kind = 'exact' if all(m.same_bytes for m in members) else 'near'
    groups.append(Group(kind, members))
  groups.sort(key=lambda g: (-len(g.members), -min(m.cosine for m in g.members),
                             collection.uris[g.members[0].index]))
  return groups


def write_csv(groups: Sequence[Group], collection: Embeddings, path: str) -> None:
  metadata = collection.metadata
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(groups, 1):
      for position, member in enumerate(group.members):
        row = metadata.slice(member.index, 1).to_pylist()[0]
        writer.writerow([number, group.kind, 'keep' if position == 0 else 'duplicate',
                         collection.uris[member.index], f'{member.cosine:.6f}',
                         int(member.same_bytes), row['sha256'], row['width'], row['height'],
                         row['size_bytes']])


def draw(groups: Sequence[Group], collection: Embeddings):
  """One row per group (the first SHEET_GROUPS), the kept image framed."""
  rows = []
  for number, group in enumerate(groups[:SHEET_GROUPS], 1):
    tiles = []
    for position, member in enumerate(group.members[:SHEET_MEMBERS]):
      uri = collection.uris[member.index]
      role = 'keep' if position == 0 else ('same bytes' if member.same_bytes
                                           else f'cosine {member.cosine:.4f}')
      tiles.append(sheet.Tile(sheet.thumbnail_of(uri),
                              [f'group {number} ({group.kind}): {role}', storage.basename(uri)],
                              highlight=position == 0))
    rows.append(tiles)
  return sheet.draw_sheet(rows, max([len(r) for r in rows] + [1]))


def main(argv: Optional[Sequence[str]] = None) -> List[Group]:
  parser = command_parser('python -m embeddings.duplicates', __doc__.split('\n\n')[0])
  parser.add_argument('--csv', required=True, help='write the groups here')
  parser.add_argument('--threshold', type=float,
                      help='cosine at or above which two images are near duplicates (default: '
                      'measured per built-in network, see the module docstring)')
  parser.add_argument('--sheet', help='write a contact sheet PNG of the largest groups here')
  args = parse_command(parser, argv)
  try:
    runs = select_model(find_runs(args.runs), args.model)
  except RUN_ERRORS as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  collection = concatenate(iter_run_shards(runs), runs[0].model)
  threshold = args.threshold
  if threshold is None:
    threshold, measured = default_threshold(collection.model)
    if not measured:
      _LOG.warning('no measured threshold for %s: using %.3f, measured for untrained weights; '
                   'measure yours with python -m benchmarks.near_duplicates and pass --threshold',
                   collection.model, threshold)
  groups = find_groups(collection, threshold)
  write_csv(groups, collection, args.csv)
  exact = sum(g.kind == 'exact' for g in groups)
  print(f'{len(collection.uris)} images, {collection.model}, threshold {threshold}: '
        f'{exact} groups of exact duplicates, {len(groups) - exact} groups with near duplicates, '
        f'{sum(len(g.members) - 1 for g in groups)} images to drop; CSV: {args.csv}')
  if args.sheet:
    sheet.save_png(draw(groups, collection), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return groups


if __name__ == '__main__':
  main()
