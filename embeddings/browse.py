"""A local web page to look at a collection: search it by an uploaded image, by a URI or by
clicking a result, and look at its duplicate groups (`pnasnet-embeddings browse`).

The page listens on 127.0.0.1 unless told otherwise, answers only requests that name a host it is
meant to be reached by (a page on another site could otherwise read the collection through DNS
rebinding), and refuses an upload above its limit before reading it whole. It reads one snapshot
(version) of the collection, holding none of its URIs: a URI is looked up through the collection's
index on `uri` (or, with --index, in the index's lookup files), an uploaded image's bytes through
its index on `sha256`, the answers cached. It loads the collection's model once (as a run that
committed to it recorded), so a query by a new image costs one embedding and one search; an image
whose bytes the collection holds, a URI of it, or a click costs one stored-vector read (by row id)
and one search. The first page shows a sample of the collection, spread over it, to click and start
from. Search is exact (embeddings/neighbours.py, a pass over the snapshot's vectors) or, with
--index, through the FAISS index (an IVF-PQ index's candidates re-ranked exactly). Thumbnails are
read through Beam's FileSystems (local, gs://, s3://) and cached; only URIs of the collection are
served, whatever the request asks for.
"""

import base64
import collections
import csv
import errno
import functools
import hashlib
import io
import ipaddress
import re
import socket
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

import storage
from collection import Collection
from collection.table import ROW_ID
from embeddings import sheet
from embeddings.neighbours import (RERANK, QueryError, check_image, row_of_sha256, search_vectors,
                                   stored_vector)
from embeddings.query import embed_image
from embeddings.similarity import Neighbour
from storage.members import read_image_bytes
from storage.run_dirs import Run

DEFAULT_HOST = '127.0.0.1'
LOOPBACK = ('127.0.0.1', 'localhost', '::1')
LOOPBACK_NAMES = ('localhost', '127.0.0.1', '[::1]')  # as Host headers name them, without port
EVERY_ADDRESS = ('0.0.0.0', '::')
DEFAULT_MAX_UPLOAD = 32_000_000  # bytes of a request's body, its multipart framing included
HOST_NAME = re.compile(r'(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*')  # a name, or *.domain for its names
DEFAULT_K = 24
THUMBNAILS_CACHED = 4096  # JPEG thumbnails kept in memory, about 10 kB each
LOOKUPS_CACHED = 4096  # an index's URI and SHA-256 lookups, and result URIs, remembered
THUMBNAIL_QUALITY = 85
DUPLICATE_COLUMNS = ('group', 'kind', 'role', 'uri', 'cosine_to_kept', 'same_bytes_as')
DUPLICATE_GROUPS_SHOWN = 200
SAMPLE_SHOWN = 24  # images of the collection on the first page
_PACKAGE = __name__.rsplit('.', 1)[0]


class Entry(NamedTuple):
  """An image of the collection, and where its stored vector is."""
  uri: str
  sha256: str
  row: int  # its row id in the collection (with --index: its id in the index)


def spread(count: int, wanted: int) -> List[int]:
  """Up to `wanted` positions among `count`, evenly apart: a sample across the collection's
  folders and runs, the same at every start."""
  return [int(p) for p in np.linspace(0, count - 1, min(wanted, count))]


