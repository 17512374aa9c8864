"""Storage that misbehaves: the pipeline between a fault-injecting proxy and real local servers.

Every test runs on gs:// (the local GCS server, reached through STORAGE_EMULATOR_HOST) and s3://
(the local S3 server, reached through --s3_endpoint_url), with the proxy of tests/fault_proxy.py
in between. The retries are the storage clients' own (see docs/reliability.md): the only
setting tuned is boto3's attempt count, through its documented AWS_MAX_ATTEMPTS variable: with
its default of 3 attempts, a store failing one request in five fails 1 request in 125 for good.
"""

import collections
import io
import json
import uuid

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.tfrecordio import _TFRecordUtil
from PIL import Image

from pipeline.launcher import run
from run_format import SUMMARY_FILE
from tests.fault_proxy import FaultProxy, FaultRule

IMAGES = 8
BROKEN = 'notes.jpg'  # also keeps the failures shard non-empty (an empty one breaks S3 writes)
S3_MAX_ATTEMPTS = '10'


def _png(index: int) -> bytes:
  pixels = np.random.default_rng(index).integers(0, 256, (24 + index, 32, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


class _Store:
  """One bucket on one service, seeded with images; reads bypass the proxy."""

  def __init__(self, scheme, server):
    self.scheme = scheme
    self.server = server
    self.bucket = f'faults-{uuid.uuid4().hex[:12]}'
    server.create_bucket(self.bucket)
    self.root = f'{scheme}://{self.bucket}'
    self.images = {f'{self.root}/photos/img{i}.png': _png(i) for i in range(IMAGES)}
    self.broken = f'{self.root}/photos/{BROKEN}'
    for uri, data in self.images.items():
      server.upload(uri, data)
    server.upload(self.broken, b'this is not an image\n')

  @property
  def upstream(self) -> str:
    return self.server.host if self.scheme == 'gs' else self.server.endpoint

  def route_through(self, proxy: FaultProxy, monkeypatch) -> list:
    """The run's extra arguments (and environment) that send its storage calls to the proxy."""
    if self.scheme == 'gs':
      monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
      return []
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', S3_MAX_ATTEMPTS)
    return [o.replace(self.server.endpoint, proxy.url) for o in self.server.options]

  def list(self, prefix: str) -> list:
    return self.server.list(prefix)

  def read(self, uri: str) -> bytes:
    if self.scheme == 'gs':
      return self.server.download(uri)
    bucket, key = uri[len('s3://'):].split('/', 1)
    return self.server.client.get_object(Bucket=bucket, Key=key)['Body'].read()


@pytest.fixture(params=['gs', 's3'])
def store(request):
  server = request.getfixturevalue('gcs_server' if request.param == 'gs' else 's3_server')
  return _Store(request.param, server)


def _run(store, proxy, monkeypatch, output, extra=()):
  argv = [f'--input={store.root}/photos/*', f'--output={output}',
          '--model=builtin:pnasnet_tiny', '--max_batch_size=4'] + list(extra)
  return run(argv + store.route_through(proxy, monkeypatch))


def _embedded_uris(store, output) -> collections.Counter:
  uris = collections.Counter()
  for shard in store.list(f'{output}/embeddings-'):
    stream = io.BytesIO(store.read(shard))
    while (record := _TFRecordUtil.read_record(stream)) is not None:
      example = tf.train.Example.FromString(record)
      uris[example.features.feature['image/uri'].bytes_list.value[0].decode()] += 1
  return uris


def _failures(store, output) -> dict:
  lines = [json.loads(line) for shard in store.list(f'{output}/failures-')
           for line in store.read(shard).decode().splitlines() if line]
  assert len({f['uri'] for f in lines}) == len(lines), 'an image dead-lettered twice'
  return {f['uri']: f for f in lines}


def _check_finished(store, output, expected_embedded, expected_failed_by_stage):
  """The contract of a finished run: summary, shards and counts agree, each image once."""
  summary = json.loads(store.read(f'{output}/{SUMMARY_FILE}'))
  written = store.list(f'{output}/')
  assert not [uri for uri in written if 'temp' in uri], written
  if 'files' in summary:
    assert all(any(uri.endswith(name) for uri in written) for name in summary['files'])
  embedded = _embedded_uris(store, output)
  assert set(embedded) == set(expected_embedded) and set(embedded.values()) == {1}, embedded
  failures = _failures(store, output)
  assert {uri: f['stage'] for uri, f in failures.items()} == {
      uri: stage for stage, uris in expected_failed_by_stage.items() for uri in uris}
  assert summary['matched'] == IMAGES + 1
  assert summary['embedded'] == len(expected_embedded)
  assert summary['failed'] == len(failures) == IMAGES + 1 - len(expected_embedded)
  for stage, uris in expected_failed_by_stage.items():
    assert summary['failed_by_stage'][stage] == len(uris)
  return failures


def test_transient_faults_on_one_request_in_five_lose_nothing(store, monkeypatch):
  """429, 500, 503, resets and stalls on listing, reads and writes: absorbed by the clients."""
  output = f'{store.root}/runs/transient'
  # The first listing, the first object read and the first output write fail for certain; after
  # that one request in five, seeded.
  first_of_each = [FaultRule('', 503, kinds=['list'], times=1),
                   FaultRule('/photos/', 'reset', kinds=['read'], times=1),
                   FaultRule('/runs/', 500, kinds=['write'], times=1)]
  with FaultProxy(store.upstream, rate=0.2, rules=first_of_each, seed=11) as proxy:
    summary = _run(store, proxy, monkeypatch, output)
  print(f'{store.scheme}: {proxy.total_faults} of {proxy.total_requests} requests faulted: '
        f'{dict(proxy.faults)}')
  assert all(proxy.faults_of(kind) for kind in ('list', 'read', 'write')), proxy.faults
  assert proxy.total_faults >= 0.1 * proxy.total_requests
  _check_finished(store, output, store.images, {'decode': [store.broken]})
  assert summary['embedded'] == IMAGES


def test_objects_that_cannot_be_read_are_dead_lettered_at_read(store, monkeypatch):
  output = f'{store.root}/runs/forbidden'
  unreadable = sorted(store.images)[:2]
  rules = [FaultRule(uri.split('://', 1)[1] + '$', 403, kinds=['read']) for uri in unreadable]
  with FaultProxy(store.upstream, rules=rules) as proxy:
    _run(store, proxy, monkeypatch, output)
  readable = [uri for uri in store.images if uri not in unreadable]
  failures = _check_finished(store, output, readable,
                             {'read': unreadable, 'decode': [store.broken]})
  for uri in unreadable:
    assert '403' in failures[uri]['message'] or 'Forbidden' in failures[uri]['error'], \
        failures[uri]


@pytest.mark.parametrize('outage', ['flaky', 'refused'])
def test_output_faults_at_the_end_never_leave_a_summary_beside_missing_shards(
    store, monkeypatch, outage):
  """`flaky`: the first output writes fail (retried); `refused`: finalizing shards is refused.

  Finalizing renames the temporary shards (S3: a copy to the final name; GCS: a batch of
  rewrites), so a persistent fault there fails the run after all the work is done.
  """
  output = f'{store.root}/runs/{outage}'
  if outage == 'flaky':
    proxy = FaultProxy(store.upstream, rules=[FaultRule('/runs/|^batch/', 503, kinds=['write'],
                                                        times=3)])
  else:
    proxy = FaultProxy(store.upstream, rules=[
        FaultRule(r'/embeddings-\d{5}-of-\d{5}|^batch/', 403, kinds=['write'])])
  with proxy:
    try:
      _run(store, proxy, monkeypatch, output)
      failed = None
    except Exception as exc:  # pylint: disable=broad-except  # the outcome is checked below
      failed = exc
  written = store.list(f'{output}/')
  print(f'{store.scheme} {outage}: {proxy.total_faults} of {proxy.total_requests} requests '
        f'faulted; run {"failed: " + repr(failed)[:300] if failed else "finished"}')
  if failed is None:
    _check_finished(store, output, store.images, {'decode': [store.broken]})
  else:
    assert f'{output}/{SUMMARY_FILE}' not in written, written
  assert proxy.total_faults
  if outage == 'refused':
    assert failed is not None, 'the shards could not be finalized, yet the run succeeded'
