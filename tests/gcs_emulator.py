"""A real, local Google Cloud Storage server for tests (no mocks, no network).

Runs the ``gcp-storage-emulator`` package's HTTP server in a background
thread of the test process, bound to ``127.0.0.1`` on a free port, with
in-memory storage, and points every GCS client at it -- including Apache
Beam's ``GcsIO`` (``gs://`` in ``FileSystems``, ``fileio.MatchFiles``,
``WriteToText``, ``WriteToTFRecord``...) and the SDK worker subprocesses of
``--direct_running_mode=multi_processing``, which inherit ``os.environ``.

Usage from ``conftest.py``::

    from tests.gcs_emulator import gcs_server  # noqa: F401  (the fixture)

and then in a test::

    def test_something(gcs_server):
        gcs_server.create_bucket('bucket')
        gcs_server.upload('gs://bucket/images/a.jpg', jpeg_bytes)
        run_pipeline(['--input=gs://bucket/images/*.jpg',
                      '--output=gs://bucket/out/emb'])   # no extra options
        assert gcs_server.list('gs://bucket/out/') == [...]
        data = gcs_server.download('gs://bucket/out/summary.json')

``gcs_server`` is session-scoped: buckets and objects persist across tests,
so use distinct bucket names or prefixes per test, or call
``gcs_server.reset()`` (wipes all objects, keeps the buckets).  Outside pytest
use ``with running_gcs_emulator() as server: ...``.  Importing the fixture
both in conftest.py and in a test module is harmless: all registrations share
one server.  Buckets must be created before use (as on real GCS, listing or
writing into a missing bucket is a 404).  The emulator's HTTP server handles
one request at a time; fine for tests, not a load test.

While the server runs, these environment variables are set in
``os.environ`` (and restored to their previous values afterwards):

* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` -- google-cloud-storage
  (which Beam's ``GcsIO`` uses since 2.52) sends every JSON/upload/download/
  batch request there instead of storage.googleapis.com.
* ``GOOGLE_APPLICATION_CREDENTIALS=<tmp>/adc.json`` -- an ``authorized_user``
  Application Default Credentials file holding a static access token that
  never expires.  Beam's ``GcsIO`` always calls ``google.auth.default()``
  (``apache_beam/internal/gcp/auth.py``; the ``--no_auth`` option is *not*
  consulted by GcsIO).  Without credentials that call fails and Beam retries
  it with exponential backoff (4 retries, ~15-30 s) before falling back to an
  anonymous client -- once in the test process and again in every
  multi_processing worker.  With this file ``google.auth.default()`` returns
  at once, the token is already valid so it is never refreshed (no request to
  oauth2.googleapis.com and no metadata-server probe), and the emulator
  ignores the ``Authorization`` header.
* ``GOOGLE_CLOUD_PROJECT=emulator-project`` -- a project id for any client
  that wants one (``google.auth.default()`` then returns it too); nothing
  here reaches a real project.

Beam pipelines need no extra pipeline options to use the emulator.
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import urllib.request

import pytest

__all__ = ['GcsEmulator', 'running_gcs_emulator', 'gcs_server']

_LOG = logging.getLogger(__name__)

PROJECT = 'emulator-project'

# Application Default Credentials of type "authorized_user" with a static,
# already-valid access token: google.auth loads it without any I/O beyond
# reading the file, and never refreshes it (expiry far in the future).
_ADC = {
    'type': 'authorized_user',
    'client_id': 'gcs-emulator-client',
    'client_secret': 'gcs-emulator-secret',
    'refresh_token': 'gcs-emulator-refresh-token',
    'token': 'gcs-emulator-access-token',
    'expiry': '2999-01-01T00:00:00Z',
}


def _honour_generation_preconditions():
  """Uploads with `ifGenerationMatch=0` fail with 412 when the object exists, as on GCS.

  gcp-storage-emulator ignores preconditions; the pipeline claims its output with one, so the
  server the tests run must refuse the second claim exactly as GCS does.
  """
  from http import HTTPStatus
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  insert = objects.insert
  if getattr(insert, 'honours_preconditions', False):
    return

  def insert_unless_exists(request, response, storage, *args, **kwargs):
    if request.query.get('ifGenerationMatch') == ['0']:
      data = request.data if isinstance(request.data, dict) else {}
      name = (request.query.get('name') or [None])[0] or (data.get('meta') or data).get('name')
      try:
        storage.get_file_obj(request.params['bucket_name'], name)
      except NotFound:
        pass
      else:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
    return insert(request, response, storage, *args, **kwargs)

  insert_unless_exists.honours_preconditions = True
  objects.insert = insert_unless_exists
  server.HANDLERS = tuple(
      (pattern, {method: insert_unless_exists if handler is insert else handler
                 for method, handler in methods.items()})
      for pattern, methods in server.HANDLERS)


def _split_gs_uri(uri):
  if not uri.startswith('gs://'):
    raise ValueError('not a gs:// URI: %r' % (uri,))
  bucket, _, name = uri[len('gs://'):].partition('/')
  if not bucket:
    raise ValueError('no bucket in %r' % (uri,))
  return bucket, name


class GcsEmulator(object):
  """An in-memory GCS server on 127.0.0.1 plus helpers to seed/inspect it.

  Attributes (valid after ``start()``):
    host: base URL, e.g. ``'http://127.0.0.1:40123'`` (the value of
      ``STORAGE_EMULATOR_HOST``).
    port: the TCP port.
    project: project id used for buckets created by ``create_bucket``.
    env: the environment variables this server sets while running.
    client: a ``google.cloud.storage.Client`` bound to the emulator
      (anonymous credentials).
  """
  def __init__(self, project=PROJECT):
    self.project = project
    self.host = None
    self.port = None
    self.env = {}
    self.client = None
    self._server = None
    self._tmpdir = None
    self._saved_env = None
    self._saved_log_level = None

  # -- lifecycle -------------------------------------------------------------

  def start(self):
    if self._server is not None:
      raise RuntimeError('GCS emulator already started')
    from gcp_storage_emulator.server import create_server
    _honour_generation_preconditions()
    # The emulator logs a WARNING for every string response ("Content handled
    # as string, should be handled as stream"); keep its ERRORs only.
    emu_logger = logging.getLogger('gcp_storage_emulator')
    self._saved_log_level = emu_logger.level
    emu_logger.setLevel(logging.ERROR)
    # Port 0: the kernel picks a free port at bind time, so there is no
    # pick-then-bind race.  (A bind failure inside the emulator's thread would
    # leave Server.start() waiting forever.)
    server = create_server('127.0.0.1', 0, in_memory=True)
    server.start()  # returns once the socket is bound and listening
    self._server = server
    try:
      self.port = server._api._httpd.server_address[1]
      self.host = 'http://127.0.0.1:%d' % self.port
      self._tmpdir = tempfile.mkdtemp(prefix='gcs-emulator-')
      adc_path = os.path.join(self._tmpdir, 'adc.json')
      with open(adc_path, 'w') as f:
        json.dump(_ADC, f)
      self.env = {
          'STORAGE_EMULATOR_HOST': self.host,
          'GOOGLE_APPLICATION_CREDENTIALS': adc_path,
          'GOOGLE_CLOUD_PROJECT': self.project,
      }
      self._saved_env = {k: os.environ.get(k) for k in self.env}
      os.environ.update(self.env)
      self._check_alive()
      from google.auth.credentials import AnonymousCredentials
      from google.cloud import storage
      self.client = storage.Client(
          project=self.project, credentials=AnonymousCredentials())
    except BaseException:
      self.stop()
      raise
    return self

  def stop(self):
    """Stops the server thread, restores the environment, removes tmp files.

    Idempotent.
    """
    server, self._server = self._server, None
    if self.client is not None:
      self.client.close()
      self.client = None
    if server is not None:
      api_thread = server._api
      server.stop()  # shutdown() + server_close() of the HTTP server
      # APIThread overrides join() without calling Thread.join(); make sure
      # the thread is really gone so nothing leaks into later tests.
      threading.Thread.join(api_thread, timeout=10)
      if api_thread.is_alive():
        _LOG.warning('GCS emulator thread did not stop')
    if self._saved_env is not None:
      for key, value in self._saved_env.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      self._saved_env = None
    if self._tmpdir is not None:
      shutil.rmtree(self._tmpdir, ignore_errors=True)
      self._tmpdir = None
    if self._saved_log_level is not None:
      logging.getLogger('gcp_storage_emulator').setLevel(self._saved_log_level)
      self._saved_log_level = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.stop()

  def _check_alive(self):
    with urllib.request.urlopen(self.host + '/', timeout=5) as resp:
      if resp.read() != b'OK':
        raise RuntimeError('GCS emulator health check failed')

  # -- helpers ---------------------------------------------------------------

  def reset(self):
    """Deletes every object; buckets are kept."""
    with urllib.request.urlopen(
        self.host + '/wipe?keep-buckets=true', timeout=10) as resp:
      resp.read()

  def create_bucket(self, name):
    """Creates bucket ``name`` (no-op if it exists); returns the Bucket."""
    from google.api_core.exceptions import Conflict
    try:
      return self.client.create_bucket(name)
    except Conflict:
      return self.client.bucket(name)

  def upload(self, gs_uri, data, content_type='application/octet-stream'):
    """Uploads ``data`` (bytes or str) to ``gs://bucket/name``."""
    bucket, name = _split_gs_uri(gs_uri)
    if isinstance(data, str):
      data = data.encode('utf-8')
    self.client.bucket(bucket).blob(name).upload_from_string(
        data, content_type=content_type)

  def download(self, gs_uri):
    """Returns the bytes stored at ``gs://bucket/name`` (raw, not decoded)."""
    bucket, name = _split_gs_uri(gs_uri)
    return self.client.bucket(bucket).blob(name).download_as_bytes(raw_download=True)

  def list(self, prefix_uri):
    """Sorted ``gs://`` URIs of all objects whose name starts with the prefix.

    ``prefix_uri`` is ``gs://bucket`` or ``gs://bucket/some/prefix``; the
    prefix is a plain string prefix (no globbing, recursive).
    """
    bucket, prefix = _split_gs_uri(prefix_uri)
    return sorted(
        'gs://%s/%s' % (bucket, blob.name)
        for blob in self.client.list_blobs(bucket, prefix=prefix or None))

  def sizes(self, prefix_uri):
    """Like ``list`` but returns ``{uri: size_in_bytes}``."""
    bucket, prefix = _split_gs_uri(prefix_uri)
    return {
        'gs://%s/%s' % (bucket, blob.name): blob.size
        for blob in self.client.list_blobs(bucket, prefix=prefix or None)
    }


@contextlib.contextmanager
def running_gcs_emulator(project=PROJECT):
  """Context manager: a started ``GcsEmulator``, stopped on exit."""
  server = GcsEmulator(project=project)
  server.start()
  try:
    yield server
  finally:
    server.stop()


# One server per process, shared by every registration of the fixture: pytest
# makes a separate session fixture for each module that imports ``gcs_server``
# (conftest.py *and* a test module, say); two servers would fight over
# STORAGE_EMULATOR_HOST.
_shared_server = None
_shared_users = 0


@pytest.fixture(scope='session')
def gcs_server():
  """Session-wide local GCS server; see the module docstring."""
  global _shared_server, _shared_users
  if _shared_server is None:
    _shared_server = GcsEmulator().start()
  _shared_users += 1
  try:
    yield _shared_server
  finally:
    _shared_users -= 1
    if _shared_users == 0:
      server, _shared_server = _shared_server, None
      server.stop()
