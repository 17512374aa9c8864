"""Which run holds each URI's vector, over many finished runs: decided from the runs' indexes
(a few small columns of `index-*.parquet`, never a vector) before any embedding shard is read.

Runs are of one model, finished with outcome `finished` (storage.run_dirs.find_runs leaves out the
others), and newest first (by `finished_at`). Per URI:
- the newest run whose index has a row for it decides: `embedded`, that run's vector; a failure
  (`read`, `decode`, `inference`), no vector; `skipped` with `done_outcome` decode, no vector;
  `skipped` with a `vector_run` among the runs given, that run's vector; else (an index older than
  `vector_run`, or its run not given: deleted, moved) the vector of the newest older run that
  embedded the same file version (same recipe, size, and content identity where both rows have
  one, else modification time: what --incremental_from compares), and none if that version was
  undecodable or no run given embedded it (counted in one warning: the next night re-embeds them);
- the URI is gone (deleted, renamed, left out of the manifest) when a run newer than the deciding
  one covered it (`covers`): that run's inputs would have matched the file, and did not;
- with `history`, each URI's newest embedding, whatever later runs found.

`SourceRule` is that rule for one row at a time, shared by `vector_sources` (streaming, newest run
first, in one process: `load`) and the Beam jobs (jobs/collection_sources.py, grouped by URI: the
compaction, the export, the duplicates by clustering).
"""

import logging
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import storage
from run_format import DECODE, EMBEDDED, READ, SKIPPED
from run_format.patterns import Inputs

_LOG = logging.getLogger(__name__)
_VERSION_COLUMNS = ('size_bytes', 'last_modified', 'content_id', 'recipe')
# What the rule reads of an index.
_RULE_COLUMNS = ('uri', 'outcome', 'done_outcome', 'vector_run') + _VERSION_COLUMNS
_BATCH_ROWS = 65_536


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


def _column(batch, name: str) -> list:
  """A column as a list; nulls for a column an older index does not have."""
  if name not in batch.schema.names:
    return [None] * batch.num_rows
  return batch.column(name).to_pylist()


class _Batch:
  """Index rows: URIs, outcomes and where a skipped row's vector is, as lists; the rows' file
  versions built only when asked for."""

  def __init__(self, batch):
    self.uris = batch.column('uri').to_pylist()
    self.outcomes = batch.column('outcome').to_pylist()
    self.done_outcomes = _column(batch, 'done_outcome')
    self.vector_runs = _column(batch, 'vector_run')
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
      present = [c for c in _RULE_COLUMNS if c in parquet.schema_arrow.names]
      for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=present):
        yield _Batch(batch)


def _listing_failed(uri: str, folders: Set[str]) -> bool:
  """Whether `uri` is under a folder that a run could not list (a `read` failure row)."""
  while '/' in uri:
    uri = uri.rsplit('/', 1)[0]
    if uri in folders:
      return True
  return False


UNDECIDED = object()  # SourceRule.decide: look at older runs' rows
GONE = object()  # SourceRule.decide: a newer run would have matched the file and did not


class SourceRule:
  """The rule above for one index row at a time. `unlisted[n]`: the folders run n could not list
  (its `read` rows); `decide` needs those of the runs newer than the row's."""

  def __init__(self, runs: Sequence, history: bool = False,
               unlisted: Optional[List[Set[str]]] = None):
    self.history = history
    self.unlisted = [] if unlisted is None else unlisted
    self._inputs = [Inputs.of(run.summary) for run in runs]
    self._numbers = {run.path.rstrip('/'): number for number, run in enumerate(runs)}

  def decide(self, uri: str, number: int, outcome: str, done_outcome: Optional[str],
             vector_run: Optional[str], version: Callable[[], '_Version'],
             waiting: Dict[str, '_Version']):
    """Run `number`'s row for `uri`, the URI undecided by newer runs: the number of the run whose
    vector it is, None for no vector (a failure), GONE, or UNDECIDED. `waiting` holds the version a newer run
    skipped, for URIs whose vector an older run must have; `version()` gives this row's."""
    if self.history:
      return number if outcome == EMBEDDED else UNDECIDED
    if uri in waiting:
      if outcome in (EMBEDDED, DECODE) and _same_file(waiting[uri], version()):
        del waiting[uri]
        return number if outcome == EMBEDDED else None
      return UNDECIDED
    if number and any(self._inputs[newer].covers(self._inputs[number], uri) and
                      not _listing_failed(uri, self.unlisted[newer]) for newer in range(number)):
      return GONE
    if outcome != SKIPPED:
      return number if outcome == EMBEDDED else None
    if done_outcome == DECODE:
      return None
    source = self._numbers.get((vector_run or '').rstrip('/'))
    if source is not None and source > number:
      return source
    waiting[uri] = version()
    return UNDECIDED


def warn_of_missing(count: int, example: Optional[str] = None) -> None:
  """Says that `count` skipped files have no vector among the runs given (here, or counted by a
  Beam job's workers: jobs/collection_sources.py)."""
  if count:
    _LOG.warning('%d skipped file(s)%s have no vector: the runs that embedded them (their '
                 'index\'s vector_run) are not among those given, deleted or not named; the next '
                 'night re-embeds them, or give those runs too', count,
                 f' (e.g. {example})' if example else '')


def vector_sources(runs: Sequence, history: bool = False) -> Dict[str, Set[str]]:
  """Run directory -> the URIs whose vector is that run's, by the rule above. `runs`: Run
  tuples of embeddings.runs, newest first."""
  paths = [run.path for run in runs]
  sources: Dict[str, Set[str]] = {path: set() for path in paths}
  rule = SourceRule(runs, history)
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
        source = rule.decide(uri, number, outcome, batch.done_outcomes[row],
                             batch.vector_runs[row], lambda: batch.version(row), waiting)
        if source is UNDECIDED:
          continue
        decided.add(uri)
        if source is not None and source is not GONE:
          sources[paths[source]].add(uri)
    rule.unlisted.append(failed_folders)
  warn_of_missing(len(waiting), min(waiting, default=None))
  return sources
