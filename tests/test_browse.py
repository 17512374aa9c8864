"""embeddings.browse: the page's endpoints over a collection imported from a real run of the tiny
network, served by a real uvicorn on loopback (the model loaded once for the module)."""

import hashlib
import html
import http.client
import io
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

import collection as collection_package
import embeddings
from commands import browse as browse_command
from commands import collection as collection_command
from commands import duplicates as duplicates_command
from embeddings import browse
from embeddings.neighbours import search_vectors
from embeddings.query import embed_image
from embeddings.runs import embedding_run, open_snapshot
from pipeline.launcher import run as run_pipeline
from tests import collection_writer
from tests.conftest import SAMPLE_IMAGES

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD_NAME = 'coffee <grey> & "co" #1 +50% ?.jpg'  # escaped in HTML, quoted in URLs


class Photos:
  """A collection imported from a pipeline run over the sample photos, a byte copy, a resized
  copy and a grey copy with an awkward name, and its duplicate groups."""

  def __init__(self, root):
    self.folder = root / 'images'
    self.folder.mkdir()
    for name in sorted(os.listdir(SAMPLE_IMAGES)):
      if not name.endswith('.md'):
        shutil.copy(os.path.join(SAMPLE_IMAGES, name), self.folder / name)
    shutil.copy(self.folder / 'rocket.jpg', self.folder / 'rocket_copy.jpg')
    with Image.open(self.folder / 'chelsea.png') as chelsea:
      chelsea.convert('RGB').resize((chelsea.width // 2, chelsea.height // 2)).save(
          self.folder / 'chelsea_small.jpg', quality=90)
    with Image.open(self.folder / 'coffee.png') as coffee:
      coffee.convert('L').save(self.folder / ODD_NAME, quality=90)
    run = str(root / 'run')
    run_pipeline([f'--input={self.folder}/*', f'--output={run}', '--model=builtin:pnasnet_tiny'])
    self.collection = str(root / 'collection')
    collection_command.main(['import', '--runs', run, '--collection', self.collection])
    self.csv = str(root / 'dups.csv')
    self.groups = duplicates_command.main(['--collection', self.collection, '--csv', self.csv])
    self.snapshot = open_snapshot(self.collection)
    self.run = embedding_run(self.snapshot)  # how the collection's vectors were made
    self.uris = embeddings.load(self.collection).uris
    # A photo the collection does not hold: embedded when uploaded.
    self.new_photo = str(root / 'astronaut_crop.jpg')
    with Image.open(self.folder / 'astronaut.png') as astronaut:
      astronaut.convert('RGB').crop((60, 0, 460, 400)).save(self.new_photo, quality=92)

  def uri(self, name: str) -> str:
    return str(self.folder / name)

  def exact(self, vector, exclude=()):
    """The URIs exact search gives, nearest first."""
    return [n.uri for n in search_vectors(self.snapshot, vector, browse.DEFAULT_K,
                                          [set(exclude)])[0]]


@pytest.fixture(scope='module')
def collection(tmp_path_factory):
  return Photos(tmp_path_factory.mktemp('browse'))


@pytest.fixture(scope='module')
def browser(collection):
  embedder = browse.ImageEmbedder(collection.run)
  return browse.Browser(collection.snapshot, None, browse.read_duplicates(collection.csv),
                        embedder)


@pytest.fixture(scope='module')
def served(browser):
  server = browse.BackgroundServer(browser)
  yield server.url
  server.stop()


def test_a_search_by_uri_gives_the_exact_neighbours_without_the_query(collection, browser,
                                                                        served):
  query = collection.uri('coffee.png')
  answer = requests.get(f'{served}/api/search', params={'uri': query}, timeout=60).json()
  assert answer['query_uri'] == query and answer['source'] == 'in the collection'
  uris = [n['uri'] for n in answer['neighbours']]
  assert uris == collection.exact(browser.stored_vector(query), [query])
  assert query not in uris and len(uris) == len(browser.catalogue) - 1
  assert [n['rank'] for n in answer['neighbours']] == list(range(1, len(uris) + 1))
  page = requests.get(f'{served}/search', params={'uri': query}, timeout=60)
  assert page.status_code == 200 and f'data-uri="{uris[0]}"' in page.text
  assert '<grey>' not in page.text and 'coffee &lt;grey&gt; &amp; &#34;co&#34;' in page.text


def test_an_upload_of_stored_bytes_takes_the_stored_vector(collection, served):
  with open(collection.uri('rocket.jpg'), 'rb') as f:
    answer = requests.post(f'{served}/api/search', files={'image': ('r.jpg', f)},
                           timeout=60).json()
  assert answer['source'].startswith('same bytes as ')
  top = answer['neighbours'][:2]
  assert {n['uri'] for n in top} == {collection.uri('rocket.jpg'),
                                     collection.uri('rocket_copy.jpg')}
  assert [n['score'] for n in top] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_an_upload_of_a_new_image_is_embedded_by_the_model_loaded_at_start(collection, browser,
                                                                           served, monkeypatch):
  import models.loading

  def no_second_load(*_, **__):
    raise AssertionError('the model was loaded again for a query')

  monkeypatch.setattr(models.loading, 'load_embedding_model', no_second_load)
  with open(collection.new_photo, 'rb') as f:
    data = f.read()
  answer = requests.post(f'{served}/api/search', files={'image': ('a.jpg', data)},
                         timeout=60).json()
  monkeypatch.undo()
  assert answer['source'] == f'embedded now with {browser.model}'
  expected = embed_image(data, collection.run)  # the project's one-off embedding
  np.testing.assert_allclose(browser.embedder.embed(data), expected, rtol=1e-5, atol=1e-6)
  assert [n['uri'] for n in answer['neighbours']] == collection.exact(expected)


def test_a_bad_upload_gets_a_clear_400(served):
  """It names the upload, not the command line's --query."""
  answer = requests.post(f'{served}/api/search', files={'image': ('n.jpg', b'not an image')},
                         timeout=60)
  assert answer.status_code == 400
  assert answer.json()['error'].startswith('the upload n.jpg: not an image that can be read')
  page = requests.post(f'{served}/search', files={'image': ('n.jpg', b'not an image')},
                       timeout=60)
  assert page.status_code == 400 and 'the upload n.jpg: not an image' in page.text
  assert '--query' not in page.text
  page = requests.post(f'{served}/search', files={'image': ('e.jpg', b'')}, timeout=60)
  assert page.status_code == 400 and 'the upload is empty' in page.text


def _sample(page: str) -> list:
  return [html.unescape(uri) for uri in re.findall(r'class="tile sample" data-uri="([^"]*)"',
                                                   page)]


def test_the_first_page_shows_a_sample_of_the_collection_to_start_from(collection, served,
                                                                        tmp_path):
  page = requests.get(f'{served}/', timeout=60).text
  assert sorted(_sample(page)) == sorted(collection.uris)  # fewer than SAMPLE_SHOWN
  assert 'exact search (a pass over the collection)' in page
  assert f'Collection: {collection.collection} version {collection.snapshot.version}' in page
  many = str(tmp_path / 'many')
  collection_writer.commit(many, collection_writer.rows(
      [f'/photos/{n:03}.jpg' for n in range(100)], 4, seed=1), '/runs/1')
  sample = browse.Catalogue(open_snapshot(many)).sample(browse.SAMPLE_SHOWN)
  assert len(set(sample)) == browse.SAMPLE_SHOWN
  assert (sample[0], sample[-1]) == ('/photos/000.jpg', '/photos/099.jpg')


@pytest.mark.parametrize('name', ['hubble_deep_field.jpg', ODD_NAME])
def test_thumbnails_of_the_collection_are_served_and_cached(collection, browser, served, name):
  uri = collection.uri(name)
  before = browser.thumbnail.cache_info()
  for _ in range(2):
    answer = requests.get(f'{served}/thumbnail', params={'uri': uri}, timeout=60)
    assert answer.status_code == 200 and answer.headers['content-type'] == 'image/jpeg'
  with Image.open(io.BytesIO(answer.content)) as thumbnail:
    assert max(thumbnail.size) == 192
  after = browser.thumbnail.cache_info()
  assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)


