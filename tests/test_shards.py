"""Shards as inputs: real WebDataset tars, Hugging Face style Parquet and TFRecords of Examples,
on local disk, GCS and S3, through the whole pipeline with the tiny network (one run per store,
shared by the module's tests), and their members read back."""

import gzip
import hashlib
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

import collection
import storage
from commands import collection as collection_command
from embeddings import browse, sheet
from pipeline.launcher import run
from pipeline.options import OptionsError
from run_format import INDEX_GLOB
from storage.members import (ShardFormat, example_bytes_features, iter_members, read_image_bytes,
                             split_member_uri)
from tests.conftest import SAMPLE_IMAGES
from tests.outputs import read_examples, read_failures
from transforms.listing import list_sequentially, plan_listing
from transforms.shards import ShardInputs, is_image_member

TINY = '--model=builtin:pnasnet_tiny'
PHOTOS = {name: open(os.path.join(SAMPLE_IMAGES, name), 'rb').read()
          for name in sorted(os.listdir(SAMPLE_IMAGES)) if not name.endswith('.md')}
BROKEN_JPEG = b'\xff\xd8\xff\xe0 not really a jpeg'


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def webdataset_tar(compressed: bool = False):
  """(the tar's bytes, {member: photo}, where its cut falls): a WebDataset sample per photo with
  its caption, metadata and class beside it, a broken JPEG, and a last photo cut
  half way through its data (uncompressed only)."""
  buffer, members = io.BytesIO(), {}
  with tarfile.open(fileobj=buffer, mode='w:gz' if compressed else 'w') as archive:
    for number, (name, data) in enumerate(PHOTOS.items()):
      key = f'{number:06d}'
      member = f'{key}.{name.rsplit(".", 1)[1]}'
      members[member] = data
      _add(archive, member, data)
      _add(archive, f'{key}.txt', f'a photo called {name}'.encode())
      _add(archive, f'{key}.json', b'{"width": 1}')
      _add(archive, f'{key}.cls', str(number).encode())
    _add(archive, '000006.jpg', BROKEN_JPEG)
    cut_at = None if compressed else buffer.tell()
    if not compressed:
      _add(archive, '000007.jpg', PHOTOS['rocket.jpg'])
  if compressed:
    return buffer.getvalue(), members, None
  return buffer.getvalue()[:cut_at + 512 + len(PHOTOS['rocket.jpg']) // 2], members, cut_at


def hugging_face_parquet(with_missing: bool = True) -> bytes:
  """`image: struct<bytes, path>` and an `id` column, two rows a row group; a row without
  bytes last."""
  rows = [{'bytes': data, 'path': name} for name, data in PHOTOS.items()]
  ids = [f'id-{name}' for name in PHOTOS]
  if with_missing:
    rows.append({'bytes': None, 'path': 'lost.jpg'})
    ids.append('id-lost')
  table = pa.table({'label': list(range(len(rows))), 'image': rows, 'id': ids})
  buffer = io.BytesIO()
  pq.write_table(table, buffer, row_group_size=2)
  return buffer.getvalue()


def tfrecord_of_examples(compressed: bool = False) -> bytes:
  """An Example per photo, `image/filename` on every other one, a label on each."""
  import tensorflow as tf
  path = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'shards-{os.getpid()}.tfrecord')
  with tf.io.TFRecordWriter(path, 'GZIP' if compressed else '') as writer:
    for number, (name, data) in enumerate(PHOTOS.items()):
      feature = {'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                 'image/class/label': tf.train.Feature(int64_list=tf.train.Int64List(
                     value=[number]))}
      if number % 2 == 0:
        feature['image/filename'] = tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[name.encode()]))
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=feature)).SerializeToString())
  with open(path, 'rb') as f:
    data = f.read()
  os.remove(path)
  return data


def tfrecord_names():
  return [name if number % 2 == 0 else f'record={number}'
          for number, name in enumerate(PHOTOS)]


def _index(output: str):
  return pa.concat_tables([pq.read_table(storage.open_file(found.path))
                           for found in storage.match(storage.join(output, INDEX_GLOB))])


