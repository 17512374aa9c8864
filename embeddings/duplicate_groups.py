"""Groups of duplicates: rows joined by the same bytes or by a cosine at or above a threshold
(transitively), each group keeping its largest image. Both methods of the duplicates command
group here: all pairs in memory (`find_groups`), and the clustering job (jobs/cluster_dedup.py)
inside each component of the pairs it found.
"""

from collections import Counter
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from embeddings.runs import Embeddings
from embeddings.similarity import unit_rows

BLOCK_SCORES = 1 << 25  # similarity entries computed at once (128 MiB of float32)


class Member(NamedTuple):
  uri: str
  cosine: float  # to the group's kept image
  kind: str  # 'exact': another member has the same bytes; 'near' otherwise
  same_bytes_as: str  # the first member (kept first) with the same bytes, or ''
  sha256: Optional[str]
  width: Optional[int]
  height: Optional[int]
  size_bytes: Optional[int]


class Group(NamedTuple):
  kind: str  # 'exact': all members have the same bytes; 'near': none do; 'mixed'
  members: List[Member]  # the kept image first


class Candidate(NamedTuple):
  """What a group is made from: a member's row and unit vector."""
  uri: str
  unit: np.ndarray  # the vector scaled to length 1
  sha256: Optional[str]
  width: Optional[int]
  height: Optional[int]
  size_bytes: Optional[int]


def similar_pairs(units: np.ndarray, threshold: float) -> Iterator[Tuple[int, int]]:
  """(i, j) with i < j and cosine >= threshold, over unit rows, exactly."""
  count = len(units)
  block = max(1, min(count, BLOCK_SCORES // max(count, 1)))
  for start in range(0, count, block):
    scores = units[start:start + block] @ units[start:].T
    rows, columns = np.nonzero(scores >= threshold)
    later = columns > rows  # columns are offset by `start`, as the rows are
    yield from zip((rows[later] + start).tolist(), (columns[later] + start).tolist())


def components(count: int, pairs: Iterable[Tuple[int, int]]) -> List[List[int]]:
  """The connected components of two or more of the graph on 0..count-1 with these edges."""
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


def byte_copy_pairs(sha256: Sequence[Optional[str]]) -> Iterator[Tuple[int, int]]:
  """(first index with these bytes, a later one) for every repeated SHA-256."""
  first_with_bytes: Dict[str, int] = {}
  for i, digest in enumerate(sha256):
    if digest and first_with_bytes.setdefault(digest, i) != i:
      yield first_with_bytes[digest], i


def make_group(candidates: Sequence[Candidate]) -> Group:
  """Keeps the largest image (most pixels, then most bytes, then the first URI); the others
  follow by cosine to it. Byte-identical members are `exact` whichever member they copy."""
  kept = min(candidates, key=lambda c: (-(c.width or 0) * (c.height or 0), -(c.size_bytes or 0),
                                        c.uri))
  cosines = np.stack([c.unit for c in candidates]) @ kept.unit
  ordered = sorted(zip(candidates, cosines.tolist()),
                   key=lambda pair: (pair[0] is not kept, -pair[1], pair[0].uri))
  first_with_bytes: Dict[str, str] = {}
  for candidate, _ in ordered:
    if candidate.sha256:
      first_with_bytes.setdefault(candidate.sha256, candidate.uri)
  copies = Counter(c.sha256 for c in candidates if c.sha256)
  members = []
  for candidate, cosine in ordered:
    twin = first_with_bytes.get(candidate.sha256, '') if candidate.sha256 else ''
    members.append(Member(candidate.uri, cosine,
                          'exact' if copies[candidate.sha256] > 1 else 'near',
                          twin if twin != candidate.uri else '', candidate.sha256,
                          candidate.width, candidate.height, candidate.size_bytes))
  if len(copies) == 1 and all(m.kind == 'exact' for m in members):
    kind = 'exact'
  else:
    kind = 'mixed' if copies and max(copies.values()) > 1 else 'near'
  return Group(kind, members)


def sort_groups(groups: Iterable[Group]) -> List[Group]:
  """Largest first, then the tightest, then by the kept URI."""
  return sorted(groups, key=lambda g: (-len(g.members), -min(m.cosine for m in g.members),
                                       g.members[0].uri))


def grouped(units: np.ndarray, sha256: Sequence[Optional[str]], threshold: float,
            candidate: Callable[[int], Candidate]) -> List[Group]:
  """The groups among these rows: joined by the same bytes or a cosine >= threshold."""
  pairs = list(byte_copy_pairs(sha256)) + list(similar_pairs(units, threshold))
  return [make_group([candidate(i) for i in component])
          for component in components(len(units), pairs)]


def find_groups(collection: Embeddings, threshold: float) -> List[Group]:
  """Groups of two or more, largest first, comparing all pairs in memory."""
  units = unit_rows(collection.vectors)
  columns = {name: collection.metadata.column(name).to_pylist()
             for name in ('sha256', 'width', 'height', 'size_bytes')}
  return sort_groups(grouped(units, columns['sha256'], threshold, lambda i: Candidate(
      collection.uris[i], units[i], columns['sha256'][i], columns['width'][i],
      columns['height'][i], columns['size_bytes'][i])))