def _raw_get(url: str, path: str):
  """A GET of `path` exactly as written (requests would resolve the dot segments)."""
  host, port = url.rsplit('/', 1)[-1].split(':')
  connection = http.client.HTTPConnection(host, int(port), timeout=30)
  connection.request('GET', path)
  response = connection.getresponse()
  return response.status, response.read()


@pytest.mark.parametrize('path', [
    '/thumbnail?uri=/etc/passwd',
    '/thumbnail?uri=file:///etc/passwd',
    '/thumbnail?uri={folder}/../../../../../../etc/passwd',
    '/thumbnail?uri={folder}/rocket.jpg/../../../../../../../etc/passwd',
    '/thumbnail?uri=..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd',
    '/thumbnail?uri={folder}%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd',
    '/thumbnail/../../../../etc/passwd',
    '/../../../../etc/passwd',
    '/static/..%2F..%2F..%2Fetc%2Fpasswd',
    '/etc/passwd',
    '/search?uri=/etc/passwd',
    '/api/search?uri=/etc/passwd',
])
def test_nothing_outside_the_collection_is_served(collection, served, path):
  status, body = _raw_get(served, path.format(folder=collection.folder))
  assert status in (403, 404)
  assert b'root:' not in body


@pytest.mark.parametrize('path', ['/', '/thumbnail?uri={rocket}', '/api/search?uri={rocket}'])
def test_a_request_naming_another_host_is_refused(collection, served, path):
  """A page on another site that rebinds its name to 127.0.0.1 gets nothing."""
  url = served + path.format(rocket=collection.uri('rocket.jpg'))
  port = served.rsplit(':', 1)[1]
  for host in ('attacker.example', f'attacker.example:{port}', 'localhost.attacker.example'):
    answer = requests.get(url, headers={'Host': host}, timeout=60)
    assert answer.status_code == 400 and answer.text == 'Invalid host header'
  for host in ('127.0.0.1', f'127.0.0.1:{port}', f'localhost:{port}', f'[::1]:{port}'):
    assert requests.get(url, headers={'Host': host}, timeout=60).status_code == 200