def _embedded(output, tmp_path):
  """URI -> (sha256, vector) of every embedding the run wrote."""
  return {e.features.feature['image/uri'].bytes_list.value[0].decode(): (
      e.features.feature['image/sha256'].bytes_list.value[0].decode(),
      np.array(e.features.feature['embedding'].float_list.value))
      for e in read_examples(output, tmp_path)}


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class LocalRun:

  def __init__(self, tmp_path):
    folder = tmp_path / 'collection'
    folder.mkdir()
    self.tar, self.tar_members, self.cut_at = webdataset_tar()
    (folder / 'photos-000.tar').write_bytes(self.tar)
    (folder / 'hf-000.parquet').write_bytes(hugging_face_parquet())
    (folder / 'train-000.tfrecord').write_bytes(tfrecord_of_examples())
    (folder / 'a#1.jpg').write_bytes(PHOTOS['rocket.jpg'])  # a file with '#' in its name
    (folder / 'README.txt').write_text('not an image')
    self.folder, self.output = str(folder), str(tmp_path / 'out')
    self.summary = run([f'--input={folder}', f'--output={self.output}', TINY])
    self.embedded = _embedded(self.output, tmp_path)
    self.failures = read_failures(self.output)
    self.index = _index(self.output).to_pylist()


@pytest.fixture(scope='module')
def local_run(tmp_path_factory):
  return LocalRun(tmp_path_factory.mktemp('local_shards'))


def test_every_image_member_is_an_input_with_its_own_uri(local_run):
  folder = local_run.folder
  tar = [f'{folder}/photos-000.tar#{name}' for name in local_run.tar_members]
  parquet = [f'{folder}/hf-000.parquet#row={row}' for row in range(len(PHOTOS))]
  tfrecord = [f'{folder}/train-000.tfrecord#{name}' for name in tfrecord_names()]
  assert sorted(local_run.embedded) == sorted(tar + parquet + tfrecord + [f'{folder}/a#1.jpg'])
  photos = list(PHOTOS.values())
  for uris in (tar, parquet, tfrecord):
    assert [local_run.embedded[uri][0] for uri in uris] == [_sha(data) for data in photos]
  # The same bytes make the same vector, whatever holds them.
  for tar_uri, parquet_uri in zip(tar, parquet):
    np.testing.assert_array_equal(local_run.embedded[tar_uri][1],
                                  local_run.embedded[parquet_uri][1])


def test_matched_counts_members_and_nothing_vanishes(local_run):
  summary = local_run.summary
  # tar: 6 photos, the broken JPEG, the cut rest; parquet: 6 rows and the row without bytes;
  # tfrecord: 6; the file named a#1.jpg. Captions, metadata and classes are not inputs.
  assert summary['matched'] == 8 + 7 + 6 + 1
  assert summary['embedded'] == 19
  assert summary['failed_by_stage'] == {'read': 2, 'decode': 1, 'inference': 0}
  assert summary['skipped_by_name'] == 1  # README.txt
  assert summary['matched'] == summary['embedded'] + summary['failed']
  assert len(local_run.index) == summary['matched']
  by_uri = {failure['uri']: failure for failure in local_run.failures}
  folder = local_run.folder
  assert by_uri[f'{folder}/photos-000.tar#000006.jpg']['stage'] == 'decode'
  cut = by_uri[f'{folder}/photos-000.tar']
  assert cut['stage'] == 'read' and f'at byte {local_run.cut_at} ' in cut['message']
  assert 'after 7 members' in cut['message']
  lost = by_uri[f'{folder}/hf-000.parquet#row=6']
  assert lost['stage'] == 'read' and 'no image bytes' in lost['message']


def test_the_index_gives_tar_members_byte_ranges_that_read_back(local_run):
  ranges = {row['uri']: (row['byte_offset'], row['byte_length']) for row in local_run.index}
  for name, data in local_run.tar_members.items():
    uri = f'{local_run.folder}/photos-000.tar#{name}'
    offset, length = ranges[uri]
    assert local_run.tar[offset:offset + length] == data
    assert read_image_bytes(uri, offset, length) == data
  others = [r for uri, r in ranges.items() if '.tar#' not in uri]
  assert others and all(r == (None, None) for r in others)


