"""Nights that embed only what is new, against the collection (`embed --collection`): on S3 (the
local server, through the fault proxy, which counts every download and refuses a folder's
listing), and on local disk."""

import os
import shutil
import uuid

import pytest

import collection
from commands.embed import main
from pipeline.launcher import TooManyFailuresError, read_summary, run
from tests.fault_proxy import FaultProxy, FaultRule

TINY = '--model=builtin:pnasnet_tiny'
SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'sample_images')


def _sample(name):
  with open(os.path.join(SAMPLES, name), 'rb') as f:
    return f.read()


def _rows(uri, options=None):
  """The collection's latest version: {uri: (sha256, run)}."""
  found = collection.open_collection(uri, options=options)
  table = found.dataset.to_table(columns=['uri', 'sha256', 'run'])
  return {row['uri']: (row['sha256'], row['run']) for row in table.to_pylist()}


@pytest.fixture(scope='module')
def s3_nights(s3_server, tmp_path_factory):
  """Three nights over s3://BUCKET/photos, the collection in the same bucket, every request
  through the fault proxy: night 1 embeds {a, sub/b, sub/c}; night 2 cannot list sub/ (403);
  night 3 sees sub/b changed, sub/c deleted and d new. Per night: (summary, downloads, version
  and rows of the collection after it)."""
  bucket = f'nights-{uuid.uuid4().hex[:8]}'
  s3_server.create_bucket(bucket)
  photos, coll = f's3://{bucket}/photos', f's3://{bucket}/collection'
  for name, sample in (('a.png', 'astronaut.png'), ('sub/b.png', 'camera.png'),
                       ('sub/c.png', 'chelsea.png')):
    s3_server.upload(f'{photos}/{name}', _sample(sample))
  runs = tmp_path_factory.mktemp('s3_nights')
  nights = []
  with FaultProxy(s3_server.endpoint) as proxy:
    flags = [o.replace(s3_server.endpoint, proxy.url) for o in s3_server.options]
    store = collection.set_store_options(flags)

    def night(number):
      proxy.downloads.clear()
      summary = run([f'--input={photos}', TINY, f'--output={runs}/{number}',
                     f'--collection={coll}'] + flags)
      found = collection.open_collection(coll, options=store)
      nights.append((summary, dict(proxy.downloads), found.version, _rows(coll, store)))

    night(1)
    proxy.rules[:] = [FaultRule(f'^{bucket}/photos/sub/', 403, kinds=['list'])]
    night(2)
    proxy.rules[:] = []
    s3_server.upload(f'{photos}/sub/b.png', _sample('coffee.png'))
    s3_server.client.delete_object(Bucket=bucket, Key='photos/sub/c.png')
    s3_server.upload(f'{photos}/d.png', _sample('rocket.jpg'))
    night(3)
  return photos, nights


def test_the_first_night_creates_the_collection_and_commits_every_vector(s3_nights):
  photos, nights = s3_nights
  summary, downloads, version, rows = nights[0]
  assert (summary['embedded'], summary['skipped'], summary['collection_added']) == (3, 0, 3)
  assert summary['collection_read_version'] < version == summary['collection_version']
  assert sorted(rows) == [f'{photos}/a.png', f'{photos}/sub/b.png', f'{photos}/sub/c.png']
  assert {run for _, run in rows.values()} == {summary['output']}
  assert sorted(count for path, count in downloads.items() if '/photos/' in path) == [1, 1, 1]


def test_defect_1_a_folder_that_cannot_be_listed_changes_nothing_under_it(s3_nights):
  """Defect 1: night 2 cannot list photos/sub/; its rows stay (the collection returns all three),
  and the unchanged a.png is skipped without being read."""
  photos, nights = s3_nights
  summary, downloads, version, rows = nights[1]
  assert (summary['embedded'], summary['skipped'], summary['failed']) == (0, 1, 1)
  assert summary['failed_by_stage']['read'] == 1 and summary['outcome'] == 'finished'
  assert summary['collection_version'] is None and version == nights[0][2]  # nothing to commit
  assert rows == nights[0][3]
  assert not [path for path in downloads if path.endswith('.png')]


