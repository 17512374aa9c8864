"""The default model's path for real: a hub on loopback serves a compressed TF1-Hub-format module.

`--model http://127.0.0.1:PORT/...` goes through tensorflow_hub's own resolver, as the TF-Hub
default does: download with `?tf-hub-format=compressed`, unpack, cache in TFHUB_CACHE_DIR. Baking
the model into the worker image relies on exactly that cache.
"""

import glob
import http.server
import io
import os
import tarfile
import threading

import pytest

from commands.embed import main
from tests.conftest import SAMPLE_IMAGES


class _Hub(http.server.ThreadingHTTPServer):
  """Serves one module archive at /modules/tiny (whole), /cut (sends half of it and hangs up),
  /truncated (a whole response of half the archive); anything else is 404. Counts requests."""

  def __init__(self, archive: bytes):
    self.archive = archive
    self.requests = []
    super().__init__(('127.0.0.1', 0), _HubHandler)

  def url(self, name: str) -> str:
    return f'http://127.0.0.1:{self.server_address[1]}/modules/{name}'


class _HubHandler(http.server.BaseHTTPRequestHandler):

  def do_GET(self):  # noqa: N802  (http.server's name)
    hub = self.server
    hub.requests.append(self.path)
    name, _, query = self.path.partition('?')
    body = {'/modules/tiny': hub.archive, '/modules/cut': hub.archive,
            '/modules/truncated': hub.archive[:len(hub.archive) // 2]}.get(name)
    if body is None or query != 'tf-hub-format=compressed':
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header('Content-Type', 'application/x-tar')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body[:len(body) // 2] if name == '/modules/cut' else body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def hub(tf1_hub_module):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as archive:  # as hubs serve modules: no top dir
    for name in sorted(os.listdir(tf1_hub_module)):
      archive.add(os.path.join(tf1_hub_module, name), arcname=name)
  server = _Hub(buffer.getvalue())
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  cache = tmp_path / 'tfhub_cache'
  monkeypatch.setenv('TFHUB_CACHE_DIR', str(cache))
  return cache


def _run(model: str, output) -> None:
  main([f'--input={SAMPLE_IMAGES}/chelsea.png', f'--output={output}', f'--model={model}'])


def test_module_is_downloaded_once_then_served_from_the_cache(hub, hub_cache, tmp_path):
  handle = hub.url('tiny')
  before = len(hub.requests)
  _run(handle, tmp_path / 'run1')
  assert hub.requests[before:] == ['/modules/tiny?tf-hub-format=compressed']
  assert glob.glob(str(hub_cache / '*' / 'saved_model.pb'))
  _run(handle, tmp_path / 'run2')  # a second run with the same cache: no second download
  assert len(hub.requests) == before + 1
  for run in ('run1', 'run2'):
    assert os.path.getsize(glob.glob(str(tmp_path / run / 'embeddings-*'))[0]) > 0


@pytest.mark.parametrize('name, message', [
    ('truncated', 'is not a complete module archive'),
    ('cut', 'is not a complete module archive'),
    ('missing', 'the server answered HTTP 404'),
])
def test_broken_download_stops_before_any_work_and_caches_nothing(name, message, hub, hub_cache,
                                                                   tmp_path, capsys):
  output = tmp_path / 'run'
  with pytest.raises(SystemExit) as exit_info:
    _run(hub.url(name), output)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert message in error and hub.url(name) in error
  assert not output.exists()
  cached = [p for p in glob.glob(str(hub_cache / '*')) if os.path.isdir(p)]
  assert cached == []  # nothing half-unpacked is left for the next run to trust
