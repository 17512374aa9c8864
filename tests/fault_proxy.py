"""A fault-injecting HTTP proxy on loopback, between storage clients and a local storage server.

It forwards every request to the upstream server (the local GCS or S3 server) unless it decides
to fail it first: with a 429, 500 or 503 answer, a reset connection, or a stall (a delay before
the request is forwarded). Faults are injected *before* forwarding, so a faulted request never
reaches the server, as when a front end sheds load. Which requests fail:

* `rate`: that fraction of all requests, drawn from a seeded RNG;
* `rules`: `FaultRule`s matched against the method and the object path (URL-decoded, so a GCS
  object name `a%2Fb.png` reads `a/b.png`), failing the first `times` matching requests, or every
  one (`times=None`: a persistent fault, e.g. an object the service account cannot read).

Every request is classified as `list`, `read` or `write` (both GCS's JSON API and S3's path-style
URLs) and counted, with the faults injected, in `requests` and `faults`; the reads that fetch an
object's metadata, not its bytes (GCS: an object GET without `alt=media`; S3: HEAD), are also
counted per object path in `metadata_requests`, and the object downloads in `downloads`. The server binds 127.0.0.1 only, serves
in daemon threads, and shuts itself down after `lifetime` seconds if nobody stops it.

GCS returns absolute URLs (an object's `mediaLink`, the resumable upload's `Location`) built
from the Host it was reached through; objects uploaded straight to the server would send clients
around the proxy, so the upstream's address is rewritten to the proxy's in response headers and
JSON or batch bodies.
"""

import collections
import http.client
import http.server
import random
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from typing import NamedTuple, Optional, Sequence

STATUS_FAULTS = (429, 500, 503)
RESET = 'reset'
STALL = 'stall'
TRANSIENT_KINDS = STATUS_FAULTS + (RESET, STALL)
HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer',
              'transfer-encoding', 'upgrade', 'expect', 'content-length'}
SET_BY_PROXY = HOP_BY_HOP | {'date', 'server'}
_GCS_OBJECT = re.compile(
    r'^/(?:download/|upload/)?storage/v1/b/(?P<bucket>[^/]+)/o(?:/(?P<name>.+))?$')


class FaultRule(NamedTuple):
  path: str  # a regex searched in the URL-decoded object path ('bucket/name' for both services)
  fault: object  # an HTTP status code, RESET or STALL
  methods: Sequence[str] = ('GET', 'HEAD', 'PUT', 'POST', 'DELETE')
  kinds: Sequence[str] = ('list', 'read', 'write')
  times: Optional[int] = None  # None: every matching request
  query: str = ''  # a regex searched in the request's query string (e.g. 'startOffset=.')


def request_kind(method: str, path: str) -> str:
  """`list`, `read` or `write`, for GCS JSON API and S3 path-style requests."""
  url = urllib.parse.urlsplit(path)
  if method not in ('GET', 'HEAD'):
    return 'write'
  gcs = _GCS_OBJECT.match(url.path)
  if gcs:
    return 'read' if gcs.group('name') else 'list'
  if url.path.startswith(('/storage/', '/download/', '/upload/', '/batch/')):
    return 'read'  # bucket metadata
  bucket_and_key = url.path.lstrip('/').split('/', 1)
  return 'read' if len(bucket_and_key) == 2 and bucket_and_key[1] else 'list'


def metadata_request(method: str, path: str) -> bool:
  """An object's metadata, not its bytes (what a look-up before a read costs)."""
  url = urllib.parse.urlsplit(path)
  gcs = _GCS_OBJECT.match(url.path)
  if gcs:
    return method == 'GET' and bool(gcs.group('name')) and \
        'media' not in urllib.parse.parse_qs(url.query).get('alt', [])
  return method == 'HEAD' and request_kind(method, path) == 'read'


def object_path(path: str) -> str:
  """'bucket/name' of an object request on either service, 'bucket/prefix' of a listing."""
  url = urllib.parse.urlsplit(path)
  query = urllib.parse.parse_qs(url.query)
  gcs = _GCS_OBJECT.match(url.path)
  if gcs:
    name = gcs.group('name') or query.get('name', query.get('prefix', ['']))[0]
    return urllib.parse.unquote(gcs.group('bucket') + '/' + name)
  target = urllib.parse.unquote(url.path.lstrip('/'))
  return target + '/' + query['prefix'][0] if '/' not in target and 'prefix' in query else target


