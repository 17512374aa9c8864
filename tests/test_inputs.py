"""Every file the user names is embedded or reported: repeated flags, folders, links, odd names,
extensions in any case, `~`; the same on local disks, gs:// and s3://."""

import json
import os
import shutil

import pytest

from commands.embed import summary_line
from pipeline.launcher import run
from tests.outputs import read_examples, read_failures
from transforms.read import NoInputError, match_input

TINY = '--model=builtin:pnasnet_tiny'


def _uris(output, tmp_path):
  return sorted(e.features.feature['image/uri'].bytes_list.value[0].decode()
                for e in read_examples(output, tmp_path))


def test_repeated_input_flags_accumulate(image_folder, tmp_path):
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/*.png', f'--input={image_folder}/rocket.jpg', TINY,
                 f'--output={output}'])
  assert summary['input'] == [f'{image_folder}/*.png', f'{image_folder}/rocket.jpg']
  assert [os.path.basename(u) for u in _uris(output, tmp_path)] == [
      'astronaut.png', 'camera.png', 'chelsea.png', 'coffee.png', 'rocket.jpg']


@pytest.mark.parametrize('suffix', ['', '/'])
def test_a_local_folder_means_every_file_under_it(suffix, image_folder, tmp_path):
  nested = image_folder / 'deeper' / 'still'
  nested.mkdir(parents=True)
  shutil.copy(image_folder / 'camera.png', nested / 'camera_copy.png')
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}{suffix}', TINY, f'--output={output}'])
  files = sorted(str(p) for p in image_folder.rglob('*') if p.is_file())
  assert summary['matched'] == len(files) == summary['embedded'] + summary['failed']
  assert str(nested / 'camera_copy.png') in _uris(output, tmp_path)


@pytest.mark.parametrize('suffix', ['', '/'])
def test_a_gcs_folder_means_every_object_under_it(suffix, gcs_server, image_folder, tmp_path):
  bucket = f'folder-{len(suffix)}'
  gcs_server.create_bucket(bucket)
  gcs_server.upload(f'gs://{bucket}/photos/top.png', (image_folder / 'camera.png').read_bytes())
  gcs_server.upload(f'gs://{bucket}/photos/sub/deep.jpg',
                    (image_folder / 'rocket.jpg').read_bytes())
  gcs_server.upload(f'gs://{bucket}/photos_elsewhere.png',
                    (image_folder / 'camera.png').read_bytes())
  output = str(tmp_path / 'out')
  summary = run([f'--input=gs://{bucket}/photos{suffix}', TINY, f'--output={output}'])
  assert (summary['matched'], summary['embedded']) == (2, 2)
  assert _uris(output, tmp_path) == [f'gs://{bucket}/photos/sub/deep.jpg',
                                     f'gs://{bucket}/photos/top.png']


def test_links_odd_names_extensions_and_home(image_folder, tmp_path, monkeypatch):
  photos = tmp_path / 'home' / 'photos'
  (photos / 'trip').mkdir(parents=True)
  jpeg = (image_folder / 'rocket.jpg').read_bytes()
  (photos / 'IMG_0001.JPG').write_bytes(jpeg)
  (photos / 'trip' / 'beach.jpeg').write_bytes(jpeg)
  (photos / 'star[1].jpg').write_bytes(jpeg)
  (photos / 'notes.txt').write_text('not matched by **.jpg')
  (photos / 'gone.jpg').symlink_to(tmp_path / 'nowhere.jpg')  # a dangling link
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (elsewhere / 'linked.jpg').write_bytes(jpeg)
  (photos / 'linked_folder').symlink_to(elsewhere)
  (elsewhere / 'loop').symlink_to(photos)  # a cycle: each real folder is walked once
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))

  found = sorted(ref.uri for ref in match_input(os.path.expanduser('~/photos/**.jpg')))
  assert found == sorted(str(photos / name) for name in (
      'IMG_0001.JPG', 'gone.jpg', 'linked_folder/linked.jpg', 'star[1].jpg', 'trip/beach.jpeg'))
  assert [r.uri for r in match_input(str(photos / 'star\\[1\\].jpg'))] == [
      str(photos / 'star[1].jpg')]
  assert [r.uri for r in match_input(str(photos / 'star[1].jpg'))] == [
      str(photos / 'star[1].jpg')]

  output = str(tmp_path / 'out')
  summary = run(['--input=~/photos/**.jpg', TINY, f'--output={output}'])
  assert summary['input'] == [str(photos / '**.jpg')]
  assert (summary['matched'], summary['embedded'], summary['failed_by_stage']['read']) == (
      5, 4, 1)
  [failure] = read_failures(output)
  assert (failure['uri'], failure['stage'], failure['error']) == (
      str(photos / 'gone.jpg'), 'read', 'FileNotFoundError')


def test_a_run_that_embeds_nothing_fails_with_the_reason(tmp_path):
  folder = tmp_path / 'texts'
  folder.mkdir()
  for name in ('a.jpg', 'b.jpg'):
    (folder / name).write_text('not an image')
  with pytest.raises(Exception, match='none was embedded.*UnidentifiedImageError'):
    run([f'--input={folder}', TINY, f'--output={tmp_path}/out'])
  summary = json.loads((tmp_path / 'out' / 'run_summary.json').read_text())
  assert summary['failed'] == 2  # the run finished and says why



def test_a_file_name_that_is_not_utf8_is_a_read_failure_and_the_rest_embeds(image_folder,
                                                                           tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  for name in ('camera.png', 'rocket.jpg'):
    shutil.copy(image_folder / name, photos / name)
  with open(os.path.join(os.fsencode(photos), b'bad_\xff_name.png'), 'wb') as f:
    f.write((image_folder / 'coffee.png').read_bytes())
  output = str(tmp_path / 'out')
  summary = run([f'--input={photos}', TINY, f'--output={output}'])
  assert (summary['matched'], summary['embedded'], summary['failed']) == (3, 2, 1)
  [failure] = read_failures(output)
  assert (failure['uri'], failure['stage']) == (f'{photos}/bad_\\xff_name.png', 'read')
  assert 'not UTF-8' in failure['message']
  assert not [name for name in os.listdir(output) if name.startswith('beam-temp')]


def test_a_folder_skips_files_named_as_not_images_and_counts_them(image_folder, tmp_path):
  photos = tmp_path / 'photos'
  (photos / '.thumbnails').mkdir(parents=True)
  for name in ('camera.png', 'rocket.jpg'):
    shutil.copy(image_folder / name, photos / name)
  shutil.copy(image_folder / 'coffee.png', photos / 'scan')  # an image without an extension
  shutil.copy(image_folder / 'rocket.jpg', photos / '.thumbnails' / 'rocket.jpg')
  (photos / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
  (photos / 'notes.txt').write_text('taken in 2024\n')
  output = str(tmp_path / 'out')
  summary = run([f'--input={photos}', f'--input={photos}/notes.txt', TINY, f'--output={output}'])
  # .DS_Store, .thumbnails/rocket.jpg and notes.txt are skipped by the folder's listing, and
  # notes.txt, named exactly too, is read all the same (and fails).
  assert (summary['matched'], summary['embedded'], summary['failed'],
          summary['skipped_by_name']) == (4, 3, 1, 3)
  assert [os.path.basename(u) for u in _uris(output, tmp_path)] == ['camera.png', 'rocket.jpg',
                                                                    'scan']
  assert [f['uri'] for f in read_failures(output)] == [str(photos / 'notes.txt')]

  every = run([f'--input={photos}', TINY, f'--output={tmp_path}/all', '--include_all_files'])
  assert (every['matched'], every['embedded'], every['failed'], every['skipped_by_name']) == (
      6, 4, 2, 0)


def test_a_folder_of_names_that_are_not_images_is_read_with_include_all_files(tmp_path, capsys):
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'notes.txt').write_text('taken in 2024\n')
  with pytest.raises(NoInputError, match='--include_all_files'):
    run([f'--input={notes}', TINY, f'--output={tmp_path}/refused'])
  summary = run([f'--input={notes}', TINY, f'--output={tmp_path}/read', '--include_all_files',
                 '--max_failed_fraction=1'])
  assert (summary['matched'], summary['failed'], summary['skipped_by_name']) == (1, 1, 0)
  assert 'not images by name' in summary_line(dict(summary, skipped_by_name=2))


def test_an_empty_folder_is_named_as_empty(tmp_path):
  (tmp_path / 'photos' / 'later').mkdir(parents=True)
  with pytest.raises(NoInputError, match='is a folder with no file in it or under it'):
    run([f'--input={tmp_path / "photos"}', TINY, f'--output={tmp_path}/out'])
  (tmp_path / 'photos' / 'later' / 'a.jpg').write_bytes(b'x')
  with pytest.raises(NoInputError, match='no file matches --input'):
    run([f'--input={tmp_path / "photos"}', '--exclude=**.jpg', TINY, f'--output={tmp_path}/o2'])
