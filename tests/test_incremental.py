"""Scheduled runs that embed only what is new: the per-run index, --incremental_from,
--retry_failed and --input_manifest, on local files and the local GCS server."""

import collections
import gzip
import json
import os
import shutil

import duckdb
import pytest

from commands.embed import main
from pipeline.launcher import read_summary, run
from run_format import IncompatibleRunError
from tests.outputs import read_examples, read_failures
from tests.run_writer import rows, write_run, write_summary_of_0_1

TINY = '--model=builtin:pnasnet_tiny'
PHOTOS = ('astronaut.png', 'camera.png', 'chelsea.png', 'coffee.png', 'rocket.jpg',
          'hubble_deep_field.jpg')


def _embedded(output, tmp_path):
  return sorted(os.path.basename(e.features.feature['image/uri'].bytes_list.value[0].decode())
                for e in read_examples(output, tmp_path))


@pytest.fixture
def photos(image_folder, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in PHOTOS[:3]:
    shutil.copy(image_folder / name, folder / name)
  return folder


def test_a_second_run_embeds_only_the_new_half(photos, image_folder, tmp_path):
  first = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1'])
  _as_written_before_skipped_by_name(f'{tmp_path}/runs/1/run_summary.json')
  for name in PHOTOS[3:]:
    shutil.copy(image_folder / name, photos / name)
  (photos / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
  second = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/2',
                f'--incremental_from={tmp_path}/runs/*'])
  assert read_summary(f'{tmp_path}/runs/1').skipped_by_name == 0
  assert (first['embedded'], second['embedded'], second['skipped']) == (3, 3, 3)
  assert second['skipped_by_name'] == 1  # .DS_Store: neither matched nor in the index
  assert second['matched'] == second['embedded'] + second['failed'] + second['skipped']
  assert _embedded(f'{tmp_path}/runs/2', tmp_path) == sorted(PHOTOS[3:])
  union = _embedded(first['output'], tmp_path) + _embedded(second['output'], tmp_path)
  assert sorted(union) == sorted(PHOTOS)  # each image once among the finished runs
  index = duckdb.sql(f"select uri, outcome, size_bytes from '{tmp_path}/runs/2/index-*.parquet'"
                     ).fetchall()
  outcomes = collections.Counter(outcome for _, outcome, _ in index)
  assert outcomes == {'embedded': 3, 'skipped': 3}
  assert all(size == os.path.getsize(uri) for uri, _, size in index)


def _as_written_before_skipped_by_name(summary_path):
  with open(summary_path) as f:
    fields = json.load(f)
  del fields['skipped_by_name']
  with open(summary_path, 'w') as f:
    json.dump(fields, f)


def test_changed_files_broken_files_and_retry_failed(photos, image_folder, tmp_path):
  (photos / 'broken.jpg').write_text('not an image')
  run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1'])
  rewritten = photos / 'camera.png'
  shutil.copy(image_folder / 'coffee.png', rewritten)  # new content, new size and mtime
  second = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/2',
                f'--incremental_from={tmp_path}/runs/*'])
  assert _embedded(second['output'], tmp_path) == ['camera.png']
  assert second['skipped'] == 3  # two unchanged photos and the unchanged broken file
  run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/3',  # the broken file alone,
       f'--incremental_from={tmp_path}/runs/*', '--retry_failed'])  # 1 of 4: the run worked
  third = read_summary(f'{tmp_path}/runs/3')
  assert (third.embedded, third.failed, third.skipped, third.outcome) == (0, 1, 3, 'finished')
  assert [os.path.basename(f['uri']) for f in read_failures(third.output)] == ['broken.jpg']


def test_a_run_older_than_0_2_is_refused_before_any_work(photos, tmp_path, capsys):
  write_run(f'{tmp_path}/runs/old', rows([str(photos / PHOTOS[0])], 4, seed=1))
  write_summary_of_0_1(f'{tmp_path}/runs/old')
  argv = [f'--input={photos}', TINY, f'--output={tmp_path}/runs/new',
          f'--incremental_from={tmp_path}/runs/*']
  with pytest.raises(IncompatibleRunError, match='runs/old/run_summary.json: not a run summary '
                     'of pnasnet-embeddings 0.2.0 or later'):
    run(argv)
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2 and '0.2.0 or later' in capsys.readouterr().err
  assert not os.path.exists(f'{tmp_path}/runs/new')  # nothing claimed


