"""Between matching and reading: skip what the collection (--collection) already holds, and say
which of its rows tonight's commit removes.

The collection is the state: per image URI, the row of its current version, or none. A night
reads only its STATE_COLUMNS (no vectors) at the version it read at launch, one fragment per
worker, filters them as Arrow batches, and joins them with tonight's listing in one shuffle on
the URI, which also keeps one of each URI the inputs named more than once. Per URI:

- listed, held in the same version by this model and recipe: skipped, not read;
- listed, held otherwise (changed bytes, another model or recipe): embedded, and the old row
  removed whatever the new version's fate (a new version that cannot be decoded has no vector);
- listed, not held: embedded;
- listed but its size unknown (a file the listing could not look up), held: kept, skipped;
- held, not listed: removed when tonight's inputs would have matched it (it is gone), unless it
  is under a folder the listing could not list; kept otherwise (a narrower night, a manifest
  that names some files, a file that could not be looked up).

A file is unchanged when its size and content identity match the held version (GCS crc32c, S3
ETag: a metadata edit or a storage-class rewrite changes neither); where the store gives no
content identity (local disks), size and modification time must match.

Shards (tar, Parquet, TFRecord: storage/members.py) are decided whole: the collection's member
rows (`shard.tar#000123.jpg`) are keyed by their shard's URI and carry their shard's content
identity and modification time. A listed shard whose every held member has this model, recipe
and shard version is skipped without being read (its members counted as skipped); a changed
shard is read again and all its held members removed, so its current members are added anew.
"""

import re
from typing import Dict, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from collection import STATE_COLUMNS, open_collection
from collection.table import ROW_ID
from run_format.patterns import has_glob, unescape
from storage.members import split_member_uri
from transforms.listing import FileRef, exclude_regexes, plan_listing
from transforms.provenance import Provenance

METRICS_NAMESPACE = 'incremental'


class Held(NamedTuple):
  """A row the collection holds: where it is (for its removal), and which version of the file
  (of a shard member: its shard's modification time and content identity, its own size)."""
  fragment_id: int
  row_id: int
  size_bytes: Optional[int]
  last_modified: Optional[int]  # microseconds since the Unix epoch, UTC
  content_id: Optional[str]
  current: bool  # made by this night's model and recipe
  member: Optional[str] = None  # a shard member's URI: the row is keyed by its shard's


class SkippedFile(NamedTuple):
  ref: object  # the FileRef of this night's listing: the version the collection holds


class NightState(NamedTuple):
  """What a night needs of its collection, known at launch."""
  uri: str
  read_version: int
  fragment_ids: Sequence[int]
  storage_options: Dict[str, str]


class _ReadHeld(beam.DoFn):
  """One fragment of the collection at the night's version -> (uri, Held) of each row."""

  def __init__(self, state: NightState, provenance: Provenance):
    self._state = state
    self._provenance = provenance
    self._rows = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'collection_rows_read')

  def setup(self):
    self._collection = open_collection(self._state.uri, self._state.read_version,
                                       options=self._state.storage_options)

  def process(self, fragment_id: int):
    for batch in self._collection.fragment_batches(fragment_id, STATE_COLUMNS):
      self._rows.inc(batch.num_rows)
      current = pc.fill_null(pc.and_(pc.equal(batch.column('model'), self._provenance.model),
                                     pc.equal(batch.column('recipe'), self._provenance.recipe)),
                             False)
      columns = [batch.column('uri'), batch.column(ROW_ID), batch.column('size_bytes'),
                 batch.column('last_modified').cast(pa.int64()), batch.column('content_id'),
                 current]
      for uri, row_id, size, modified, content, mine in zip(*(c.to_pylist() for c in columns)):
        shard = split_member_uri(uri)
        if shard is None:
          yield uri, Held(fragment_id, row_id, size, modified, content, mine)
        else:
          yield shard[0], Held(fragment_id, row_id, size, modified, content, mine, uri)


def _same_version(ref, held: Held) -> bool:
  if not held.current or ref.size_bytes is None or ref.size_bytes != held.size_bytes:
    return False
  return _same_identity(ref, held)


def _same_identity(ref, held: Held) -> bool:
  if ref.content_id and held.content_id:
    return ref.content_id == held.content_id
  return ref.last_modified == held.last_modified


def _unchanged_shard(ref, held: Sequence[Held]) -> bool:
  """A listed shard whose members the collection holds, all made with this model and recipe from
  this version of the shard (its content identity, else its modification time): not read."""
  return bool(held) and all(row.member and row.current and _same_identity(ref, row)
                            for row in held)