def test_a_host_is_allowed_when_it_is_listened_on_or_named():
  assert browse.allowed_hosts('127.0.0.1') == ['127.0.0.1', 'localhost', '[::1]']
  assert browse.allowed_hosts('::1', ['Photos.Example', '*.lan']) == [
      '[::1]', 'localhost', '127.0.0.1', 'photos.example', '*.lan']
  assert browse.allowed_hosts('192.168.1.5') == ['192.168.1.5']
  assert browse.allowed_hosts('0.0.0.0', ['box', '[fe80::1]']) == [
      'localhost', '127.0.0.1', '[::1]', 'box', '[fe80::1]']
  with pytest.raises(ValueError, match='--host 0.0.0.0 listens on every address .* with '
                     '--allowed_host NAME'):
    browse.allowed_hosts('0.0.0.0')
  with pytest.raises(ValueError, match='--allowed_host box:8443: give the name without its port'):
    browse.allowed_hosts('127.0.0.1', ['box:8443'])
  with pytest.raises(ValueError, match='--allowed_host http://box/: not a host name'):
    browse.allowed_hosts('127.0.0.1', ['http://box/'])


UPLOAD_LIMIT = 200_000  # bytes: rocket.jpg (113 kB) fits, hubble_deep_field.jpg (528 kB) does not
BOUNDARY = 'pnasnet-boundary'


@pytest.fixture(scope='module')
def proxied(browser):
  """The page behind a reverse proxy's name, with a small upload limit."""
  server = browse.BackgroundServer(
      browser, browse.allowed_hosts(browse.DEFAULT_HOST, ['photos.example']), UPLOAD_LIMIT)
  yield server.url
  server.stop()