def test_state_that_cannot_be_listed_stops_the_run_and_the_index_with_one_line(
    gcs_server, photos, tmp_path, capsys):
  """A bucket that does not exist (or cannot be read) is not "no earlier run": even with
  --allow_no_earlier_runs the night would embed everything again. Exit 2, nothing claimed."""
  from commands import index as index_command
  missing = 'gs://no-such-state-bucket/runs/*'
  with pytest.raises(SystemExit) as exit_info:
    main([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1',
          f'--incremental_from={missing}', '--allow_no_earlier_runs'])
  error = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and error[-1].startswith(
      f'error: --incremental_from {missing}: cannot be listed (')
  assert not os.path.exists(f'{tmp_path}/runs/1')
  with pytest.raises(SystemExit) as exit_info:
    index_command.main(['build', '--runs', missing, '--output', str(tmp_path / 'index')])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
      "check the bucket's name, your credentials and the network")


def test_an_unfinished_run_and_another_model_do_not_count(photos, tmp_path):
  run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1'])
  os.remove(tmp_path / 'runs' / '1' / 'run_summary.json')  # as if it died before finishing
  again = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/2',
               f'--incremental_from={tmp_path}/runs/*', '--allow_no_earlier_runs'])
  assert (again['embedded'], again['skipped']) == (3, 0)
  other_model = run([f'--input={photos}', TINY, '--seed=1', f'--output={tmp_path}/runs/3',
                     f'--incremental_from={tmp_path}/runs/*'])
  assert (other_model['embedded'], other_model['skipped']) == (3, 0)
  other_recipe = run([f'--input={photos}', TINY, '--center_crop_fraction=0.5',
                      f'--output={tmp_path}/runs/4', f'--incremental_from={tmp_path}/runs/*'])
  assert (other_recipe['embedded'], other_recipe['skipped']) == (3, 0)


def test_incremental_on_gcs_with_two_processes(gcs_server, image_folder, tmp_path):
  gcs_server.create_bucket('nightly')
  for name in PHOTOS[:4]:
    gcs_server.upload(f'gs://nightly/photos/{name}', (image_folder / name).read_bytes())
  processes = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']
  run(['--input=gs://nightly/photos', TINY, '--output=gs://nightly/emb/1'] + processes)
  for name in PHOTOS[4:]:
    gcs_server.upload(f'gs://nightly/photos/{name}', (image_folder / name).read_bytes())
  second = run(['--input=gs://nightly/photos', TINY, '--output=gs://nightly/emb/2',
                '--incremental_from=gs://nightly/emb/*'] + processes)
  assert (second['embedded'], second['skipped']) == (2, 4)
  assert _embedded('gs://nightly/emb/2', tmp_path) == sorted(PHOTOS[4:])


def test_manifests_plain_gzip_comments_and_missing_uris(gcs_server, image_folder, tmp_path):
  gcs_server.create_bucket('listed')
  for name in PHOTOS:
    gcs_server.upload(f'gs://listed/photos/{name}', (image_folder / name).read_bytes())
  plain = tmp_path / 'part-1.txt'
  plain.write_text('# first chunk\n\n' + ''.join(f'gs://listed/photos/{n}\n' for n in PHOTOS[:3])
                   + 'gs://listed/photos/missing.jpg\n')
  with gzip.open(tmp_path / 'part-2.txt.gz', 'wt') as f:
    f.write(''.join(f'  gs://listed/photos/{n}  \n' for n in PHOTOS[3:]))
  gcs_server.upload('gs://listed/manifests/part-1.txt', plain.read_bytes())
  gcs_server.upload('gs://listed/manifests/part-2.txt.gz',
                    (tmp_path / 'part-2.txt.gz').read_bytes())
  summary = run(['--input_manifest=gs://listed/manifests/*', TINY,
                 '--input=gs://listed/photos/rocket.jpg',  # named twice: read once
                 '--output=gs://listed/emb/1'])
  assert (summary['matched'], summary['embedded'], summary['failed_by_stage']['read']) == (
      7, 6, 1)
  [missing] = read_failures('gs://listed/emb/1')
  assert (missing['uri'], missing['stage']) == ('gs://listed/photos/missing.jpg', 'read')
  assert _embedded('gs://listed/emb/1', tmp_path) == sorted(PHOTOS)