def test_members_read_back_by_scanning_their_shard(local_run):
  folder = local_run.folder
  photos = list(PHOTOS.values())
  assert read_image_bytes(f'{folder}/photos-000.tar#000003.png') == photos[3]
  assert read_image_bytes(f'{folder}/hf-000.parquet#row=4') == photos[4]
  assert read_image_bytes(f'{folder}/hf-000.parquet#id-coffee.png') == PHOTOS['coffee.png']
  for number, name in enumerate(tfrecord_names()):
    assert read_image_bytes(f'{folder}/train-000.tfrecord#{name}') == photos[number]
  assert read_image_bytes(f'{folder}/a#1.jpg') == PHOTOS['rocket.jpg']
  with pytest.raises(FileNotFoundError):
    read_image_bytes(f'{folder}/train-000.tfrecord#record=0')  # named by its filename
  with pytest.raises(OSError, match='at byte'):  # not before the cut, and the rest is unread
    read_image_bytes(f'{folder}/photos-000.tar#000007.jpg')


def test_sheets_and_the_browse_page_show_members(local_run):
  uri = f'{local_run.folder}/photos-000.tar#000004.jpg'
  assert max(sheet.thumbnail_of(uri).size) == sheet.THUMBNAIL
  imported = f'{local_run.output}-collection'
  collection_command.main(['import', '--runs', local_run.output, '--collection', imported])
  snapshot = collection.open_collection(imported)
  server = browse.BackgroundServer(browse.Browser(snapshot, None, (), None, 'no model here'))
  try:
    answer = requests.get(f'{server.url}/thumbnail', params={'uri': uri}, timeout=60)
    assert answer.status_code == 200
    with Image.open(io.BytesIO(answer.content)) as image:
      assert max(image.size) == 192
  finally:
    server.stop()


def test_shards_on_gcs_and_s3_in_one_run(gcs_server, s3_server, tmp_path):
  """A keyed Parquet and a cut tar on GCS, a gzipped TFRecord and tar on S3: one run reads
  both stores; compressed shards give no byte ranges."""
  gcs_server.create_bucket('shards')
  tar, members, cut_at = webdataset_tar()
  gcs_server.upload('gs://shards/in/00000.tar', tar)
  gcs_server.upload('gs://shards/in/00000.parquet', hugging_face_parquet(with_missing=False))
  s3_server.create_bucket('gzshards')
  storage.set_filesystem_options(s3_server.options)
  s3_server.upload('s3://gzshards/in/train-00001.tfrecord.gz',
                   tfrecord_of_examples(compressed=True))
  gz_tar, gz_members, _ = webdataset_tar(compressed=True)
  s3_server.upload('s3://gzshards/in/photos.tar.gz', gz_tar)
  output = 'gs://shards/runs/one'
  summary = run(['--input=gs://shards/in/', '--input=s3://gzshards/in/', f'--output={output}',
                 '--key_column=id', TINY] + s3_server.options)
  photos = list(PHOTOS.values())
  expected = {**{f'gs://shards/in/00000.parquet#id-{name}': data for name, data in PHOTOS.items()},
              **{f'gs://shards/in/00000.tar#{name}': data for name, data in members.items()},
              **{f's3://gzshards/in/train-00001.tfrecord.gz#{name}': data
                 for name, data in zip(tfrecord_names(), photos)},
              **{f's3://gzshards/in/photos.tar.gz#{name}': data
                 for name, data in gz_members.items()}}
  embedded = _embedded(output, tmp_path)
  assert {uri: sha for uri, (sha, _) in embedded.items()} == {
      uri: _sha(data) for uri, data in expected.items()}
  assert summary['matched'] == 6 + 8 + 6 + 7
  assert summary['failed_by_stage'] == {'read': 1, 'decode': 2, 'inference': 0}
  [cut] = [f for f in read_failures(output) if f['stage'] == 'read']
  assert cut['uri'] == 'gs://shards/in/00000.tar' and f'at byte {cut_at} ' in cut['message']
  index = {row['uri']: row for row in _index(output).to_pylist()}
  for uri in expected:
    ranged = (index[uri]['byte_offset'], index[uri]['byte_length'])
    if '00000.tar#' in uri:
      assert read_image_bytes(uri, *ranged) == expected[uri]
    else:
      assert ranged == (None, None)
  assert read_image_bytes('gs://shards/in/00000.parquet#id-camera.png') == PHOTOS['camera.png']
  assert read_image_bytes('s3://gzshards/in/train-00001.tfrecord.gz#record=3') == photos[3]
  assert read_image_bytes('s3://gzshards/in/photos.tar.gz#000002.png') == photos[2]
  assert sheet.thumbnail_of('gs://shards/in/00000.tar#000001.png') is not None