def test_the_name_of_a_reverse_proxy_is_answered_when_allowed(proxied):
  assert requests.get(proxied, headers={'Host': 'photos.example'}, timeout=60).status_code == 200
  assert requests.get(proxied, headers={'Host': 'attacker.example'},
                      timeout=60).status_code == 400


@pytest.mark.parametrize('path', ['/search', '/api/search'])
def test_an_upload_above_the_limit_gets_a_413_naming_it(collection, proxied, path):
  with open(collection.uri('hubble_deep_field.jpg'), 'rb') as f:
    answer = requests.post(proxied + path, files={'image': ('h.jpg', f)}, timeout=60)
  assert answer.status_code == 413
  said = answer.json()['error'] if path.startswith('/api/') else html.unescape(answer.text)
  assert 'larger than this page accepts (200,000 bytes)' in said and '--max_upload' in said
  with open(collection.uri('rocket.jpg'), 'rb') as f:  # the connection and the page carry on
    assert requests.post(proxied + path, files={'image': ('r.jpg', f)},
                         timeout=60).status_code == 200


def _unfinished_upload(url: str, path: str, content_length=None, chunks=()):
  """A multipart upload to `path` whose body never ends: its head (with `content_length`, else
  chunked), then `chunks` until the server answers. (status, body) of the answer."""
  port = int(url.rsplit(':', 1)[1])
  head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
          f'Content-Type: image/jpeg\r\n\r\n').encode()
  framing = (f'Content-Length: {content_length}' if content_length is not None
             else 'Transfer-Encoding: chunked')
  with socket.create_connection(('127.0.0.1', port), timeout=60) as sock:
    sock.sendall(f'POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: '
                 f'multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n'.encode())
    for chunk in ([head] if content_length is None else []) + list(chunks):
      if select.select([sock], [], [], 0)[0]:
        break  # answered: the rest is not sent
      sock.sendall(b'%x\r\n%s\r\n' % (len(chunk), chunk))
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


@pytest.mark.parametrize('path', ['/search', '/api/search'])
def test_an_upload_declared_above_the_limit_is_refused_before_its_body_is_sent(proxied, path):
  status, body = _unfinished_upload(proxied, path, content_length=10 * UPLOAD_LIMIT)
  assert status == 413 and b'200,000 bytes' in body


@pytest.mark.parametrize('path', ['/search', '/api/search'])
def test_a_chunked_upload_is_refused_once_it_passes_the_limit_not_when_it_ends(proxied, path):
  """The body would be 10 times the limit and its last chunk is never sent: the answer comes
  although the server has not had the whole body."""
  status, body = _unfinished_upload(proxied, path,
                                    chunks=(b'\xff' * 16_000 for _ in range(125)))
  assert status == 413 and b'200,000 bytes' in body


def test_the_duplicates_view_lists_the_groups_of_the_csv(collection, served):
  page = requests.get(f'{served}/duplicates', timeout=60).text
  assert collection.groups, 'the collection holds a byte copy: at least one group'
  for number, group in enumerate(collection.groups, 1):
    assert f'id="group-{number}"' in page
    for member in group.members:
      assert f'data-uri="{member.uri}"' in page