def test_a_backfill_in_chunks_is_finished_run_by_run(image_folder, tmp_path):
  """Each chunk is its own finished run, so a failure costs one chunk; a rerun over all chunks
  with --incremental_from embeds nothing that a finished chunk holds."""
  chunks = [PHOTOS[:2], PHOTOS[2:4], PHOTOS[4:]]
  for number, chunk in enumerate(chunks):
    manifest = tmp_path / f'chunk-{number}.txt'
    manifest.write_text(''.join(f'{image_folder / n}\n' for n in chunk))
    run([f'--input_manifest={manifest}', TINY, f'--output={tmp_path}/backfill/chunk-{number}',
         f'--incremental_from={tmp_path}/backfill/*', '--allow_no_earlier_runs'])
  os.remove(tmp_path / 'backfill' / 'chunk-1' / 'run_summary.json')  # chunk 1 "died"
  rerun = run([f'--input_manifest={tmp_path}/chunk-*.txt', TINY,
               f'--output={tmp_path}/backfill/rerun', f'--incremental_from={tmp_path}/backfill/*'])
  assert (rerun['embedded'], rerun['skipped']) == (2, 4)
  assert _embedded(rerun['output'], tmp_path) == sorted(chunks[1])


def test_night_3_skips_what_night_1_embedded_reading_only_night_2(photos, image_folder,
                                                                 tmp_path):
  runs = tmp_path / 'runs'
  run([f'--input={photos}', TINY, f'--output={runs}/1'])
  shutil.copy(image_folder / 'coffee.png', photos / 'coffee.png')
  second = run([f'--input={photos}', TINY, f'--output={runs}/2', f'--incremental_from={runs}/*'])
  assert (second['embedded'], second['skipped']) == (1, 3)
  (photos / 'rocket.jpg').write_bytes((image_folder / 'rocket.jpg').read_bytes())
  third = run([f'--input={photos}', TINY, f'--output={runs}/3', f'--incremental_from={runs}/*'])
  assert third['incremental_runs'] == [f'{runs}/2']  # night 2 superseded night 1
  assert (third['embedded'], third['skipped']) == (1, 4)
  assert _embedded(f'{runs}/3', tmp_path) == ['rocket.jpg']


def _content_stores(request):
  scheme = request.param
  return scheme, request.getfixturevalue('gcs_server' if scheme == 'gs' else 's3_server')


@pytest.fixture(params=['gs', 's3'])
def store(request):
  return _content_stores(request)


def test_a_metadata_change_is_skipped_a_content_change_is_not(store, image_folder, tmp_path):
  scheme, server = store
  bucket = f'content-{scheme}-{os.getpid()}'
  server.create_bucket(bucket)
  names = ('camera.png', 'chelsea.png')
  for name in names:
    server.upload(f'{scheme}://{bucket}/photos/{name}', (image_folder / name).read_bytes())
  options = [] if scheme == 'gs' else server.options
  args = [f'--input={scheme}://{bucket}/photos', TINY] + options
  run(args + [f'--output={tmp_path}/runs/1'])
  # camera.png: copied onto itself with new metadata (a new modification time, the same bytes);
  # chelsea.png: new bytes.
  if scheme == 'gs':
    blob = server.client.bucket(bucket).blob('photos/camera.png')
    blob.reload()
    before = blob.updated
    blob.rewrite(blob)
    blob.reload()
    assert blob.updated != before
  else:
    server.client.copy_object(Bucket=bucket, Key='photos/camera.png',
                              CopySource={'Bucket': bucket, 'Key': 'photos/camera.png'},
                              Metadata={'note': 'edited'}, MetadataDirective='REPLACE')
  server.upload(f'{scheme}://{bucket}/photos/chelsea.png',
                (image_folder / 'coffee.png').read_bytes())
  second = run(args + [f'--output={tmp_path}/runs/2', f'--incremental_from={tmp_path}/runs/*'])
  assert (second['embedded'], second['skipped']) == (1, 1)
  assert _embedded(f'{tmp_path}/runs/2', tmp_path) == ['chelsea.png']
