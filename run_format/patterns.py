"""The syntax of the `input` patterns a summary records (what `--input` takes): the launcher
matches them, and readers and later nights decide from them which files a run covered (Inputs)."""

import re
from typing import FrozenSet, NamedTuple, Tuple

GLOB_CHARACTERS = '*?['


def first_glob(pattern: str) -> int:
  """Where the first unescaped glob character is; the length when there is none."""
  escaped = False
  for position, character in enumerate(pattern):
    if escaped:
      escaped = False
    elif character == '\\':
      escaped = True
    elif character in GLOB_CHARACTERS:
      return position
  return len(pattern)


def has_glob(pattern: str) -> bool:
  return first_glob(pattern) < len(pattern)


def unescape(pattern: str) -> str:
  return re.sub(r'\\(.)', r'\1', pattern)


def inside(uri: str, folder: str) -> bool:
  return uri == folder or uri.startswith(folder + '/')


class Inputs(NamedTuple):
  """What a run matched, as its summary records it."""
  patterns: FrozenSet[str]  # --input as given, without a trailing '/'
  literals: Tuple[str, ...]  # those without a glob, unescaped: a file, or a folder and all in it
  reach: Tuple[Tuple[str, str], ...]  # (pattern, the literal or the folder before its first glob)
  manifests: FrozenSet[str]
  excludes: FrozenSet[str]

  @classmethod
  def of(cls, summary) -> 'Inputs':
    patterns = [p.rstrip('/') for p in summary.input]
    reach, literals = [], []
    for pattern in patterns:
      glob = first_glob(pattern)
      fixed = unescape(pattern[:glob])
      if glob == len(pattern):
        literals.append(fixed)
      reach.append((pattern, fixed if glob == len(pattern) else fixed[:fixed.rfind('/')]))
    return cls(frozenset(patterns), tuple(literals), tuple(reach),
               frozenset(summary.input_manifest), frozenset(summary.exclude))

  def covers(self, earlier: 'Inputs', uri: str) -> bool:
    """Whether a run with these inputs would have matched `uri`, which a run with `earlier`
    inputs matched. Exact and cheap, so it says no when unsure: not if this run excludes what the
    earlier did not; yes if `uri` is inside an input of this run without a glob (the file itself,
    or a folder above it); else yes if every input of the earlier run that could have matched
    `uri` (the file or a folder above it, a glob whose folder is above it, any manifest) is
    given here again, the same. Runs that recorded no inputs cover nothing."""
    if not self.excludes <= earlier.excludes:
      return False
    if any(inside(uri, literal) for literal in self.literals):
      return True
    could = [pattern for pattern, base in earlier.reach if inside(uri, base)]
    return bool(could or earlier.manifests) and earlier.manifests <= self.manifests and all(
        pattern in self.patterns for pattern in could)

  def covers_all(self, earlier: 'Inputs') -> bool:
    """Whether these inputs would have matched every file the `earlier` inputs could match: the
    same rule as `covers`, for all URIs at once. A run with these inputs supersedes the earlier
    run's state; a narrower one (a folder, a delta manifest) does not."""
    if not self.excludes <= earlier.excludes or not earlier.manifests <= self.manifests:
      return False
    if not earlier.patterns and not earlier.manifests:
      return False
    return all(pattern in self.patterns or any(inside(base, literal) for literal in self.literals)
               for pattern, base in earlier.reach)
