"""Listing at scale, and what a listing must never do: streamed pages split by prefix (gs://,
s3://, local), every extension spelling in one pass, a launch that lists a handful of pages,
folders that cannot be listed, run directories inside inputs, manifests, --exclude."""

import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
import uuid

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.launcher import run
from pipeline.options import EmbeddingOptions
from tests.fault_proxy import FaultProxy, FaultRule
from tests.outputs import read_failures as _read_failures
from tests.synthetic_bucket import SyntheticBuckets, SyntheticNames
from transforms.listing import NOT_IMAGE_EXTENSIONS, is_run_file
from transforms.read import (CHECK_PAGES, MatchFiles, NoInputError, check_inputs_match,
                             match_input)

TINY = '--model=builtin:pnasnet_tiny'
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ['top.jpg', 'a/one.JPG', 'a/two.jpeg', 'a/deeper/three.jpg', 'b/four.jpg', 'b/notes.txt',
         'b/c/d/five.Jpeg', 'c/six.png']


class _Bucket:
  """A fresh bucket on the local GCS or S3 server, holding NAMES under photos/."""

  def __init__(self, scheme, server):
    self.scheme, self.server = scheme, server
    self.bucket = f'list-{uuid.uuid4().hex[:10]}'
    server.create_bucket(self.bucket)
    self.root = f'{scheme}://{self.bucket}/photos'
    for name in NAMES:
      server.upload(f'{self.root}/{name}', b'x' * len(name))
    self.options = [] if scheme == 'gs' else server.options

  @property
  def upstream(self):
    return self.server.host if self.scheme == 'gs' else self.server.endpoint

  def route_through(self, proxy, monkeypatch):
    if self.scheme == 'gs':
      monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
      return []
    return [o.replace(self.server.endpoint, proxy.url) for o in self.server.options]


@pytest.fixture(params=['gs', 's3'])
def bucket(request):
  server = request.getfixturevalue('gcs_server' if request.param == 'gs' else 's3_server')
  return _Bucket(request.param, server)


def _matched_in_a_pipeline(patterns, options, expected, skipped_by_name=()):
  """equal_to compares as multisets: each URI exactly once."""
  with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
    matched = pipeline | MatchFiles(patterns)
    assert_that(matched['refs'] | beam.Map(lambda ref: ref.uri), equal_to(expected))
    assert_that(matched['skipped_by_name'], equal_to(list(skipped_by_name)), label='Skipped')


def test_a_split_listing_equals_the_plain_listing(bucket):
  plain = bucket.server.list(f'{bucket.scheme}://{bucket.bucket}/photos/')
  assert len(plain) == len(NAMES)
  jpegs = [uri for uri in plain if re.search(r'\.(jpe?g)$', uri, re.IGNORECASE)]
  _matched_in_a_pipeline([f'{bucket.root}/**.jpg'], bucket.options, jpegs)
  notes = f'{bucket.root}/b/notes.txt'  # the same folder named twice: skipped, and counted, once
  _matched_in_a_pipeline([bucket.root, f'{bucket.root}/'], bucket.options,
                         [uri for uri in plain if uri != notes], [notes])
  _matched_in_a_pipeline([f'{bucket.root}/*/*.jpg'], bucket.options,
                         [f'{bucket.root}/a/one.JPG', f'{bucket.root}/a/two.jpeg',
                          f'{bucket.root}/b/four.jpg'])


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_every_spelling_is_found_in_one_pass_over_each_prefix(scheme, monkeypatch):
  names = SyntheticNames(3000, 3, extensions=('jpg', 'JPEG', 'png'))
  with SyntheticBuckets({'synthetic': names}) as server:
    options = _point_at(server, scheme, monkeypatch)
    beam.io.filesystems.FileSystems.set_options(PipelineOptions(options))
    found = [ref.uri for ref in match_input(f'{scheme}://synthetic/**.jpg')]
    assert sorted(found) == [f'{scheme}://synthetic/{names[i]}' for i in range(3000)
                             if not names[i].endswith('png')]
    # One listing of the top level, then each prefix's pages once (1,000 names a page).
    assert len(server.listings) == len(set(server.listings)) == 1 + 3 * 1
    assert sorted(prefix for _, prefix, _, _, _ in server.listings) == ['', 'p0000/', 'p0001/',
                                                                     'p0002/']


def _point_at(server, scheme, monkeypatch):
  if scheme == 'gs':
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', server.url)
    return []
  return [f'--s3_endpoint_url={server.url}', '--s3_access_key_id=testing',
          '--s3_secret_access_key=testing', '--s3_region_name=us-east-1']


def test_the_dataflow_dry_run_lists_a_handful_of_pages(gcs_server, monkeypatch):
  gcs_server.create_bucket('dry-bounded')
  with SyntheticBuckets({'synthetic': SyntheticNames(200_000, 1000)},
                        upstream=gcs_server.host) as server:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', server.url)
    returned = run(['--runner=DataflowRunner', '--dry_run=True', '--project=test',
                    '--region=us-central1', '--temp_location=gs://dry-bounded/tmp',
                    '--input=gs://synthetic/**.png', '--input=gs://synthetic/p0999/',
                    '--output=gs://dry-bounded/emb/run1', TINY])
    synthetic = [listing for listing in server.listings if listing[0] == 'synthetic']
  assert returned['steps']
  # Per input at most CHECK_PAGES list pages, of the 200 the bucket's listing has.
  assert 2 <= len(synthetic) <= 2 * CHECK_PAGES


