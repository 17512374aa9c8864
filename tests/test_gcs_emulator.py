"""Beam's gs:// FileSystem against a real local GCS server (tests/gcs_emulator.py).

Nothing is mocked: every call goes over HTTP to the gcp-storage-emulator
server on 127.0.0.1.
"""

import json
import os
import socket
import threading
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.io import fileio
from apache_beam.io import tfrecordio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from tests.gcs_emulator import GcsEmulator


@pytest.fixture
def bucket(gcs_server):
  """A fresh bucket per test, so the session-wide server needs no wiping."""
  name = 'test-%s' % uuid.uuid4().hex[:12]
  gcs_server.create_bucket(name)
  return name


def _image_bytes(i):
  # Distinct sizes so that a size mix-up is caught.
  return bytes([i % 251]) * (1000 + 137 * i)


def _upload_images(gcs_server, bucket, count, extension):
  """Uploads img0..img{count-1} under images/; returns {uri: size}."""
  expected = {}
  for i in range(count):
    uri = 'gs://%s/images/img%d.%s' % (bucket, i, extension)
    content_type = 'image/jpeg' if extension == 'jpg' else 'image/' + extension
    gcs_server.upload(uri, _image_bytes(i), content_type=content_type)
    expected[uri] = len(_image_bytes(i))
  return expected


def _read_tfrecords(path):
  """All records of one TFRecord file read through Beam's FileSystems (CRCs checked)."""
  records = []
  with FileSystems.open(path) as f:  # compression from the suffix (.gz → gzip)
    while True:
      record = tfrecordio._TFRecordUtil.read_record(f)
      if record is None:
        return records
      records.append(record)


def test_fixture_env_and_helpers(gcs_server, bucket):
  import google.auth

  assert gcs_server.host == 'http://127.0.0.1:%d' % gcs_server.port
  assert os.environ['STORAGE_EMULATOR_HOST'] == gcs_server.host
  # What Beam's GcsIO calls: answers at once with valid, never-refreshed
  # credentials (no metadata-server probe, no token request).
  start = time.monotonic()
  creds, project = google.auth.default(
      scopes=['https://www.googleapis.com/auth/devstorage.full_control'])
  assert time.monotonic() - start < 1
  assert creds.valid and not creds.expired
  assert project == gcs_server.project

  assert gcs_server.create_bucket(bucket).name == bucket  # idempotent
  gcs_server.upload('gs://%s/a/one.bin' % bucket, b'\x00\x01\x02')
  gcs_server.upload('gs://%s/a/b/two.txt' % bucket, 'two')
  gcs_server.upload('gs://%s/c.txt' % bucket, b'c')
  assert gcs_server.download('gs://%s/a/one.bin' % bucket) == b'\x00\x01\x02'
  assert gcs_server.list('gs://%s/a/' % bucket) == [
      'gs://%s/a/b/two.txt' % bucket, 'gs://%s/a/one.bin' % bucket
  ]
  assert len(gcs_server.list('gs://%s' % bucket)) == 3
  assert gcs_server.sizes('gs://%s/c' % bucket) == {'gs://%s/c.txt' % bucket: 1}


def test_match_finds_uploaded_files_with_sizes(gcs_server, bucket):
  expected = _upload_images(gcs_server, bucket, 3, 'png')
  gcs_server.upload('gs://%s/images/other.jpg' % bucket, b'jpg')
  gcs_server.upload('gs://%s/images/sub/deep.png' % bucket, b'deep')
  gcs_server.upload('gs://%s/images.png' % bucket, b'not under images/')

  result = FileSystems.match(['gs://%s/images/*.png' % bucket])[0]
  assert {m.path: m.size_in_bytes for m in result.metadata_list} == expected
  now = time.time()
  for m in result.metadata_list:
    assert abs(m.last_updated_in_seconds - now) < 600

  recursive = FileSystems.match(['gs://%s/images/**.png' % bucket])[0]
  assert len(recursive.metadata_list) == 4
  limited = FileSystems.match(['gs://%s/images/*' % bucket], limits=[1])[0]
  assert len(limited.metadata_list) == 1
  assert FileSystems.match(['gs://%s/nothing/*.png' % bucket])[0].metadata_list == []
  assert FileSystems.exists('gs://%s/images/img0.png' % bucket)
  assert not FileSystems.exists('gs://%s/images/missing.png' % bucket)


def test_missing_bucket_is_an_error_not_an_empty_match(gcs_server):
  # As on real GCS: listing a bucket that does not exist is a 404.
  with pytest.raises(BeamIOError, match='NotFound'):
    FileSystems.match(['gs://no-such-bucket-%s/images/*.jpg' % uuid.uuid4().hex])