@pytest.mark.parametrize('args, flag', [
    (['--input_format=files', '--image_column=image'], '--image_column'),
    (['--input_format=webdataset', '--key_column=id'], '--key_column'),
    (['--input_format=parquet', '--image_feature=image/jpeg'], '--image_feature'),
])
def test_a_flag_for_a_format_not_read_is_refused_before_any_work(args, flag, tmp_path):
  with pytest.raises(OptionsError, match=flag):
    run([f'--input={SAMPLE_IMAGES}', f'--output={tmp_path}/out', TINY] + args)
  assert not (tmp_path / 'out').exists()


def test_listings_keep_the_shards_the_format_reads(tmp_path):
  for name in ('a.tar', 'b.parquet', 'c.tfrecord.gz', 'd.jpg', 'e.txt', 'f.tar.gz'):
    (tmp_path / name).write_bytes(b'x')

  def listed(input_format):
    listing = plan_listing(str(tmp_path), shard_suffixes=ShardInputs(input_format).suffixes)
    return sorted(os.path.basename(ref.uri) for page in list_sequentially(listing)
                  for ref in page.refs)

  assert listed('auto') == ['a.tar', 'b.parquet', 'c.tfrecord.gz', 'd.jpg', 'f.tar.gz']
  assert listed('webdataset') == ['a.tar', 'd.jpg', 'f.tar.gz']
  assert listed('files') == ['d.jpg']
  extensionless = 'gs://b/train-00000-of-01024'
  assert ShardInputs('tfrecord').format_of(extensionless).kind == 'tfrecord'
  assert ShardInputs('auto').format_of(extensionless) is None
  assert ShardInputs('files').format_of('gs://b/a.tar') is None
  assert ShardInputs('auto').format_of('gs://b/A.TGZ').kind == 'webdataset'


def test_member_uris_and_names():
  assert split_member_uri('gs://b/s/00017.tar#000123.jpg') == ('gs://b/s/00017.tar', '000123.jpg')
  assert split_member_uri('gs://b/x#y.TAR#dir/a#b.jpg') == ('gs://b/x#y.TAR', 'dir/a#b.jpg')
  assert split_member_uri('/photos/a#b.jpg') is None
  assert split_member_uri('/s/t.tfrecord.gz#record=4') == ('/s/t.tfrecord.gz', 'record=4')
  assert [is_image_member(n) for n in ('000.jpg', './000.png', 'a/000', '000.txt', '000.cls',
                                       '000.json', '._000.jpg', 'a/.hidden.jpg')] == [
      True, True, True, False, False, False, False, False]


def test_examples_are_parsed_without_tensorflow_as_tensorflow_writes_them():
  import tensorflow as tf
  example = tf.train.Example(features=tf.train.Features(feature={
      'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'\x00\xff' * 300])),
      'image/filename': tf.train.Feature(bytes_list=tf.train.BytesList(value=['é.jpg'.encode()])),
      'image/height': tf.train.Feature(int64_list=tf.train.Int64List(value=[2**40, 3])),
      'score': tf.train.Feature(float_list=tf.train.FloatList(value=[0.5]))}))
  assert example_bytes_features(example.SerializeToString()) == {
      'image/encoded': b'\x00\xff' * 300, 'image/filename': 'é.jpg'.encode()}