def test_a_changed_file_is_replaced_a_deleted_one_removed_a_new_one_added(s3_nights):
  photos, nights = s3_nights
  summary, downloads, version, rows = nights[2]
  assert (summary['embedded'], summary['skipped']) == (2, 1)
  assert (summary['collection_added'], summary['collection_removed']) == (2, 2)
  assert version == summary['collection_version'] == nights[0][2] + 1
  assert sorted(rows) == [f'{photos}/a.png', f'{photos}/d.png', f'{photos}/sub/b.png']
  first = nights[0][3]
  assert rows[f'{photos}/a.png'] == first[f'{photos}/a.png']  # skipped: the same row
  assert rows[f'{photos}/sub/b.png'][0] != first[f'{photos}/sub/b.png'][0]  # new bytes' sha256
  assert rows[f'{photos}/d.png'][1] == summary['output']
  read = sorted(path.rsplit('/photos/', 1)[1] for path in downloads if '/photos/' in path)
  assert read == ['d.png', 'sub/b.png']  # a.png is not read


@pytest.fixture
def photos(tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in ('astronaut.png', 'camera.png', 'chelsea.png'):
    shutil.copy(os.path.join(SAMPLES, name), folder / name)
  return folder


def _night(photos, tmp_path, name, *flags):
  return run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/{name}',
              f'--collection={tmp_path}/collection'] + list(flags))


def test_a_new_version_that_fails_loses_its_stale_vector_and_a_failed_night_commits_nothing(
    photos, tmp_path):
  _night(photos, tmp_path, '1')
  (photos / 'camera.png').write_text('not an image any more')
  second = _night(photos, tmp_path, '2')
  assert (second['embedded'], second['skipped'], second['failed']) == (0, 2, 1)
  assert second['collection_removed'] == 1
  assert sorted(os.path.basename(uri) for uri in _rows(f'{tmp_path}/collection')) == [
      'astronaut.png', 'chelsea.png']
  for name in ('astronaut.png', 'chelsea.png'):  # new versions, none decodable under the limit
    shutil.copy(os.path.join(SAMPLES, 'coffee.png'), photos / name)
  with pytest.raises(TooManyFailuresError):
    _night(photos, tmp_path, '3', '--max_image_pixels=100')
  third = read_summary(f'{tmp_path}/runs/3')
  assert third.outcome == 'too_many_failures' and third.collection_version is None
  after = collection.open_collection(f'{tmp_path}/collection')
  assert after.version == second['collection_version'] and after.num_rows == 2


def test_a_collection_of_another_model_is_refused_before_any_work(photos, tmp_path, capsys):
  _night(photos, tmp_path, '1')
  with pytest.raises(SystemExit) as exit_info:
    main([f'--input={photos}', TINY, '--embedding_dtype=float16',
          f'--output={tmp_path}/runs/2', f'--collection={tmp_path}/collection'])
  assert exit_info.value.code == 2
  assert 'float32 vectors of' in capsys.readouterr().err
  assert not os.path.exists(f'{tmp_path}/runs/2')  # nothing claimed


def test_without_a_collection_a_run_embeds_everything_it_matches(photos, tmp_path):
  first = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1'])
  again = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/2'])
  assert (first['embedded'], again['embedded'], again['skipped']) == (3, 3, 0)
  assert again['collection'] is None and again['collection_version'] is None


def test_a_narrower_night_and_a_manifest_remove_nothing_they_do_not_name(photos, tmp_path):
  """A held URI is gone only when tonight's folder or glob inputs would have listed it."""
  _night(photos, tmp_path, '1')
  manifest = tmp_path / 'one.txt'
  manifest.write_text(f'{photos}/camera.png\n')
  narrow = run([f'--input={photos}/a*.png', f'--input_manifest={manifest}', TINY,
                f'--output={tmp_path}/runs/2', f'--collection={tmp_path}/collection'])
  assert (narrow['skipped'], narrow['collection_version']) == (2, None)
  assert len(_rows(f'{tmp_path}/collection')) == 3


