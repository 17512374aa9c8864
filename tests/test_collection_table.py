"""The collection's table (collection/): a night's commit, snapshots, the changes a follower reads,
concurrency, compaction and cleanup, on local disk and through the S3 protocol."""

import datetime

import numpy as np
import pyarrow as pa
import pytest

import collection
from collection.table import schema

MODEL, SIZE, DTYPE = 'builtin:test', 8, 'float16'


def _rows(uris, value):
  """Rows of the collection's schema: each URI's vector all `value`, its size `value`."""
  table_schema = schema(MODEL, SIZE, DTYPE)
  count = len(uris)
  columns = {field.name: pa.nulls(count, field.type) for field in table_schema}
  columns['uri'] = pa.array(uris, pa.string())
  columns['size_bytes'] = pa.array([value] * count, pa.int64())
  columns['model'] = pa.array([MODEL] * count)
  columns['embedding'] = pa.FixedSizeListArray.from_arrays(
      pa.array(np.full(count * SIZE, value, np.float16)), SIZE)
  return pa.table(columns, schema=table_schema)


def _night(uri, run, read_version, new_uris=(), value=1, removed=()):
  fragments = collection.write_fragment(uri, _rows(list(new_uris), value),
                                        collection.storage_options(uri)) if new_uris else []
  return collection.commit_night(uri, collection.NightChanges(run, read_version, fragments,
                                                              list(removed)))


def _state(coll):
  """URI -> (size, row id) of a snapshot."""
  return {row['uri']: (row['size_bytes'], row['_rowid'])
          for batch in coll.batches(['uri', 'size_bytes'], with_row_id=True)
          for row in batch.to_pylist()}


def _removal(coll, uris):
  """(fragment id, row id) of these URIs' rows, as a night's skip stage finds them."""
  found = []
  for fragment_id in coll.fragment_ids():
    for batch in coll.fragment_batches(fragment_id, ['uri']):
      found += [(fragment_id, row['_rowid']) for row in batch.to_pylist() if row['uri'] in uris]
  return found


@pytest.fixture
def nights(tmp_path):
  """A collection after two nights: 1 adds u0..u9; 2 replaces u1, removes u2, adds u10."""
  uri = str(tmp_path / 'collection')
  created = collection.create(uri, MODEL, SIZE, DTYPE)
  first = _night(uri, 'night1', created.version, [f'u{i}' for i in range(10)], 1)
  second = _night(uri, 'night2', first, ['u1', 'u10'], 2,
                  _removal(collection.open_collection(uri), {'u1', 'u2'}))
  return uri, first, second


def test_a_night_is_one_commit_and_every_snapshot_stays_readable(nights):
  uri, first, second = nights
  latest = collection.open_collection(uri)
  assert latest.version == second
  state = _state(latest)
  assert sorted(state) == sorted([f'u{i}' for i in range(11) if i != 2])
  assert state['u1'][0] == 2 and state['u3'][0] == 1
  before = _state(collection.open_collection(uri, version=first))
  assert sorted(before) == [f'u{i}' for i in range(10)] and before['u1'][0] == 1
  assert latest.record() == collection.CommitRecord('night', 'night2', 2, 2)


def test_a_follower_reads_only_the_changes(nights):
  uri, first, second = nights
  latest = collection.open_collection(uri)
  changes = latest.changes(first)
  inserted = [row for batch in changes.inserted(['uri']) for row in batch.to_pylist()]
  assert sorted(row['uri'] for row in inserted) == ['u1', 'u10']
  old = _state(collection.open_collection(uri, version=first))
  deleted = sorted(i for ids in changes.deleted_row_ids() for i in ids.to_pylist())
  assert deleted == sorted([old['u1'][1], old['u2'][1]])
  assert not list(latest.changes(second).inserted(['uri']))


def test_rows_by_id_and_by_uri(nights):
  uri, _, _ = nights
  latest = collection.open_collection(uri)
  state = _state(latest)
  taken = latest.take([state['u5'][1], state['u1'][1]], ['uri', 'embedding'])
  assert taken.column('uri').to_pylist() == ['u5', 'u1']
  assert np.stack(taken.column('embedding').to_numpy(zero_copy_only=False))[:, 0].tolist() == \
      [1, 2]
  found = latest.lookup(['u1', 'u7', 'absent'], ['size_bytes'])
  assert sorted(found.column('uri').to_pylist()) == ['u1', 'u7']


def test_a_second_night_on_the_same_version_commits_nothing_and_names_the_first(nights):
  uri, first, second = nights
  with pytest.raises(collection.ConcurrentNightError, match='night2 committed version'):
    _night(uri, 'late', first, ['u99'], 3)
  assert collection.open_collection(uri).version == second
  assert 'u99' not in _state(collection.open_collection(uri))