def test_a_folder_that_cannot_be_listed_is_a_read_failure(bucket, monkeypatch, tmp_path):
  private = f'{bucket.bucket}/photos/b/'
  with FaultProxy(bucket.upstream, rules=[FaultRule('^' + re.escape(private), 403,
                                                    kinds=['list'])]) as proxy:
    options = bucket.route_through(proxy, monkeypatch)
    output = str(tmp_path / 'out')
    with pytest.raises(Exception, match='none was embedded'):  # the files are not images
      run([f'--input={bucket.root}', TINY, f'--output={output}'] + options)
    failures = {f['uri']: f for f in _read_failures(output)}
    denied = failures[f'{bucket.scheme}://{private}']
    assert denied['stage'] == 'read' and 'permission denied' in denied['message']
    assert not any(uri.startswith(f'{bucket.scheme}://{private}') and uri != denied['uri']
                   for uri in failures)
    assert f'{bucket.root}/c/six.png' in failures  # the rest was listed
    with pytest.raises(Exception, match='cannot be listed: permission denied'):
      run([f'--input={bucket.root}/b/*.jpg', TINY, f'--output={tmp_path}/out2'] + options)


def test_runs_never_read_their_own_or_other_runs_outputs(image_folder, tmp_path, caplog):
  photos = tmp_path / 'photos'
  shutil.copytree(image_folder, photos)
  for name in ('empty.jpg', 'truncated.jpg', 'notes.jpg'):
    (photos / name).unlink()
  first = run([f'--input={photos}', TINY, f'--output={photos}/embeddings/night1'])
  (photos / 'index-01.jpg').write_bytes((photos / 'rocket.jpg').read_bytes())  # a user's photo
  second = run([f'--input={photos}', TINY, f'--output={photos}/embeddings/night2'])
  assert first['matched'] == 6
  assert (second['matched'], second['embedded'], second['failed']) == (7, 7, 0)
  said = [r.getMessage() for r in caplog.records if 'a run directory of this tool' in
          r.getMessage()]
  assert said and len(said) == len(set(said))


def test_a_run_of_more_than_99999_shards_is_still_a_run():
  """Beam numbers shards with at least five digits: a sixth one is still a run's file."""
  assert is_run_file('/photos/night1/embeddings-100000-of-123456.tfrecord.gz')
  assert is_run_file('/photos/night1/index-000007-of-100000.parquet')
  assert is_run_file('/photos/night1/embeddings-00001-of-00002.parquet')
  assert not is_run_file('/photos/index-01.jpg')


def test_a_manifest_that_is_not_utf8(image_folder, tmp_path):
  manifest = tmp_path / 'latin1.txt'
  manifest.write_bytes(f'# photos\n{image_folder}/camera.png\n'.encode() +
                       f'{image_folder}/caf\xe9.png\n'.encode('latin-1'))
  summary = run([f'--input_manifest={manifest}', TINY, f'--output={tmp_path}/out'])
  assert (summary['embedded'], summary['failed']) == (1, 1)
  [failure] = _read_failures(f'{tmp_path}/out')
  assert failure['uri'] == str(manifest) and 'not UTF-8' in failure['message']
  assert 'caf\\xe9.png' in failure['message']

  first_line_bad = tmp_path / 'bad_first.txt'
  first_line_bad.write_bytes(f'{image_folder}/caf\xe9.png\n'.encode('latin-1'))
  result = _cli([f'--input_manifest={first_line_bad}', TINY, f'--output={tmp_path}/out2'])
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f'{first_line_bad} line 1 is not UTF-8' in result.stderr
  assert not os.path.exists(tmp_path / 'out2')


def _cli(args):
  return subprocess.run([sys.executable, 'run_pipeline.py'] + args, cwd=PROJECT,
                        capture_output=True, text=True, timeout=600)


def test_a_manifest_of_comments_only_matches_nothing(tmp_path):
  manifest = tmp_path / 'empty.txt.gz'
  manifest.write_bytes(gzip.compress(b'# nothing yet\n\n   # still nothing\n'))
  result = _cli([f'--input_manifest={manifest}', TINY, f'--output={tmp_path}/out'])
  assert result.returncode == 2 and 'names no image' in result.stderr
  assert not os.path.exists(tmp_path / 'out')


def test_a_note_after_a_manifest_uri_is_a_comment(image_folder, tmp_path):
  odd = image_folder / 'photo#1.png'
  shutil.copy(image_folder / 'camera.png', odd)
  manifest = tmp_path / 'manifest.txt'
  manifest.write_text(f'{image_folder}/camera.png   # the test card\n{odd}\t# a # in a name\n')
  summary = run([f'--input_manifest={manifest}', TINY, f'--output={tmp_path}/out'])
  assert (summary['matched'], summary['embedded'], summary['failed']) == (2, 2, 0)