def test_a_tfrecord_cut_short_keeps_its_first_records(tmp_path):
  whole = gzip.decompress(tfrecord_of_examples(compressed=True))
  path = tmp_path / 'cut.tfrecord'
  path.write_bytes(whole[:len(whole) * 2 // 3])  # inside the fourth record
  read = []
  with pytest.raises(OSError) as raised:
    for member in iter_members(str(path), ShardFormat('tfrecord')):
      read.append(member.name)
  assert read == tfrecord_names()[:3]
  start = sum(len(data) for data in list(PHOTOS.values())[:3])
  assert raised.value.members_read == 3 and raised.value.byte_offset > start
  assert f'at byte {raised.value.byte_offset} (record 3)' in str(raised.value)


def test_a_member_too_large_or_with_a_name_no_output_can_hold_fails_alone(tmp_path):
  """The shard reader's own outputs: each odd member is its own read failure, the others read."""
  from transforms.listing import FileRef
  from transforms.shards import MEMBERS_TAG, _ReadFileOrShard
  path = tmp_path / 'odd.tar'
  with tarfile.open(path, 'w', encoding='utf-8', errors='surrogateescape') as archive:
    _add(archive, 'big.jpg', PHOTOS['astronaut.png'])
    _add(archive, b'bad\xff.jpg'.decode('utf-8', 'surrogateescape'), PHOTOS['rocket.jpg'])
    _add(archive, 'fine.jpg', PHOTOS['rocket.jpg'])
  ref = FileRef(str(path), path.stat().st_size, 1_700_000_000_000_000, 'etag:"x"')
  outputs = list(_ReadFileOrShard(ShardInputs(), 200_000).process(ref))
  members = [o.value for o in outputs if getattr(o, 'tag', None) == MEMBERS_TAG]
  failures = {o.value.uri: o.value for o in outputs if getattr(o, 'tag', None) == 'failures'}
  [image] = [o for o in outputs if not hasattr(o, 'tag')]
  assert members == [f'{path}#big.jpg', f'{path}#bad\\xff.jpg', f'{path}#fine.jpg']
  assert failures[f'{path}#big.jpg'].error == 'FileTooLargeError'
  assert failures[f'{path}#bad\\xff.jpg'].error == 'UnicodeEncodeError'
  assert (image.uri, image.data, image.content_id, image.shard_size_bytes) == (
      f'{path}#fine.jpg', PHOTOS['rocket.jpg'], 'etag:"x"', ref.size_bytes)
  assert path.read_bytes()[image.byte_offset:image.byte_offset + image.byte_length] == image.data


def test_nights_over_shards_skip_an_unchanged_shard_whole_and_replace_a_changed_ones_members(
    tmp_path):
  """With --collection, a shard's members are decided by their shard: night 2, nothing changed,
  skips every member and commits nothing; night 3, one shard rewritten with one member fewer,
  skips the other's members, embeds the rewritten one's, and the collection holds exactly the
  current members, each once."""

  def tar_of(names):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as archive:
      for number, name in enumerate(names):
        _add(archive, f'{number:06d}.{name.rsplit(".", 1)[1]}', PHOTOS[name])
    return buffer.getvalue()

  shards = tmp_path / 'shards'
  shards.mkdir()
  (shards / '00000.tar').write_bytes(tar_of(['astronaut.png', 'camera.png']))
  (shards / '00001.tar').write_bytes(tar_of(['chelsea.png', 'coffee.png', 'rocket.jpg']))
  uri = str(tmp_path / 'collection')

  def night(number):
    return run([f'--input={shards}', TINY, f'--output={tmp_path}/runs/{number}',
                f'--collection={uri}'])

  def held():
    rows = collection.open_collection(uri).dataset.to_table(columns=['uri']).column('uri')
    return sorted(rows.to_pylist())

  first = night(1)
  assert (first['matched'], first['embedded']) == (5, 5) and len(held()) == 5
  second = night(2)
  assert (second['skipped'], second['embedded'], second['collection_version']) == (5, 0, None)
  assert len(held()) == 5
  (shards / '00001.tar').write_bytes(tar_of(['chelsea.png', 'coffee.png']))
  third = night(3)
  assert (third['skipped'], third['embedded'], third['collection_removed']) == (2, 2, 3)
  assert held() == sorted([f'{shards}/00000.tar#000000.png', f'{shards}/00000.tar#000001.png',
                           f'{shards}/00001.tar#000000.png', f'{shards}/00001.tar#000001.png'])