def test_a_collection_on_s3_is_searched_and_its_thumbnails_read_through_beam(s3_server):
  """A collection and photos in an S3 bucket (moto on loopback), the photos read by Beam's
  FileSystems; no run directory that committed is left, so only images of the collection can be
  searched."""
  import storage
  s3_server.create_bucket('browse-photos')
  storage.set_filesystem_options(s3_server.options)
  collection_package.set_store_options(s3_server.options)
  names = ['rocket.jpg', 'coffee.png', 'camera.png']
  photos = {f's3://browse-photos/photos/{n}': open(os.path.join(SAMPLE_IMAGES, n), 'rb').read()
            for n in names}
  for uri, data in photos.items():
    s3_server.upload(uri, data)
  run_rows = [row._replace(sha256=hashlib.sha256(photos[row.uri]).hexdigest())
              for row in collection_writer.rows(list(photos), 8, seed=4)]
  collection_writer.commit('s3://browse-photos/collection', run_rows, 's3://browse-photos/gone')
  snapshot = open_snapshot('s3://browse-photos/collection')
  with pytest.raises(embeddings.NoRunsError, match='no run directory that committed') as gone:
    embedding_run(snapshot)
  server = browse.BackgroundServer(browse.Browser(snapshot, None, (), None, str(gone.value)))
  try:
    query = run_rows[0].uri
    answer = requests.get(f'{server.url}/api/search', params={'uri': query}, timeout=60).json()
    assert [n['uri'] for n in answer['neighbours']] == [
        n.uri for n in search_vectors(snapshot, run_rows[0].embedding, 24, [{query}])[0]]
    thumbnail = requests.get(f'{server.url}/thumbnail', params={'uri': query}, timeout=60)
    assert thumbnail.status_code == 200
    with Image.open(io.BytesIO(thumbnail.content)) as image:
      assert max(image.size) == 192
    same = requests.post(f'{server.url}/api/search', files={'image': ('c.png', photos[
        run_rows[1].uri])}, timeout=60).json()
    assert same['neighbours'][0]['uri'] == run_rows[1].uri
    new = requests.post(f'{server.url}/api/search', files={'image': ('h.jpg', open(
        os.path.join(SAMPLE_IMAGES, 'hubble_deep_field.jpg'), 'rb').read())}, timeout=60)
    assert new.status_code == 400 and 'cannot be embedded here' in new.json()['error']
  finally:
    server.stop()
    FileSystems.set_options(PipelineOptions([]))  # the next tests' S3 settings are their own
    collection_package.set_store_options([])


def _refusal(capsys, argv):
  with pytest.raises(SystemExit) as refused:
    browse_command.main(argv)
  assert refused.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 or error[-1].startswith('pnasnet-embeddings browse: error:')
  return error[-1]


def test_bad_options_are_refused_with_one_line_before_the_model_loads(collection, tmp_path,
                                                                     capsys):
  assert 'no collection at' in _refusal(capsys, ['--collection', str(tmp_path / 'nothing')])
  not_csv = tmp_path / 'notes.csv'
  not_csv.write_text('a,b\n1,2\n')
  assert 'not a CSV of pnasnet-embeddings duplicates' in _refusal(
      capsys, ['--collection', collection.collection, '--duplicates', str(not_csv)])
  sheet_png = collection.uri('coffee.png')  # the duplicates command's --sheet, given by mistake
  assert _refusal(capsys, ['--collection', collection.collection, '--duplicates', sheet_png]) == (
      f'error: --duplicates {sheet_png}: not a CSV of pnasnet-embeddings duplicates --csv (not '
      f'text: byte 0x89 at 0 is not UTF-8)')
  taken = browse.listening_socket(0)
  try:
    assert 'choose another port' in _refusal(
        capsys, ['--collection', collection.collection, '--port', str(taken.getsockname()[1])])
  finally:
    taken.close()
  assert '--k must be at least 1' in _refusal(capsys, ['--collection', collection.collection,
                                                       '--k', '0'])
  assert 'with --allowed_host NAME' in _refusal(capsys, ['--collection', collection.collection,
                                                        '--host', '0.0.0.0'])
  assert 'give the name without its port' in _refusal(
      capsys, ['--collection', collection.collection, '--allowed_host', 'photos.example:443'])
  assert '--host 192.0.2.1: cannot listen on it' in _refusal(
      capsys, ['--collection', collection.collection, '--host', '192.0.2.1'])
  assert "'lots' is not a size" in _refusal(capsys, ['--collection', collection.collection,
                                                     '--max_upload', 'lots'])