class Catalogue:
  """The URIs of one snapshot of a collection, looked up when asked (its BTREE index on `uri`;
  bytes through its index on `sha256`), the answers cached: the page holds no list of the
  collection's URIs, whatever its size."""

  def __init__(self, snapshot: Collection):
    self._snapshot = snapshot
    self._count = snapshot.num_rows
    self._lookup = functools.lru_cache(LOOKUPS_CACHED)(self._entry)
    self._by_sha256 = functools.lru_cache(LOOKUPS_CACHED)(self._uri_of_sha256)

  def __len__(self) -> int:
    return self._count

  def __contains__(self, uri: str) -> bool:
    return self.entry(uri) is not None

  def _entry(self, uri: str) -> Optional[Entry]:
    rows = self._snapshot.lookup([uri], ['sha256']).to_pylist()
    return Entry(uri, rows[0]['sha256'] or '', rows[0][ROW_ID]) if rows else None

  def entry(self, uri: str) -> Optional[Entry]:
    return self._lookup(uri)

  def _uri_of_sha256(self, sha256: str) -> Optional[str]:
    row = row_of_sha256(self._snapshot, sha256)
    return row['uri'] if row else None

  def uri_of_sha256(self, sha256: str) -> Optional[str]:
    return self._by_sha256(sha256)

  def sample(self, wanted: int) -> List[str]:
    """URIs at positions spread over the snapshot (one read each)."""
    positions = spread(self._count, wanted)
    if not positions:
      return []
    return self._snapshot.dataset.take(positions, columns=['uri']).column('uri').to_pylist()


class IndexCatalogue:
  """The URIs an index holds, as Catalogue answers for them, looked up in the index when asked
  (NeighbourIndex.find_row: the covered collection's indexes on uri and sha256), the answers cached:
  the page holds no list of the collection's URIs. The URIs of the latest results are
  remembered, so the thumbnails of a results page cost no lookup. `row` is the FAISS id."""

  def __init__(self, index):
    self._index = index
    self._find = functools.lru_cache(LOOKUPS_CACHED)(index.find_row)
    self._shown: 'collections.OrderedDict[str, None]' = collections.OrderedDict()
    self._shown_lock = threading.Lock()  # the page's handlers run in a thread pool

  def __len__(self) -> int:
    return self._index.count

  def __contains__(self, uri: str) -> bool:
    with self._shown_lock:
      if uri in self._shown:
        return True
    return self.entry(uri) is not None

  def remember(self, uris: Sequence[str]) -> None:
    """URIs the index has just given as results: members, up to LOOKUPS_CACHED of them."""
    with self._shown_lock:
      for uri in uris:
        self._shown[uri] = None
        self._shown.move_to_end(uri)
      while len(self._shown) > LOOKUPS_CACHED:
        self._shown.popitem(last=False)

  def entry(self, uri: str) -> Optional[Entry]:
    row = self._find('uri', uri)
    return Entry(uri, row['sha256'] or '', row['id']) if row else None

  def uri_of_sha256(self, sha256: str) -> Optional[str]:
    row = self._find('sha256', sha256)
    return row['uri'] if row else None

  def sample(self, wanted: int) -> List[str]:
    """URIs of rows spread over the collection the index covers, remembered."""
    uris = self._index.sample_uris(wanted)
    self.remember(uris)
    return uris


class ImageEmbedder:
  """The collection's model (as `run` recorded it), built and traced at start-up (embeddings.query keeps it for the process):
  a query by a new image then costs one embedding, not a network build."""

  def __init__(self, run: Run):
    self._run = run
    self._lock = threading.Lock()  # one embedding at a time: TensorFlow uses every core
    self.embed(_blank_png(run.summary.image_size))  # traces TensorFlow's function now

  def embed(self, data: bytes) -> np.ndarray:
    with self._lock:
      return embed_image(data, self._run)


def _blank_png(size) -> bytes:
  from PIL import Image
  out = io.BytesIO()
  Image.new('RGB', (size[1], size[0])).save(out, format='PNG')
  return out.getvalue()


class Result(NamedTuple):
  """A query and its neighbours, as the page shows them."""
  query_uri: Optional[str]  # the collection URI searched from, None for an upload
  query_thumbnail: Optional[str]  # a data: URI of the uploaded image's thumbnail
  source: str  # where the query's vector came from
  neighbours: List[Neighbour]


class DuplicateMember(NamedTuple):
  uri: str
  role: str
  cosine: float
  same_bytes_as: str


class DuplicateGroup(NamedTuple):
  number: int
  kind: str
  members: List[DuplicateMember]