class Coverage(NamedTuple):
  """Which URIs tonight's folder and glob inputs would have matched, had they existed: the
  listing's own rules (transforms/listing.py plan_listing), so a held URI that is not listed is
  gone, not merely left out. Manifests cover nothing beyond the URIs they name: a manifest may
  name only some files (a chunk of a backfill, a delta), so what it does not name is kept."""
  patterns: Sequence[str]
  excludes: Sequence[str]
  include_all_files: bool

  def prefixes(self) -> List[str]:
    """Where each input's listing starts: a listing failure there names this prefix."""
    return [plan_listing(pattern).prefix for pattern in self.patterns]

  def matcher(self):
    excluded = [re.compile(regex) for regex in exclude_regexes(self.excludes)]
    files = {unescape(pattern) for pattern in self.patterns if not has_glob(pattern)}
    listings = [plan_listing(pattern, (), self.include_all_files) for pattern in self.patterns]
    kept = [(re.compile(listing.regex), listing.root,
             re.compile(listing.skip_names) if listing.skip_names else None)
            for listing in listings]

    def covers(uri: str) -> bool:
      if any(regex.fullmatch(uri) for regex in excluded):
        return False
      return uri in files or any(
          regex.fullmatch(uri) and not (skip and skip.fullmatch(uri[len(root):]))
          for regex, root, skip in kept)
    return covers


def unlisted_folders(failures, prefixes: Sequence[str]):
  """Listing failures -> the folders (ending with '/') and input prefixes that could not be
  listed; other failures (a file that could not be looked up, a bad name) are not folders."""
  prefixes = frozenset(prefixes)
  return failures | 'UnlistedFolders' >> beam.FlatMap(
      lambda failure: [failure.uri] if failure.uri.endswith('/') or failure.uri in prefixes
      else [])


class _Decide(beam.DoFn):
  """One URI: tonight's listing of it (once, however often it was named) against the rows the
  collection holds for it."""

  def __init__(self, coverage: Coverage):
    self._coverage = coverage
    self._skipped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'skipped')
    self._removed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'removed')
    self._kept = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'kept_unlisted')

  def setup(self):
    self._covers = self._coverage.matcher()

  def process(self, joined, unlisted: Sequence[str]):
    uri, grouped = joined
    ref = next(iter(grouped['listed']), None)
    held = list(grouped['held'])
    if ref is not None and ref.size_bytes is None and held:  # listed, but not stated: unknown
      self._skipped.inc()
      yield beam.pvalue.TaggedOutput('skipped', SkippedFile(ref))
      return
    if ref is not None and any(row.member for row in held):
      yield from self._shard(ref, held)
      return
    if ref is not None:
      same = next((row for row in held if _same_version(ref, row)), None)
      if same is None:
        yield ref
      else:
        self._skipped.inc()
        yield beam.pvalue.TaggedOutput('skipped', SkippedFile(ref))
      gone = [row for row in held if row is not same]
    elif held and not any(True for _ in grouped['unlisted']) and self._covers(uri) and \
        not any(uri.startswith(folder) for folder in unlisted):
      gone = held
    else:
      self._kept.inc(len(held))
      gone = []
    yield from self._remove(gone)

  def _shard(self, ref, held: Sequence[Held]):
    """A listed shard: skipped whole, each held member counted as skipped, when unchanged; else
    read again, and every member row it had removed (what it holds now is embedded anew)."""
    if _unchanged_shard(ref, held):
      self._skipped.inc(len(held))
      for row in held:
        yield beam.pvalue.TaggedOutput('skipped', SkippedFile(
            FileRef(row.member, row.size_bytes, row.last_modified, row.content_id)))
      return
    yield ref
    yield from self._remove(held)

  def _remove(self, rows: Sequence[Held]):
    for row in rows:
      self._removed.inc()
      yield beam.pvalue.TaggedOutput('removed', (row.fragment_id, row.row_id))


class SkipHeld(beam.PTransform):
  """{'refs': FileRef (repeats allowed), 'failures': the listing's Failures, 'not_listed': URIs
  named but not listed (skipped by name)} -> FileRef to embed (tag 'new'), SkippedFile
  ('skipped') and the (fragment id, row id) of each held row tonight's commit removes
  ('removed'), each URI once."""

  def __init__(self, state: NightState, provenance: Provenance, coverage: Coverage):
    super().__init__()
    self._state = state
    self._provenance = provenance
    self._coverage = coverage

  def expand(self, parts):
    pipeline = parts['refs'].pipeline
    held = (pipeline
            | 'Fragments' >> beam.Create(list(self._state.fragment_ids))
            | 'SpreadFragments' >> beam.Reshuffle()
            | 'ReadHeld' >> beam.ParDo(_ReadHeld(self._state, self._provenance)))
    listed = parts['refs'] | 'KeyByUri' >> beam.Map(lambda ref: (ref.uri, ref))
    failures = parts['failures']
    # A file named but not stated, or left out by its name, changes nothing tonight.
    unlisted_files = ((failures | 'FailedUris' >> beam.Map(lambda failure: failure.uri),
                       parts['not_listed'])
                      | 'NotListed' >> beam.Flatten()
                      | 'KeyNotListed' >> beam.Map(lambda uri: (uri, None)))
    folders = unlisted_folders(failures, self._coverage.prefixes())
    return ({'listed': listed, 'held': held, 'unlisted': unlisted_files}
            | 'JoinOnUri' >> beam.CoGroupByKey()
            | 'Decide' >> beam.ParDo(_Decide(self._coverage), beam.pvalue.AsList(folders))
            .with_outputs('skipped', 'removed', main='new'))