def test_compaction_keeps_every_row_id_and_a_night_after_it_still_removes_by_id(nights):
  uri, _, second = nights
  before = _state(collection.open_collection(uri))
  compacted = collection.compact(uri)
  assert compacted.fragments_removed >= 2 and compacted.version > second
  after = collection.open_collection(uri)
  assert _state(after) == before
  assert not list(after.changes(second).inserted(['uri']))
  # A night that read the version before the compaction names a fragment that is gone.
  stale = [(0, before['u3'][1])]
  _night(uri, 'night3', after.version, removed=stale)
  assert 'u3' not in _state(collection.open_collection(uri))


def test_defect_6_compaction_bounds_fragments_by_rows_whatever_the_newest_night(tmp_path):
  """Compaction of runs sized its shards from the newest run alone: after a narrow night, the
  whole collection went to one shard. The table's compaction joins whole fragments towards the
  target rows: every fragment stays under twice the target, whatever the last night held."""
  uri = str(tmp_path / 'collection')
  version = collection.create(uri, MODEL, SIZE, DTYPE).version
  for night, count in enumerate((300,) * 10 + (2,)):
    version = _night(uri, f'night{night}', version, [f'n{night}-{i}' for i in range(count)])
  before = _state(collection.open_collection(uri))
  collection.compact(uri, target_rows_per_fragment=1000)
  rows = [f.count_rows() for f in collection.open_collection(uri).dataset.get_fragments()]
  assert len(rows) >= 2 and max(rows) < 2 * 1000 and sum(rows) == 3002
  assert _state(collection.open_collection(uri)) == before


def test_history_and_cleanup(nights):
  uri, first, _ = nights
  kinds = [(entry.kind, entry.run) for entry in collection.history(uri)]
  assert ('night', 'night1') in kinds and ('night', 'night2') in kinds and kinds[0][0] == 'create'
  cleaned = collection.cleanup(uri, datetime.timedelta(0))
  assert cleaned.versions_removed >= 2
  with pytest.raises(collection.CollectionError, match=f'no version {first}'):
    collection.open_collection(uri, version=first)


def test_one_model_a_collection_and_no_collection_is_named_as_such(tmp_path):
  with pytest.raises(collection.CollectionNotFoundError, match='a night with --collection'):
    collection.open_collection(str(tmp_path / 'none'))
  (tmp_path / 'used').mkdir()
  (tmp_path / 'used' / 'photo.jpg').write_bytes(b'x')
  with pytest.raises(collection.CollectionError, match='holds files but no collection'):
    collection.create(str(tmp_path / 'used'), MODEL, SIZE, DTYPE)
  created = collection.create(str(tmp_path / 'new'), MODEL, SIZE, DTYPE)
  with pytest.raises(collection.CollectionError, match='holds 8-d float16 vectors'):
    collection.table.check_model(created, 'builtin:other', SIZE, DTYPE)


def test_a_store_that_cannot_be_reached_is_one_clear_error():
  collection.set_store_options(['--s3_endpoint_url=http://127.0.0.1:9', '--s3_access_key_id=x',
                                '--s3_secret_access_key=y', '--s3_region_name=us-east-1'])
  try:
    with pytest.raises(collection.CollectionError,
                       match=r'^s3://missing/c cannot be opened: .*127\.0\.0\.1:9'):
      collection.open_collection('s3://missing/c')
  finally:
    collection.set_store_options([])


def test_a_collection_on_an_s3_protocol_store(s3_server):
  s3_server.create_bucket('collections')
  collection.set_store_options(s3_server.options)
  try:
    uri = 's3://collections/nightly'
    created = collection.create(uri, MODEL, SIZE, DTYPE)
    first = _night(uri, 'night1', created.version, ['a', 'b', 'c'], 1)
    _night(uri, 'night2', first, ['b'], 2, _removal(collection.open_collection(uri), {'a', 'b'}))
    assert {uri_: size for uri_, (size, _) in _state(collection.open_collection(uri)).items()} \
        == {'b': 2, 'c': 1}
    assert any(key.startswith('s3://collections/nightly/_versions/')
               for key in s3_server.list('s3://collections/nightly/'))
  finally:
    collection.set_store_options([])


def test_defect_7_only_the_folders_that_could_not_be_listed_reach_every_worker():
  """The night's side input held every `read` failure of every run; now it holds the folders
  (and input prefixes) the listing could not list, whatever the number of failed files."""
  import apache_beam as beam
  from apache_beam.testing.util import assert_that, equal_to

  from transforms.failures import Failure
  from transforms.incremental import unlisted_folders
  failures = [Failure(f'/photos/{n}.png', 'read', 'NotFound', 'gone') for n in range(1000)]
  failures += [Failure('/photos/locked/', 'read', 'PermissionError', 'cannot list'),
               Failure('/inbox', 'read', 'PermissionError', 'cannot list')]
  with beam.Pipeline() as pipeline:
    folders = unlisted_folders(pipeline | beam.Create(failures), ['/inbox'])
    assert_that(folders, equal_to(['/photos/locked/', '/inbox']))