def read_duplicates(path: str) -> List[DuplicateGroup]:
  """The groups of an `embeddings.duplicates` CSV, in its order (kept image first); any other
  file (a sheet PNG given by mistake, say) is a ValueError naming the flag and the file."""
  not_ours = f'--duplicates {path}: not a CSV of pnasnet-embeddings duplicates --csv'
  try:
    with storage.open_file(path) as f:
      reader = csv.DictReader(io.TextIOWrapper(f, encoding='utf-8', newline=''))
      missing = [c for c in DUPLICATE_COLUMNS if c not in (reader.fieldnames or [])]
      if missing:
        raise ValueError(f'{not_ours} (no column {", ".join(missing)})')
      groups: Dict[int, DuplicateGroup] = {}
      for line in reader:
        number = int(line['group'])
        group = groups.setdefault(number, DuplicateGroup(number, line['kind'], []))
        group.members.append(DuplicateMember(line['uri'], line['role'],
                                              float(line['cosine_to_kept']),
                                              line['same_bytes_as']))
  except UnicodeDecodeError as exc:
    raise ValueError(f'{not_ours} (not text: byte {exc.object[exc.start]:#04x} at '
                     f'{exc.start} is not UTF-8)') from exc
  except csv.Error as exc:
    raise ValueError(f'{not_ours} ({exc})') from exc
  return list(groups.values())


class Browser:
  """What the page searches: one snapshot of a collection or an index, the model, the duplicate
  groups."""

  def __init__(self, snapshot: Collection, index=None,
               duplicates: Sequence[DuplicateGroup] = (), embedder: Optional[ImageEmbedder] = None,
               embedder_problem: str = '', k: int = DEFAULT_K):
    self.snapshot = snapshot
    self.index = index
    self.catalogue = IndexCatalogue(index) if index is not None else Catalogue(snapshot)
    self.duplicates = list(duplicates)
    self.embedder = embedder
    self.embedder_problem = embedder_problem
    self.k = k
    self.model = index.model if index is not None else snapshot.model
    self.thumbnail = functools.lru_cache(THUMBNAILS_CACHED)(self._thumbnail)
    self.sample = self.catalogue.sample(SAMPLE_SHOWN)

  def search_words(self) -> str:
    """How a query is answered, for the page's header."""
    if self.index is None:
      return 'exact search (a pass over the collection)'
    if not self.index.exact_scores(self.k, RERANK):
      return f'{self.index.kind} index search (approximate cosines)'
    if self.index.kind == 'ivf_pq':
      return f'ivf_pq index search, its {RERANK} best candidates re-ranked exactly'
    return f'{self.index.kind} index search (exact cosines)'

  def stored_vector(self, uri: str) -> np.ndarray:
    entry = self.catalogue.entry(uri)
    if self.index is not None:
      return self.index.stored_vectors(np.array([entry.row]))[0]
    return stored_vector(self.snapshot, entry.row)

  def neighbours(self, vector: np.ndarray, exclude: Sequence[str] = ()) -> List[Neighbour]:
    if self.index is not None:
      found = self.index.search(vector, self.k, rerank=RERANK,  # PQ codes' cosines re-scored
                                exclude_uris=[list(exclude)])[0]
      self.catalogue.remember([n.uri for n in found])
      return found
    return search_vectors(self.snapshot, vector, self.k, [set(exclude)])[0]

  def search_uri(self, uri: str) -> Result:
    """The neighbours of a collection image (itself left out)."""
    if uri not in self.catalogue:
      raise KeyError(uri)
    return Result(uri, None, 'in the collection',
                  self.neighbours(self.stored_vector(uri), [uri]))

  def search_image(self, data: bytes, name: str = '') -> Result:
    """The neighbours of an uploaded image (`name`: its file name, for a refusal): the stored
    vector of the same bytes if the collection has them, else its embedding now."""
    check_image(f'the upload {name}'.strip(), data)
    same = self.catalogue.uri_of_sha256(hashlib.sha256(data).hexdigest())
    if same is not None:
      vector, source = self.stored_vector(same), f'same bytes as {same}'
    elif self.embedder is None:
      raise QueryError(f'this image is not in the collection, and new images cannot be '
                       f'embedded here: {self.embedder_problem}')
    else:
      vector, source = self.embedder.embed(data), f'embedded now with {self.model}'
    return Result(None, _data_uri(sheet.thumbnail(data)), source, self.neighbours(vector))

  def _thumbnail(self, uri: str) -> Optional[bytes]:
    """A JPEG thumbnail of a collection image; None when it cannot be read any more."""
    try:
      data = read_image_bytes(uri)
    except Exception:  # pylint: disable=broad-except; moved or deleted since the run
      return None
    return _jpeg(sheet.thumbnail(data))


