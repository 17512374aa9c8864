"""One night's commit: the workers write its new rows as fragments (files no version names yet),
and the job's last step makes them visible, and removes the rows they replace or that are gone,
in one commit. Until then readers see the version before; a failed night leaves only unnamed
files, which `collection cleanup` removes.

Two nights never commit over each other: a night that finds another night's commit after the
version it read (the one it skipped against) commits nothing and says which run made it; a
compaction or index commit in between is not a conflict (row ids survive compaction, so the
rows to remove are found again by id).
"""

import json
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import pyarrow as pa

from collection.table import (CommitRecord, CollectionError, _dataset, lance_uri,
                              row_id_predicate, storage_options)

_COMMIT_ATTEMPTS = 5
_NIGHT_KINDS = ('night', 'import')


class ConcurrentNightError(CollectionError):
  """Another night or import committed after the version this night read: nothing committed."""


class NightChanges(NamedTuple):
  """What a night commits: `fragments`, the new rows' fragments (Lance FragmentMetadata as JSON,
  written by the workers); `removed`, (fragment id at `read_version`, row id) of each row that a
  new version replaces, that is gone from the inputs, or whose new version failed."""
  run: str
  read_version: int
  fragments: Sequence[str]
  removed: Sequence[Tuple[int, int]]


def write_fragment(uri: str, rows: pa.Table, options: Dict[str, str]) -> List[str]:
  """Writes rows of the collection's schema as new fragments of the collection at `uri`
  (visible once committed); their metadata as JSON, for the commit. Runs on workers."""
  from lance.fragment import write_fragments
  written = write_fragments(rows, lance_uri(uri), schema=rows.schema,
                            enable_stable_row_ids=True, data_storage_version='stable',
                            storage_options=options or None)
  return [json.dumps(fragment.to_json()) for fragment in written]


def _others_since(dataset, read_version: int) -> List[Tuple[int, CommitRecord]]:
  """The nights and imports committed after `read_version`."""
  if dataset.version == read_version:
    return []
  found = []
  for version in range(read_version + 1, dataset.version + 1):
    try:
      transaction = dataset.read_transaction(version)
    except (OSError, ValueError) as exc:  # cleaned up while the night ran: unknown changes
      raise ConcurrentNightError(
          f'version {version} of the collection, committed after the version this night read '
          f'({read_version}), was cleaned up while it ran, so what it changed is unknown: this '
          'night commits nothing; run it again') from exc
    record = CommitRecord.from_message(
        (transaction.transaction_properties or {}).get('__lance_commit_message')
        if transaction is not None else None)
    if record is not None and record.kind in _NIGHT_KINDS:
      found.append((version, record))
  return found


def _deletions(dataset, removed: Iterable[Tuple[int, int]]):
  """(fragments with new deletion files, ids of fragments left empty) on `dataset`'s version. A
  row whose fragment a compaction rewrote since is looked for, by its stable id, everywhere."""
  fragments = {fragment.fragment_id: fragment for fragment in dataset.get_fragments()}
  wanted: Dict[int, Set[int]] = defaultdict(set)
  moved: Set[int] = set()
  for fragment_id, row_id in removed:
    (wanted[fragment_id] if fragment_id in fragments else moved).add(row_id)
  if moved:
    for fragment_id in fragments:
      wanted[fragment_id] |= moved
  updated, emptied = [], []
  for fragment_id, row_ids in sorted(wanted.items()):
    fragment = fragments[fragment_id]
    before = fragment.metadata.num_deletions
    changed = fragment.delete(row_id_predicate(sorted(row_ids)))
    if changed is None:
      emptied.append(fragment_id)
    elif changed.num_deletions != before:
      updated.append(changed)
  return updated, emptied


def commit_night(uri: str, night: NightChanges, kind: str = 'night',
                 options: Optional[Dict[str, str]] = None) -> int:
  """Commits the night to the collection at `uri`; its new version. ConcurrentNightError if
  another night committed after the one this night read. `options`: the store options where
  set_store_options was not called (a worker: the job's last step)."""
  import lance
  from lance.commit import CommitConflictError
  from lance.fragment import FragmentMetadata
  new_fragments = [FragmentMetadata.from_json(text) for text in night.fragments]
  record = CommitRecord(kind, night.run, sum(f.num_rows for f in new_fragments),
                        len(night.removed))
  options = storage_options(uri) if options is None else options
  for attempt in range(_COMMIT_ATTEMPTS):
    dataset = _dataset(uri, options=options)
    others = _others_since(dataset, night.read_version)
    if others:
      version, other = others[0]
      raise ConcurrentNightError(
          f'{other.run or "another writer"} committed version {version} to {uri} after this '
          f'night read version {night.read_version}: this night commits nothing (its run '
          'directory keeps its vectors); run it again, and it skips what that one embedded')
    updated, emptied = _deletions(dataset, night.removed)
    operation = lance.LanceOperation.Update(removed_fragment_ids=emptied,
                                            updated_fragments=updated,
                                            new_fragments=new_fragments)
    try:
      committed = lance.LanceDataset.commit(lance_uri(uri), operation,
                                            read_version=dataset.version,
                                            storage_options=options or None,
                                            commit_message=record.message(), max_retries=0)
    except CommitConflictError:
      if attempt == _COMMIT_ATTEMPTS - 1:
        raise
      continue
    return committed.version
  raise AssertionError('unreachable')