def test_the_input_help_example_matches_only_images(monkeypatch):
  parser = beam.options.pipeline_options._BeamArgumentParser()  # pylint: disable=protected-access
  EmbeddingOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  [action] = [a for a in parser._actions if '--input' in a.option_strings]  # pylint: disable=protected-access
  local = [example for example in re.findall(r'"?([^\s"]*sample_images[^\s"]*)"?', action.help)]
  assert local
  monkeypatch.chdir(PROJECT)
  for example in local:
    found = [os.path.basename(ref.uri) for ref in match_input(os.path.abspath(example))]
    assert found and all(name.endswith(('.png', '.jpg')) for name in found), found


def test_exclude_leaves_out_names_and_paths(bucket, tmp_path):
  beam.io.filesystems.FileSystems.set_options(PipelineOptions(bucket.options))
  found = sorted(ref.uri[len(bucket.root) + 1:] for ref in match_input(
      bucket.root, excludes=['*.txt', 'deeper', f'{bucket.root}/b/c/**']))
  assert found == ['a/one.JPG', 'a/two.jpeg', 'b/four.jpg', 'c/six.png', 'top.jpg']
  local = tmp_path / 'local'
  for name in NAMES:
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_bytes(b'x')
  summary_found = sorted(ref.uri[len(str(local)) + 1:] for ref in match_input(
      str(local), excludes=['*.TXT', 'c']))
  assert summary_found == ['a/deeper/three.jpg', 'a/one.JPG', 'a/two.jpeg', 'b/four.jpg',
                           'top.jpg']


def test_a_missing_uri_named_twice_by_manifests_is_counted_once(image_folder, tmp_path):
  missing = f'{image_folder}/missing.png'
  manifest = tmp_path / 'manifest.txt'
  manifest.write_text(f'{image_folder}/camera.png\n{missing}\n{image_folder}/rocket.jpg\n'
                      f'{missing}\n')
  output = str(tmp_path / 'out')
  summary = run([f'--input_manifest={manifest}', TINY, f'--output={output}'])
  assert (summary['matched'], summary['embedded'], summary['failed']) == (3, 2, 1)
  assert [f['uri'] for f in _read_failures(output)] == [missing]
  index = pq.read_table(glob.glob(f'{output}/index-*')).column('uri').to_pylist()
  assert sorted(index) == sorted([f'{image_folder}/camera.png', missing,
                                  f'{image_folder}/rocket.jpg'])


def test_folders_and_globs_skip_names_that_are_not_images(bucket, tmp_path):
  """Hidden files and folders and known non-image extensions are skipped in folder and glob
  listings only: an exact name, a pattern that asks for them, or --include_all_files reads them."""
  beam.io.filesystems.FileSystems.set_options(PipelineOptions(bucket.options))

  def found(pattern, include_all_files=False):
    return sorted(ref.uri[len(bucket.root) + 1:] for ref in match_input(
        pattern, include_all_files=include_all_files))

  assert 'b/notes.txt' not in found(bucket.root)
  assert found(f'{bucket.root}/b/*') == ['b/four.jpg']
  assert found(f'{bucket.root}/**.txt') == found(f'{bucket.root}/b/notes.txt') == ['b/notes.txt']
  assert found(bucket.root, include_all_files=True) == sorted(NAMES)

  local = tmp_path / 'local'
  names = ['.DS_Store', 'notes.TXT', 'clip.mp4', 'Thumbs.db', '._IMG_1.jpg', '.thumbnails/t.jpg',
           'trip/.git/config', 'notes/readme.md', 'IMG_1.jpg', 'IMG_2.jfif', 'scan',
           'trip/IMG_3.heic']
  for name in names:
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_bytes(b'x')

  def found_locally(pattern):
    return sorted(ref.uri[len(str(local)) + 1:] for ref in match_input(pattern))

  images = ['IMG_1.jpg', 'IMG_2.jfif', 'scan', 'trip/IMG_3.heic']
  assert found_locally(str(local)) == found_locally(f'{local}/**') == images
  assert found_locally(f'{local}/**.jpg') == ['IMG_1.jpg']
  assert found_locally(f'{local}/.thumbnails/*') == ['.thumbnails/t.jpg']
  assert found_locally(f'{local}/.*') == ['.DS_Store', '._IMG_1.jpg']
  with pytest.raises(NoInputError, match=r'Skipped by name as hidden or not images: '
                     r'\S*/notes/readme\.md; --include_all_files reads them'):
    check_inputs_match([f'{local}/notes'])
  check_inputs_match([f'{local}/notes'], include_all_files=True)


def test_the_inputs_page_lists_the_extensions_skipped():
  with open(os.path.join(PROJECT, 'docs', 'running.md')) as f:
    text = ' '.join(f.read().split())
  listed = re.search(r'these extensions, in any case: `([^`]*)`', text).group(1).split()
  assert listed == list(NOT_IMAGE_EXTENSIONS)