def _jpeg(image) -> Optional[bytes]:
  if image is None:
    return None
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=THUMBNAIL_QUALITY)
  return out.getvalue()


def _data_uri(image) -> Optional[str]:
  data = _jpeg(image)
  return None if data is None else 'data:image/jpeg;base64,' + base64.b64encode(data).decode()


def _neighbour_json(n: Neighbour) -> dict:
  return {'rank': n.rank, 'score': n.score, 'uri': n.uri,
          'width': n.metadata.get('width'), 'height': n.metadata.get('height')}


def _result_json(result: Result) -> dict:
  return {'query_uri': result.query_uri, 'source': result.source,
          'neighbours': [_neighbour_json(n) for n in result.neighbours]}


def create_app(browser: Browser, hosts: Sequence[str] = LOOPBACK_NAMES,
               max_upload: int = DEFAULT_MAX_UPLOAD):
  """The page (templates in embeddings/templates) and its JSON twin: /, /search (GET ?uri=,
  POST an image), /duplicates, /thumbnail?uri=, /api/search (GET ?uri=, POST an image); answered
  only when the Host header is one of `hosts` (allowed_hosts), an upload only up to `max_upload`
  bytes."""
  from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
  from fastapi.responses import HTMLResponse, JSONResponse, Response
  from fastapi.templating import Jinja2Templates
  from jinja2 import Environment, PackageLoader, select_autoescape
  from starlette.middleware.trustedhost import TrustedHostMiddleware

  app = FastAPI(title='embeddings.browse', docs_url=None, redoc_url=None, openapi_url=None)
  templates = Jinja2Templates(env=Environment(loader=PackageLoader(_PACKAGE, 'templates'),
                                              autoescape=select_autoescape()))
  about = {'model': browser.model, 'images': len(browser.catalogue), 'k': browser.k,
           'search': browser.search_words(),
           'collection': f'{browser.snapshot.uri} version {browser.snapshot.version}',
           'duplicates': len(browser.duplicates), 'can_embed': browser.embedder is not None,
           'embedder_problem': browser.embedder_problem}

  def page(request: Request, name: str, status: int = 200, **values) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {'about': about, **values},
                                      status_code=status)

  def problem(request: Request, status: int, message: str) -> HTMLResponse:
    return page(request, 'index.html', status, error=message, sample=browser.sample)

  async def uploaded(image: UploadFile) -> bytes:
    data = await image.read()
    if not data:
      raise QueryError('the upload is empty: choose an image file')
    return data

  @app.get('/', response_class=HTMLResponse)
  def home(request: Request):
    return page(request, 'index.html', sample=browser.sample)

  @app.get('/search', response_class=HTMLResponse)
  def search_by_uri(request: Request, uri: str = Query('')):
    try:
      result = browser.search_uri(uri.strip())
    except KeyError:
      return problem(request, 404, f'{uri}: not an image of this collection (give a URI as the '
                     f'collection holds it)')
    return page(request, 'results.html', result=result)

  @app.post('/search', response_class=HTMLResponse)
  async def search_by_image(request: Request, image: UploadFile = File(...)):
    try:
      data = await uploaded(image)
      result = await _in_thread(browser.search_image, data, image.filename or '')
    except QueryError as exc:
      return problem(request, 400, str(exc))
    return page(request, 'results.html', result=result, upload_name=image.filename)

  @app.get('/duplicates', response_class=HTMLResponse)
  def duplicates(request: Request):
    return page(request, 'duplicates.html', groups=browser.duplicates[:DUPLICATE_GROUPS_SHOWN],
                hidden=max(0, len(browser.duplicates) - DUPLICATE_GROUPS_SHOWN),
                collection=browser.catalogue)

  @app.get('/thumbnail')
  def thumbnail(uri: str = Query(...)):
    if uri not in browser.catalogue:  # the only check needed: nothing else is ever read
      raise HTTPException(404, 'not an image of this collection')
    data = browser.thumbnail(uri)
    if data is None:
      raise HTTPException(404, 'the image cannot be read any more')
    return Response(data, media_type='image/jpeg',
                    headers={'Cache-Control': 'private, max-age=3600'})

  @app.get('/api/search')
  def api_search_by_uri(uri: str = Query(...)):
    try:
      return _result_json(browser.search_uri(uri))
    except KeyError:
      return JSONResponse({'error': f'{uri}: not an image of this collection'}, 404)

  @app.post('/api/search')
  async def api_search_by_image(image: UploadFile = File(...)):
    try:
      return _result_json(await _in_thread(browser.search_image, await uploaded(image),
                                           image.filename or ''))
    except QueryError as exc:
      return JSONResponse({'error': str(exc)}, 400)

  def too_large(scope) -> Response:
    message = (f'the upload is larger than this page accepts ({max_upload:,} bytes): choose a '
               f'smaller image, or start browse with a larger --max_upload')
    if scope['path'].startswith('/api/'):
      return JSONResponse({'error': message}, 413)
    return problem(Request(scope), 413, message)

  app.add_middleware(UploadLimit, limit=max_upload, refusal=too_large)
  app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)
  return app  # the middleware added last sees a request first: the Host is checked first