def test_the_command_serves_the_page_on_loopback_and_ctrl_c_ends_it_in_one_line(collection,
                                                                               tmp_path):
  with open(tmp_path / 'stderr', 'w+') as stderr:
    command = subprocess.Popen(
        [sys.executable, '-m', 'commands', 'browse', '--collection', collection.collection,
         '--duplicates', collection.csv, '--port', '0'], cwd=PROJECT, stdout=subprocess.PIPE, stderr=stderr,
        text=True)
    try:
      line = command.stdout.readline()
      assert f'browse {len(os.listdir(collection.folder))} images of ' in line
      url = line.split(' at ')[1].split()[0]
      assert url.startswith('http://127.0.0.1:')
      page = requests.get(url, timeout=60)
      assert page.status_code == 200 and 'Search by image' in page.text
      assert 'duplicates (' in page.text
      command.send_signal(signal.SIGINT)  # Ctrl-C
      assert command.wait(30) == 130
    finally:
      command.kill()
      command.wait(30)
    stderr.seek(0)
    said = stderr.read()
  assert 'Traceback' not in said and said.splitlines()[-1] == 'browse: stopped'


CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
# A closed network: without the background-networking flags Chromium keeps calling out at start.
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--disable-background-networking', '--disable-component-update',
                  '--disable-sync', '--no-first-run', '--window-size=1400,1100']


@pytest.fixture(scope='module')
def chromium(tmp_path_factory):
  """Debian's headless Chromium driven by Selenium (.ci/run installs both)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS + [f'--user-data-dir={tmp_path_factory.mktemp("chromium")}']:
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(120)
  yield driver
  driver.quit()


def _shown(driver, selector: str):
  """(data-uri of each tile, whether every thumbnail of them decoded), in page order."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  tiles = driver.find_elements(By.CSS_SELECTOR, selector)
  WebDriverWait(driver, 60).until(lambda d: d.execute_script(
      'return [...document.images].every(i => i.complete)'))
  decoded = driver.execute_script(
      f'return [...document.querySelectorAll("{selector} img")].map(i => i.naturalWidth > 0)')
  return [t.get_attribute('data-uri') for t in tiles], decoded


def test_in_a_browser_upload_then_click_then_duplicates(collection, browser, served, chromium,
                                                        tmp_path):
  from selenium.webdriver.common.by import By
  chromium.get(served + '/')
  chromium.find_element(By.ID, 'image').send_keys(collection.new_photo)
  chromium.find_element(By.ID, 'search-image-button').click()
  with open(collection.new_photo, 'rb') as f:
    expected = collection.exact(embed_image(f.read(), collection.run))
  uris, decoded = _shown(chromium, '.tile.neighbour')
  chromium.save_screenshot(str(tmp_path / 'upload.png'))
  assert uris == expected and all(decoded)
  assert 'embedded now with' in chromium.find_element(By.ID, 'query').text
  assert chromium.execute_script(
      'return document.querySelector("#query img").naturalWidth') > 0

  clicked = uris[0]
  chromium.find_element(By.CSS_SELECTOR, '.tile.neighbour[data-rank="1"] a').click()
  uris, decoded = _shown(chromium, '.tile.neighbour')
  chromium.save_screenshot(str(tmp_path / 'clicked.png'))
  assert uris == collection.exact(browser.stored_vector(clicked), [clicked]) and all(decoded)
  assert chromium.find_element(By.ID, 'uri').get_attribute('value') == clicked

  chromium.find_element(By.ID, 'duplicates-link').click()
  uris, decoded = _shown(chromium, '.group .tile')
  chromium.save_screenshot(str(tmp_path / 'duplicates.png'))
  assert uris == [m.uri for g in collection.groups for m in g.members] and all(decoded)
  kept = chromium.find_elements(By.CSS_SELECTOR, '.group .tile.keep')
  assert [k.get_attribute('data-uri') for k in kept] == [g.members[0].uri
                                                         for g in collection.groups]
  for name in ('upload', 'clicked', 'duplicates'):
    assert (tmp_path / f'{name}.png').stat().st_size > 10_000