def test_open_reads_bytes_back(gcs_server, bucket):
  data = os.urandom(300 * 1024)
  uri = 'gs://%s/images/photo.jpg' % bucket
  gcs_server.upload(uri, data, content_type='image/jpeg')
  with FileSystems.open(uri) as f:
    assert f.read() == data
  with FileSystems.open(uri) as f:  # ranged reads
    f.seek(1000)
    assert f.read(10) == data[1000:1010]
  with FileSystems.open(
      uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    assert f.read() == data


def test_create_rename_delete(gcs_server, bucket):
  summary = 'gs://%s/out/summary.json' % bucket
  with FileSystems.create(summary, mime_type='application/json') as f:
    f.write(json.dumps({'images': 3}).encode())
  assert json.loads(gcs_server.download(summary)) == {'images': 3}

  # Larger than BeamBlobWriter's 16 MiB chunk: a multi-chunk resumable upload.
  big = os.urandom(17 * 1024 * 1024)
  big_uri = 'gs://%s/out/big.bin' % bucket
  with FileSystems.create(big_uri) as f:
    f.write(big)
  assert gcs_server.sizes(big_uri) == {big_uri: len(big)}
  assert gcs_server.download(big_uri) == big
  with FileSystems.open(big_uri) as f:  # a read spanning two 16 MiB chunks
    assert f.read() == big

  # What the file sinks do at finalization: rename = copy + delete (batched).
  FileSystems.rename([summary], ['gs://%s/out/final.json' % bucket])
  FileSystems.delete([big_uri])
  assert gcs_server.list('gs://%s/out/' % bucket) == [
      'gs://%s/out/final.json' % bucket
  ]
  assert FileSystems.checksum('gs://%s/out/final.json' % bucket)


class _WriteSummary(beam.DoFn):
  def __init__(self, path):
    self._path = path

  def process(self, total_bytes_and_count):
    total_bytes, count = total_bytes_and_count
    with FileSystems.create(self._path, mime_type='application/json') as f:
      f.write(json.dumps({'images': count, 'bytes': total_bytes}).encode())
    yield self._path


def _run_pipeline(bucket, extra_args):
  out = 'gs://%s/out' % bucket
  options = PipelineOptions(['--runner=DirectRunner'] + extra_args)
  with beam.Pipeline(options=options) as p:
    sizes = (
        p
        | fileio.MatchFiles('gs://%s/images/*.jpg' % bucket)
        | fileio.ReadMatches()
        | beam.Map(lambda f: (f.metadata.path, len(f.read()))))
    _ = (
        sizes
        | 'Format' >> beam.MapTuple(lambda path, n: '%s\t%d' % (path, n))
        | beam.io.WriteToText(out + '/sizes', file_name_suffix='.txt'))
    records = sizes | beam.MapTuple(lambda path, n: ('%s:%d' % (path, n)).encode())
    _ = records | 'Plain' >> beam.io.WriteToTFRecord(
        out + '/plain', file_name_suffix='.tfrecord', num_shards=2)
    _ = records | 'Gzip' >> beam.io.WriteToTFRecord(
        out + '/gz',
        file_name_suffix='.tfrecord.gz',
        compression_type=CompressionTypes.GZIP)
    _ = (
        sizes
        | beam.Map(lambda kv: (kv[1], 1))
        | beam.CombineGlobally(
            lambda pairs: tuple(map(sum, zip(*pairs))) or (0, 0))
        | beam.ParDo(_WriteSummary(out + '/summary.json')))
  return out


@pytest.mark.parametrize(
    'extra_args',
    [
        [],
        ['--direct_running_mode=multi_processing', '--direct_num_workers=2'],
    ],
    ids=['in_memory', 'multi_processing'])
def test_pipeline_reads_and_writes_gcs(gcs_server, bucket, extra_args):
  expected = _upload_images(gcs_server, bucket, 5, 'jpg')
  gcs_server.upload('gs://%s/images/skip.png' % bucket, b'not a jpg')

  out = _run_pipeline(bucket, extra_args)

  outputs = gcs_server.list(out + '/')
  # Temp files of the sinks were renamed and cleaned up (copy + batch delete).
  assert not [u for u in outputs if 'beam-temp' in u], outputs
  text_shards = [u for u in outputs if u.endswith('.txt')]
  plain_shards = [u for u in outputs if u.endswith('.tfrecord')]
  gz_shards = [u for u in outputs if u.endswith('.tfrecord.gz')]
  assert text_shards and gz_shards
  assert plain_shards == [
      out + '/plain-00000-of-00002.tfrecord',
      out + '/plain-00001-of-00002.tfrecord'
  ]
  assert len(outputs) == len(text_shards + plain_shards + gz_shards) + 1

  lines = []
  for uri in text_shards:
    lines += gcs_server.download(uri).decode().splitlines()
  assert dict((p, int(n)) for p, n in (l.split('\t') for l in lines)) == expected

  want_records = sorted(('%s:%d' % kv).encode() for kv in expected.items())
  plain = [r for uri in plain_shards for r in _read_tfrecords(uri)]
  assert sorted(plain) == want_records
  for uri in gz_shards:
    assert gcs_server.download(uri)[:2] == b'\x1f\x8b'  # really gzip on the server
  gz = [r for uri in gz_shards for r in _read_tfrecords(uri)]
  assert sorted(gz) == want_records

  summary = json.loads(gcs_server.download(out + '/summary.json'))
  assert summary == {'images': 5, 'bytes': sum(expected.values())}


def test_emulator_stops_cleanly_and_restores_env(gcs_server):
  before_env = {k: os.environ.get(k) for k in gcs_server.env}
  threads_before = set(threading.enumerate())
  with GcsEmulator() as other:
    assert other.port != gcs_server.port
    assert os.environ['STORAGE_EMULATOR_HOST'] == other.host
    other.create_bucket('x')
    other.upload('gs://x/y', b'z')
    assert other.list('gs://x') == ['gs://x/y']
    other.reset()  # wipes objects, keeps buckets
    assert other.list('gs://x') == []
    other.upload('gs://x/y', b'z')
    adc = os.environ['GOOGLE_APPLICATION_CREDENTIALS']
    port = other.port
  assert {k: os.environ.get(k) for k in gcs_server.env} == before_env
  assert not os.path.exists(adc)
  assert set(threading.enumerate()) <= threads_before
  with pytest.raises(OSError):
    socket.create_connection(('127.0.0.1', port), timeout=1).close()
  other.stop()  # idempotent