async def _in_thread(function, *args):
  """Embedding and searching block: off the event loop, so thumbnails keep coming."""
  from starlette.concurrency import run_in_threadpool
  return await run_in_threadpool(function, *args)


def host_pattern(name: str, flag: str = '--allowed_host') -> str:
  """A name the page may be reached by, as a Host header gives it without its port (an IPv6
  address in brackets) and Starlette's TrustedHostMiddleware compares it; `*.example.org` stands
  for the names under example.org. A ValueError says what is wrong with it."""
  text = name.strip().lower()
  if HOST_NAME.fullmatch(text):
    return text
  try:
    return f'[{ipaddress.IPv6Address(text.removeprefix("[").removesuffix("]"))}]'
  except ValueError:
    pass
  with_port = re.fullmatch(r'(.+):([0-9]+)', text)
  if with_port and (HOST_NAME.fullmatch(with_port[1]) or with_port[1].startswith('[')):
    raise ValueError(f'{flag} {name}: give the name without its port '
                     f'({with_port[1]}): the page answers it on any port')
  raise ValueError(f'{flag} {name}: not a host name, an IP address or *.domain')


def allowed_hosts(host: str, names: Sequence[str] = ()) -> List[str]:
  """The Host header names the page answers: the address it listens on (`host`), the loopback
  names when that is loopback or every address, and `names` (a reverse proxy's, say). Listening
  on every address needs `names` (a ValueError otherwise): which names reach it is unknown."""
  every = host in EVERY_ADDRESS
  if every and not names:
    raise ValueError(f'--host {host} listens on every address of this machine: say which names '
                     f'the page is reached by with --allowed_host NAME (repeatable, e.g. '
                     f'--allowed_host $(hostname)); requests naming any other host are refused')
  patterns = [] if every else [host_pattern(host, '--host')]
  if every or host in LOOPBACK:
    patterns += LOOPBACK_NAMES
  patterns += [host_pattern(name) for name in names]
  return list(dict.fromkeys(patterns))


