"""The collection against a plain-Python model of the bucket it follows (hypothesis'
RuleBasedStateMachine): random sequences of objects added, changed, broken, deleted and renamed in
a bucket on the tests' S3 server, a prefix that cannot be listed (a 403 from the fault proxy in
front of it), nights (real pipeline runs with the tiny network), a night that fails, a stale
commit, compaction, cleanup and deleted run directories. After every step the collection holds,
for each image, the vector of its current bytes, and nothing for an object that is gone or whose
current bytes do not decode; a prefix that could not be listed keeps what it had.

The CI budget is a few nights per example; `benchmarks/bench_collection_model.py --steps N`
runs longer sequences.
"""

import datetime
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from PIL import Image

import collection
from pipeline.launcher import TooManyFailuresError, run
from transforms.read import NoInputError
from tests.fault_proxy import FaultProxy, FaultRule

NAMES = ('a.png', 'b.png', 'sub/c.png', 'sub/d.png', 'e.png')
LOCKABLE = 'sub/'
_SERVER = {}  # the S3 server and the proxy in front of it, for the machine's examples


@pytest.fixture(scope='module', autouse=True)
def s3_behind_a_proxy(s3_server):
  with FaultProxy(s3_server.endpoint) as proxy:
    _SERVER.update(s3=s3_server, proxy=proxy,
                   options=[o.replace(s3_server.endpoint, proxy.url) for o in s3_server.options])
    yield


def _png(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class NightlyCollection(RuleBasedStateMachine):
  """`files`: name -> bytes in the folder; `expected`: URI -> sha256 the collection must hold."""

  def __init__(self):
    super().__init__()
    self.work = tempfile.mkdtemp(prefix='collection-model-')
    self.s3, self.proxy = _SERVER['s3'], _SERVER['proxy']
    bucket = f'model-{uuid.uuid4().hex[:10]}'
    self.s3.create_bucket(bucket)
    self.folder = f's3://{bucket}/photos'
    self.lock = FaultRule('^' + re.escape(f'{bucket}/photos/{LOCKABLE}'), 403, kinds=['list'])
    self.uri = os.path.join(self.work, 'collection')
    self.files = {}
    self.expected = {}
    self.locked = False
    self.nights = 0
    self.vectors = {}  # sha256 -> the vector first seen for those bytes

  def teardown(self):
    if self.lock in self.proxy.rules:
      self.proxy.rules.remove(self.lock)
    shutil.rmtree(self.work, ignore_errors=True)

  def _path(self, name: str) -> str:
    return f'{self.folder}/{name}'

  def _put(self, name: str, data: bytes) -> None:
    self.files[name] = data
    self.s3.upload(self._path(name), data)

  def _remove(self, name: str) -> None:
    bucket, key = self._path(name)[len('s3://'):].split('/', 1)
    self.s3.client.delete_object(Bucket=bucket, Key=key)
    del self.files[name]

  @rule(name=st.sampled_from(NAMES), seed=st.integers(0, 5))
  def write_image(self, name, seed):
    self._put(name, _png(seed))

  @rule(name=st.sampled_from(NAMES))
  def break_image(self, name):
    self._put(name, b'not an image at all')

  @rule(name=st.sampled_from(NAMES))
  def delete(self, name):
    if name in self.files:
      self._remove(name)

  @rule(source=st.sampled_from(NAMES), destination=st.sampled_from(NAMES))
  def rename(self, source, destination):
    if source in self.files and source != destination:
      data = self.files[source]
      self._remove(source)
      self._put(destination, data)

  @rule()
  def toggle_lock(self):
    """The prefix `photos/sub/` cannot be listed (a 403) until toggled back; its objects may
    still change meanwhile."""
    self.locked = not self.locked
    if self.locked:
      self.proxy.rules.append(self.lock)
    else:
      self.proxy.rules.remove(self.lock)

  def _run(self, *flags) -> bool:
    """Whether the night ran: one whose inputs hold nothing listable is refused at launch (no
    file matches, or the only folder cannot be listed), before any work."""
    self.nights += 1
    try:
      run([f'--input={self.folder}', '--model=builtin:pnasnet_tiny',
           f'--output={self.work}/runs/{self.nights}', f'--collection={self.uri}',
           '--max_failed_fraction=1'] + _SERVER['options'] + list(flags))
    except NoInputError:
      return False
    return True

  def _hidden(self, uri: str) -> bool:
    return self.locked and uri.startswith(self._path(LOCKABLE))

  @rule()
  def night(self):
    if not self._run():
      return
    kept = {uri: sha for uri, sha in self.expected.items() if self._hidden(uri)}
    self.expected = {self._path(name): _sha256(data) for name, data in self.files.items()
                     if data.startswith(b'\x89PNG') and not self._hidden(self._path(name))}
    self.expected.update(kept)

  @rule()
  def failing_night(self):
    """Every file fails (a pixel limit below every image) and failures may not pass: the night
    ends `too_many_failures` and commits nothing."""
    try:
      self._run('--max_image_pixels=1', '--max_failed_fraction=0')
    except TooManyFailuresError:
      pass  # the outcome it must end with when any image matched

  @precondition(lambda self: os.path.isdir(self.uri))
  @rule()
  def stale_commit(self):
    """A night that read an older version than the latest night's commits nothing."""
    latest = collection.open_collection(self.uri)
    nights = [entry.version for entry in collection.history(self.uri) if entry.kind == 'night']
    if not nights:
      return
    try:
      collection.commit_night(self.uri, collection.NightChanges('stale', nights[-1] - 1, [], []))
    except collection.ConcurrentNightError:
      assert collection.open_collection(self.uri).version == latest.version
    else:
      raise AssertionError('a stale night committed')

  @precondition(lambda self: os.path.isdir(self.uri))
  @rule()
  def compact(self):
    collection.compact(self.uri)

  @precondition(lambda self: os.path.isdir(self.uri))
  @rule()
  def clean_up_and_delete_old_runs(self):
    collection.cleanup(self.uri, datetime.timedelta(0))
    for name in os.listdir(os.path.join(self.work, 'runs')):
      if int(name) < self.nights:
        shutil.rmtree(os.path.join(self.work, 'runs', name))

  @invariant()
  def the_collection_is_the_folder(self):
    try:
      snapshot = collection.open_collection(self.uri)
    except collection.CollectionNotFoundError:
      assert not self.expected
      return
    held = {}
    for batch in snapshot.batches(['uri', 'sha256', 'embedding']):
      vectors = np.stack(batch.column('embedding').to_numpy(zero_copy_only=False))
      for uri, sha, vector in zip(batch.column('uri').to_pylist(),
                                  batch.column('sha256').to_pylist(), vectors):
        assert uri not in held, f'{uri} twice'
        held[uri] = sha
        seen = self.vectors.setdefault(sha, vector)
        np.testing.assert_allclose(vector, seen, rtol=1e-3, atol=1e-3)
    assert held == self.expected


NightlyCollection.TestCase.settings = settings(
    max_examples=int(os.environ.get('COLLECTION_MODEL_EXAMPLES', 2)),
    stateful_step_count=int(os.environ.get('COLLECTION_MODEL_STEPS', 12)), deadline=None,
    suppress_health_check=list(HealthCheck), derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate])  # a failure prints its steps unshrunk
TestNightlyCollection = NightlyCollection.TestCase