def test_what_a_night_skips_embeds_removes_and_keeps(tmp_path):
  """SkipHeld alone, on a real collection and the local runner: every rule of the join, with
  tonight's inputs /p (a folder) and /r/*.jpg (a glob), --exclude *.md, and /p/sub/ unlistable."""
  import apache_beam as beam
  import pyarrow as pa
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.testing.util import assert_that, equal_to

  from collection.table import schema
  from pipeline.runners import default_runner
  from transforms.failures import Failure
  from transforms.incremental import Coverage, NightState, SkipHeld
  from transforms.listing import FileRef
  from transforms.provenance import Provenance

  held = {  # uri: (size, model): all of recipe 'r', modified at 1 us
      '/p/a.png': (10, 'm'), '/p/b.png': (10, 'm'), '/p/c.png': (10, 'other'),
      '/p/gone.png': (10, 'm'), '/p/sub/x.png': (10, 'm'), '/p/subway.png': (10, 'm'),
      '/p/notes.md': (10, 'm'), '/p/failed.png': (10, 'm'), '/p/unstated.png': (10, 'm'),
      '/q/other.png': (10, 'm'), '/r/x.png': (10, 'm'), '/r/y.jpg': (10, 'm')}
  uri = str(tmp_path / 'collection')
  created = collection.create(uri, 'm', 2, 'float32')
  rows = pa.Table.from_pylist(
      [{'uri': name, 'size_bytes': size, 'last_modified': 1, 'model': model, 'recipe': 'r',
        'embedding': [0.0, 1.0]} for name, (size, model) in held.items()],
      schema=schema('m', 2, 'float32'))
  collection.commit_night(uri, collection.NightChanges(
      'night-1', created.version, collection.write_fragment(uri, rows, {}), []))
  found = collection.open_collection(uri)
  row_uris = dict(zip(*(found.dataset.to_table(columns=['uri'], with_row_id=True)
                        .column(name).to_pylist() for name in ('_rowid', 'uri'))))
  listed = [FileRef('/p/a.png', 10, 1), FileRef('/p/a.png', 10, 1),  # named twice
            FileRef('/p/b.png', 11, 2), FileRef('/p/c.png', 10, 1), FileRef('/p/new.png', 5, 3),
            FileRef('/p/unstated.png', None, None)]
  failures = [Failure('/p/sub/', 'read', 'PermissionError', 'cannot list /p/sub/'),
              Failure('/p/failed.png', 'read', 'NotFound', 'cannot look it up')]
  options = PipelineOptions([])
  with beam.Pipeline(runner=default_runner(options), options=options) as pipeline:
    split = ({'refs': pipeline | 'Refs' >> beam.Create(listed),
              'failures': pipeline | 'Failures' >> beam.Create(failures),
              'not_listed': pipeline | 'ByName' >> beam.Create(['/p/.hidden.png'])}
             | SkipHeld(NightState(uri, found.version, found.fragment_ids(), {}),
                        Provenance('m', 'w', 'r', 'test'),
                        Coverage(['/p', '/r/*.jpg'], ['*.md'], False)))
    assert_that(split.new | 'New' >> beam.Map(lambda ref: ref.uri),
                equal_to(['/p/b.png', '/p/c.png', '/p/new.png']), label='CheckNew')
    assert_that(split.skipped | 'Skipped' >> beam.Map(lambda skipped: skipped.ref.uri),
                equal_to(['/p/a.png', '/p/unstated.png']), label='CheckSkipped')
    assert_that(split.removed | 'Removed' >> beam.Map(lambda pair: row_uris[pair[1]]),
                equal_to(['/p/b.png', '/p/c.png', '/p/gone.png', '/p/subway.png', '/r/y.jpg']),
                label='CheckRemoved')
