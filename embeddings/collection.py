"""Which run holds each URI's vector, over many finished runs: decided from the runs' indexes
(a few small columns of `index-*.parquet`, never a vector) before any embedding shard is read.

Runs are of one model and newest first (by `finished_at`). Per URI:
- the newest run whose index has a row for it decides: `embedded`, that run's vector; a failure
  (`read`, `decode`, `inference`), no vector; `skipped`, the vector of the newest older run that
  embedded the same file version (same recipe, size, and content identity where both rows have
  one, else modification time: what --incremental_from compares), and none if that version was
  undecodable or no run given embedded it;
- the URI is gone (deleted, renamed, left out of the manifest) when a run newer than the deciding
  one covered it (`covers`): that run's inputs would have matched the file, and did not;
- with `history`, each URI's newest embedding, whatever later runs found.
"""

import logging
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

from embeddings import storage
from run_format import DECODE, EMBEDDED, READ, SKIPPED
from run_format.patterns import first_glob, unescape

_LOG = logging.getLogger(__name__)
_VERSION_COLUMNS = ('size_bytes', 'last_modified', 'content_id', 'recipe')
_BATCH_ROWS = 65_536


def _inside(uri: str, folder: str) -> bool:
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
    if any(_inside(uri, literal) for literal in self.literals):
      return True
    could = [pattern for pattern, base in earlier.reach if _inside(uri, base)]
    return bool(could or earlier.manifests) and earlier.manifests <= self.manifests and all(
        pattern in self.patterns for pattern in could)


# A file version as an index row names it: (size_bytes, last_modified as microseconds,
# content_id, recipe).
_Version = Tuple[Optional[int], Optional[int], Optional[str], Optional[str]]


def _same_file(skipped: _Version, done: _Version) -> bool:
  """The test --incremental_from applies: same recipe and size, and the same content identity
  where both rows have one, else the same modification time."""
  if skipped[0] is None:
    return False
  if skipped == done:
    return True
  if skipped[3] != done[3] or skipped[0] != done[0]:
    return False
  if skipped[2] and done[2]:
    return skipped[2] == done[2]
  return skipped[1] == done[1]


class _Batch:
  """Index rows: URIs and outcomes as lists; the rows' file versions built only when asked for."""

  def __init__(self, batch):
    self.uris = batch.column('uri').to_pylist()
    self.outcomes = batch.column('outcome').to_pylist()
    self._batch = batch
    self._versions: Optional[List[_Version]] = None

  def version(self, row: int) -> _Version:
    if self._versions is None:
      import pyarrow as pa
      columns = []
      for name in _VERSION_COLUMNS:
        if name not in self._batch.schema.names:
          columns.append([None] * self._batch.num_rows)
        else:
          column = self._batch.column(name)
          columns.append((column.cast(pa.int64()) if name == 'last_modified' else
                          column).to_pylist())
      self._versions = list(zip(*columns))
    return self._versions[row]


def _index_batches(run) -> Iterator[_Batch]:
  """The run's index rows, reading only the columns that say which file and what became of it."""
  import pyarrow.parquet as pq
  for info in storage.match(run.index_glob):
    with storage.open_file(info.path) as f:
      parquet = pq.ParquetFile(f)
      present = [c for c in ('uri', 'outcome') + _VERSION_COLUMNS
                 if c in parquet.schema_arrow.names]
      for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=present):
        yield _Batch(batch)


def _listing_failed(uri: str, folders: Set[str]) -> bool:
  """Whether `uri` is under a folder that a run could not list (a `read` failure row)."""
  while '/' in uri:
    uri = uri.rsplit('/', 1)[0]
    if uri in folders:
      return True
  return False


def vector_sources(runs: Sequence, history: bool = False) -> Dict[str, Set[str]]:
  """Run directory -> the URIs whose vector is that run's, by the rule above. `runs`: Run
  tuples of embeddings.runs, newest first."""
  sources: Dict[str, Set[str]] = {run.path: set() for run in runs}
  inputs = [Inputs.of(run.summary) for run in runs]
  unlisted: List[Set[str]] = []  # per run read so far: the folders its listing failed on
  decided: Set[str] = set()
  waiting: Dict[str, _Version] = {}  # skipped by a newer run: the version an older one embedded
  for number, run in enumerate(runs):
    failed_folders = set()
    for batch in _index_batches(run):
      for row, (uri, outcome) in enumerate(zip(batch.uris, batch.outcomes)):
        if outcome == READ:
          failed_folders.add(uri)
        if uri in decided:
          continue
        if history:
          if outcome == EMBEDDED:
            decided.add(uri)
            sources[run.path].add(uri)
        elif uri in waiting:
          if outcome in (EMBEDDED, DECODE) and _same_file(waiting[uri], batch.version(row)):
            del waiting[uri]
            decided.add(uri)
            if outcome == EMBEDDED:
              sources[run.path].add(uri)
        elif number and any(inputs[newer].covers(inputs[number], uri) and
                            not _listing_failed(uri, unlisted[newer]) for newer in range(number)):
          decided.add(uri)  # gone: a newer run would have matched it
        elif outcome == SKIPPED:
          waiting[uri] = batch.version(row)
        else:
          decided.add(uri)
          if outcome == EMBEDDED:
            sources[run.path].add(uri)
    unlisted.append(failed_folders)
  if waiting:
    _LOG.warning('%d skipped file(s) (e.g. %s) have no vector: the runs that embedded them are not '
                 'among those given (give the runs their --incremental_from named too)',
                 len(waiting), min(waiting))
  return sources