class FaultProxy:
  """Start with `with FaultProxy(upstream, rate=..., rules=...) as proxy:`; `proxy.url`."""

  def __init__(self, upstream: str, rate: float = 0.0, rules: Sequence[FaultRule] = (),
               seed: int = 0, kinds: Sequence = TRANSIENT_KINDS, stall_seconds: float = 0.5,
               lifetime: float = 600.0):
    parsed = urllib.parse.urlsplit(upstream)
    if parsed.hostname not in ('127.0.0.1', 'localhost'):
      raise ValueError(f'upstream {upstream} is not on loopback')
    self.upstream = (parsed.hostname, parsed.port)
    self.rate = rate
    self.rules = list(rules)
    self.kinds = list(kinds)
    self.stall_seconds = min(stall_seconds, 5.0)
    self._lifetime = lifetime
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._rule_hits = collections.Counter()
    self.requests = collections.Counter()  # by kind: list, read, write
    self.metadata_requests = collections.Counter()  # by object path
    self.downloads = collections.Counter()  # by object path
    self.faults = collections.Counter()  # by (kind, fault)
    self.faulted_paths = []
    self._server = None

  # -- lifecycle -------------------------------------------------------------

  def start(self) -> 'FaultProxy':
    proxy = self

    class Handler(_ProxyHandler):
      owner = proxy

    self._server = _Server(('127.0.0.1', 0), Handler)
    self.port = self._server.server_address[1]
    self.url = f'http://127.0.0.1:{self.port}'
    threading.Thread(target=self._server.serve_forever, name='fault-proxy', daemon=True).start()
    self._timer = threading.Timer(self._lifetime, self.stop)
    self._timer.daemon = True
    self._timer.start()
    return self

  def stop(self) -> None:
    server, self._server = self._server, None
    if server is not None:
      self._timer.cancel()
      server.shutdown()
      server.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.stop()

  @property
  def total_requests(self) -> int:
    return sum(self.requests.values())

  @property
  def total_faults(self) -> int:
    return sum(self.faults.values())

  def faults_of(self, kind: str) -> int:
    return sum(n for (k, _), n in self.faults.items() if k == kind)

  # -- decisions -------------------------------------------------------------

  def decide(self, method: str, path: str):
    """The fault for this request, or None; counts it."""
    kind = request_kind(method, path)
    target = object_path(path)
    with self._lock:
      self.requests[kind] += 1
      if metadata_request(method, path):
        self.metadata_requests[target] += 1
      elif kind == 'read' and method == 'GET' and (
          _GCS_OBJECT.match(urllib.parse.urlsplit(path).path) or
          not path.startswith(('/storage/', '/download/', '/upload/', '/batch/'))):
        self.downloads[target] += 1
      fault = None
      for index, rule in enumerate(self.rules):
        if (method in rule.methods and kind in rule.kinds and re.search(rule.path, target) and
            re.search(rule.query, urllib.parse.urlsplit(path).query) and
            (rule.times is None or self._rule_hits[index] < rule.times)):
          self._rule_hits[index] += 1
          fault = rule.fault
          break
      if fault is None and self._rng.random() < self.rate:
        fault = self._rng.choice(self.kinds)
      if fault is not None:
        self.faults[(kind, fault)] += 1
        self.faulted_paths.append((method, target, fault))
      return fault


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True

  def handle_error(self, request, client_address):
    """A client that hangs up (its own timeout or retry) is not an error of the proxy."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  owner: FaultProxy = None

  def log_message(self, *args):  # quiet: the counters say what happened
    pass

  def _read_body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _reset(self):
    """An RST instead of an answer: linger 0 makes close() abort the connection."""
    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    self.close_connection = True
    self.connection.close()

  def _answer(self, status: int, body: bytes, headers=()):
    self.send_response(status)
    for name, value in headers:
      self.send_header(name, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _handle(self):
    owner = self.owner
    body = self._read_body()
    fault = owner.decide(self.command, self.path)
    if fault == RESET:
      self._reset()
      return
    if fault == STALL:
      time.sleep(owner.stall_seconds)
    elif fault is not None:
      message = f'fault injected by the test proxy: HTTP {fault}'
      self._answer(fault, ('{"error": {"code": %d, "message": "%s"}}' % (fault, message)).encode(),
                   [('Content-Type', 'application/json')])
      return
    self._forward(body)

  def _forward(self, body: bytes):
    upstream_host = '%s:%d' % self.owner.upstream
    own_host = '127.0.0.1:%d' % self.owner.port
    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
    connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
    try:
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      payload = response.read()
    except OSError as exc:  # the upstream is gone (stopped after its test): say so, quietly
      self.close_connection = True
      self._answer(502, f'upstream unreachable: {exc}'.encode())
      return
    finally:
      connection.close()
    reply_headers = [(name, value.replace(upstream_host, own_host))
                     for name, value in response.getheaders()
                     if name.lower() not in SET_BY_PROXY]
    content_type = response.getheader('Content-Type', '')
    if 'json' in content_type or 'multipart' in content_type:
      payload = payload.replace(upstream_host.encode(), own_host.encode())
    self.send_response(response.status, response.reason)
    for name, value in reply_headers:
      self.send_header(name, value)
    # HEAD: the object's length, with no body.
    length = response.getheader('Content-Length', '0') if self.command == 'HEAD' else len(payload)
    self.send_header('Content-Length', str(length))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(payload)

  do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _handle
