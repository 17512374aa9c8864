"""Keeping a collection small and fast: the format's own compaction (fewer, larger fragments,
deletion files folded in; no row's identity changes, so followers have nothing to apply), cleanup
of versions no one needs, and the history of versions with the run that made each."""

import datetime
from typing import List, NamedTuple, Optional

from collection.table import CommitRecord, Collection, open_collection


class Compacted(NamedTuple):
  version_before: int
  version: int
  fragments_removed: int
  fragments_added: int


class Cleaned(NamedTuple):
  versions_removed: int
  bytes_removed: int
  oldest_kept: int


class HistoryEntry(NamedTuple):
  version: int
  committed_at: datetime.datetime  # UTC
  kind: str  # create, night, import, or what the format did (compaction, index)
  run: Optional[str]
  added: int
  removed: int
  rows: int


def compact(uri: str, target_rows_per_fragment: int = 1 << 20) -> Compacted:
  """Rewrites small fragments and those with many deleted rows into larger ones, and brings the
  URI index up to date. Readers of older versions keep reading them until they are cleaned up."""
  collection = open_collection(uri)
  before = collection.version
  metrics = collection.dataset.optimize.compact_files(
      target_rows_per_fragment=target_rows_per_fragment)
  dataset = collection.latest().dataset
  dataset.optimize.optimize_indices()
  return Compacted(before, collection.latest().version, metrics.fragments_removed,
                   metrics.fragments_added)


def cleanup(uri: str, older_than: datetime.timedelta) -> Cleaned:
  """Removes the versions older than `older_than` (never the latest) and the files only they
  name: what time travel and a follower that has not synced since can no longer read."""
  collection = open_collection(uri)
  stats = collection.dataset.cleanup_old_versions(older_than=older_than,
                                                  error_if_tagged_old_versions=False)
  oldest = min(version['version'] for version in collection.latest().dataset.versions())
  return Cleaned(stats.old_versions, stats.bytes_removed, oldest)


def _kind(collection: Collection, version: int, record: Optional[CommitRecord]) -> str:
  if record is not None:
    return record.kind
  transaction = collection.dataset.read_transaction(version)
  operation = type(getattr(transaction, 'operation', None)).__name__
  return {'Rewrite': 'compaction', 'CreateIndex': 'index'}.get(operation, 'maintenance')


def history(uri: str) -> List[HistoryEntry]:
  """Every version still kept, oldest first."""
  collection = open_collection(uri)
  entries = []
  for version in collection.dataset.versions():
    number = version['version']
    record = collection.record(number)
    entries.append(HistoryEntry(
        number, version['timestamp'].replace(tzinfo=datetime.timezone.utc),
        _kind(collection, number, record), record.run if record else None,
        record.added if record else 0, record.removed if record else 0,
        int(version['metadata'].get('total_rows', 0))))
  return entries