def listening_socket(port: int, host: str = DEFAULT_HOST) -> socket.socket:
  """A socket bound to host:port (0: any free port), before any slow start-up work."""
  try:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except socket.gaierror as exc:
    raise OSError(f'--host {host}: not an address of this machine ({exc.strerror}); give one of '
                  f'its addresses or names') from exc
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as exc:
    sock.close()
    if exc.errno == errno.EADDRINUSE:
      raise OSError(f'--port {port}: cannot listen on {host}:{port} ({exc.strerror}); '
                    f'choose another port, or 0 for any free one') from exc
    raise OSError(f'--host {host}: cannot listen on it ({exc.strerror}); give an address of '
                  f'this machine') from exc
  sock.listen(128)
  return sock


def page_url(sock: socket.socket, host: str, names: Sequence[str] = ()) -> str:
  """The address to open: the one listened on, or when that is every address, the first name
  given that is not a pattern (else localhost)."""
  if host in EVERY_ADDRESS:
    host = next((n for n in names if not n.startswith('*')), 'localhost')
  return f'http://{host_pattern(host)}:{sock.getsockname()[1]}/'


class UploadLimit:
  """ASGI middleware: a request body above `limit` bytes is answered with `refusal(scope)` (a 413)
  before it is read whole: at once when its Content-Length says so, else as soon as a chunked body
  passes the limit. The page is then told the client left, and what it answers is dropped;
  uvicorn throws away what the client still sends, holding none of it."""

  def __init__(self, app, limit: int, refusal):
    self._app = app
    self._limit = limit
    self._refusal = refusal

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self._app(scope, receive, send)
      return
    declared = dict(scope['headers']).get(b'content-length', b'')
    if declared.isdigit() and int(declared) > self._limit:
      await self._refusal(scope)(scope, receive, send)
      return
    received, started, refused = 0, False, False

    async def counted_receive():
      nonlocal received, refused
      if refused:
        return {'type': 'http.disconnect'}
      message = await receive()
      received += len(message.get('body', b''))
      if received > self._limit and not started:
        refused = True
        await self._refusal(scope)(scope, receive, send)
        return {'type': 'http.disconnect'}
      return message

    async def send_unless_refused(message):
      nonlocal started
      if not refused:
        started = True
        await send(message)

    await self._app(scope, counted_receive, send_unless_refused)


def server(app, log_level: str = 'warning'):
  """A uvicorn server for `app`: `.run(sockets=[listening_socket(port)])` blocks until
  `.should_exit` is set."""
  import uvicorn
  return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))


class BackgroundServer:
  """The page served from a thread on a free loopback port, for tests and benchmarks."""

  def __init__(self, browser: Browser, hosts: Sequence[str] = LOOPBACK_NAMES,
               max_upload: int = DEFAULT_MAX_UPLOAD):
    sock = listening_socket(0)
    self.url = page_url(sock, DEFAULT_HOST).rstrip('/')
    self._server = server(create_app(browser, hosts, max_upload))
    self._thread = threading.Thread(target=self._server.run, kwargs={'sockets': [sock]},
                                    daemon=True)
    self._thread.start()
    while not self._server.started:
      if not self._thread.is_alive():
        raise RuntimeError('the server stopped while starting')
      time.sleep(0.02)

  def stop(self) -> None:
    self._server.should_exit = True
    self._thread.join(30)


def load_embedder(run: Run):
  """(the loaded model, '') or (None, why new images cannot be embedded)."""
  try:
    return ImageEmbedder(run), ''
  except Exception as exc:  # pylint: disable=broad-except; uploads of stored bytes still work
    return None, f'{type(exc).__name__}: {exc}'
