"""A loopback storage server whose buckets hold millions of generated names and store nothing.

It answers GCS JSON-API object listings (`GET /storage/v1/b/BUCKET/o?prefix=&delimiter=&
startOffset=&pageToken=&maxResults=`), object metadata and downloads (`alt=media`), and S3
ListObjectsV2 (`GET /BUCKET?list-type=2`, `start-after`), HEAD and GET, for synthetic buckets whose object names are computed from their index:
`p0000/img0000000.jpg` ... (`objects` names spread evenly under `prefixes` first-level
prefixes), in sorted order, so a page is found by bisection and made on demand. Memory is one
page, whatever the bucket's size: the listing benchmarks measure the client, not this server.

Requests for any other bucket are forwarded to `upstream` (the local GCS emulator, for the run's
output and temp folders), through tests/fault_proxy.py's proxy, which also counts every request by
kind (`list`, `read`, `write`) in `requests`, and injects its faults (`rules`, `rate`) into the
synthetic buckets' answers too. An object's bytes are SIZE bytes of its name, repeated.
"""

import bisect
import datetime
import json
import re
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple
from xml.sax.saxutils import escape

from tests.fault_proxy import _GCS_OBJECT, FaultProxy, _ProxyHandler

UPDATED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
SIZE = 1234
_AFTER_EVERYTHING = '\U0010ffff'
# An address that refuses connections: a bucket server without upstream answers 502 to the rest.
NO_UPSTREAM = 'http://127.0.0.1:9'


class SyntheticNames:
  """The sorted names of one synthetic bucket, as a sequence bisect can search."""

  def __init__(self, objects: int, prefixes: int, extensions: Tuple[str, ...] = ('jpg',)):
    self.objects = objects
    self.prefixes = prefixes
    self.extensions = extensions
    self._per_prefix = -(-objects // prefixes)

  def __len__(self) -> int:
    return self.objects

  def __getitem__(self, index: int) -> str:
    extension = self.extensions[index % len(self.extensions)]
    return f'p{index // self._per_prefix:04d}/img{index % self._per_prefix:07d}.{extension}'

  def index(self, name: str) -> Optional[int]:
    position = bisect.bisect_left(self, name)
    return position if position < len(self) and self[position] == name else None

  def page(self, prefix: str, delimiter: str, start: int,
           size: int) -> Tuple[List[int], List[str], Optional[int]]:
    """Indexes of the names and the common prefixes of one page from index `start`, and where
    the next page begins."""
    low = max(bisect.bisect_left(self, prefix), start)
    high = bisect.bisect_left(self, prefix + _AFTER_EVERYTHING)
    names, common = [], []
    position = low
    while position < high and len(names) + len(common) < size:
      name = self[position]
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        folder = prefix + rest[:rest.index(delimiter) + len(delimiter)]
        common.append(folder)
        position = bisect.bisect_left(self, folder + _AFTER_EVERYTHING, position, high)
      else:
        names.append(position)
        position += 1
    return names, common, position if position < high else None


def _crc32c(index: int) -> str:
  return f'AAAA{index % 10000:04d}'


class SyntheticBuckets(FaultProxy):
  """`with SyntheticBuckets({'synthetic': SyntheticNames(10**6, 1000)}) as server:`, then point
  STORAGE_EMULATOR_HOST (GCS) or --s3_endpoint_url (S3) at `server.url`."""

  def __init__(self, buckets: Dict[str, SyntheticNames], upstream: str = NO_UPSTREAM,
               lifetime: float = 3600.0, list_latency: float = 0.0, **faults):
    super().__init__(upstream, lifetime=lifetime, **faults)
    self.buckets = buckets
    self.list_latency = list_latency  # seconds before each list page is answered (a real store's)
    # (bucket, prefix, delimiter, page token, start offset): one entry per list request answered
    self.listings: List[Tuple[str, str, str, str, str]] = []

  def start(self) -> 'SyntheticBuckets':
    super().start()
    self._server.RequestHandlerClass = type('Handler', (_SyntheticHandler,), {'owner': self})
    return self


class _SyntheticHandler(_ProxyHandler):
  owner: SyntheticBuckets = None
  disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait

  def _handle(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    gcs = _GCS_OBJECT.match(url.path)
    if gcs and gcs.group('bucket') in self.owner.buckets and self.command == 'GET':
      self._read_body()
      if self._faulted():
        return None
      names = self.owner.buckets[gcs.group('bucket')]
      if gcs.group('name'):
        name = urllib.parse.unquote(gcs.group('name'))
        if query.get('alt') == 'media':
          return self._media(names, name)
        return self._gcs_object(gcs.group('bucket'), names, name)
      return self._gcs_list(gcs.group('bucket'), names, query)
    bucket_metadata = re.match(r'^/storage/v1/b/([^/]+)$', url.path)
    if bucket_metadata and bucket_metadata.group(1) in self.owner.buckets:
      self._read_body()
      if self._faulted():
        return None
      return self._json(200, {'kind': 'storage#bucket', 'name': bucket_metadata.group(1),
                              'id': bucket_metadata.group(1), 'location': 'US',
                              'storageClass': 'STANDARD', 'metageneration': '1'})
    bucket, _, key = url.path.lstrip('/').partition('/')
    if not url.path.startswith(('/storage/', '/upload/', '/download/', '/batch/')) and \
        bucket in self.owner.buckets and self.command in ('GET', 'HEAD'):
      self._read_body()
      if self._faulted():
        return None
      names = self.owner.buckets[bucket]
      if key and self.command == 'GET':
        return self._media(names, urllib.parse.unquote(key))
      if key:
        return self._s3_head(names, urllib.parse.unquote(key))
      return self._s3_list(bucket, names, query)
    return super()._handle()

  def _faulted(self) -> bool:
    """Answers the proxy's fault for this request, if it has one (a stall only delays it)."""
    fault = self.owner.decide(self.command, self.path)
    if fault == 'reset':
      self._reset()
      return True
    if fault == 'stall':
      time.sleep(self.owner.stall_seconds)
    elif fault is not None:
      self._json(fault, {'error': {'code': fault, 'message': f'fault injected: HTTP {fault}'}})
      return True
    return False

  def _media(self, names: 'SyntheticNames', name: str):
    if names.index(name) is None:
      return self._answer(404, b'')
    data = (name.encode() * (SIZE // len(name) + 1))[:SIZE]
    return self._answer(200, data, [('Content-Type', 'application/octet-stream')])

  def _gcs_resource(self, bucket: str, name: str, index: int) -> dict:
    return {'kind': 'storage#object', 'bucket': bucket, 'name': name, 'size': str(SIZE),
            'generation': '1', 'updated': UPDATED.isoformat().replace('+00:00', 'Z'),
            'crc32c': _crc32c(index)}

  def _json(self, status: int, body: dict):
    self._answer(status, json.dumps(body).encode(), [('Content-Type', 'application/json')])

  def _gcs_object(self, bucket: str, names: SyntheticNames, name: str):
    index = names.index(name)
    if index is None:
      return self._json(404, {'error': {'code': 404, 'message': f'No such object: {name}'}})
    return self._json(200, self._gcs_resource(bucket, name, index))

  def _gcs_list(self, bucket: str, names: SyntheticNames, query: dict):
    time.sleep(self.owner.list_latency)
    start = query.get('startOffset', '')
    self.owner.listings.append((bucket, query.get('prefix', ''), query.get('delimiter', ''),
                                query.get('pageToken', ''), start))
    found, common, following = names.page(
        query.get('prefix', ''), query.get('delimiter', ''),
        max(int(query.get('pageToken') or 0), bisect.bisect_left(names, start)),
        int(query.get('maxResults') or 1000))
    body = {'kind': 'storage#objects',
            'items': [self._gcs_resource(bucket, names[i], i) for i in found]}
    if common:
      body['prefixes'] = common
    if following is not None:
      body['nextPageToken'] = str(following)
    return self._json(200, body)

  def _s3_head(self, names: SyntheticNames, key: str):
    index = names.index(key)
    if index is None:
      return self._answer(404, b'')
    modified = UPDATED.strftime('%a, %d %b %Y %H:%M:%S GMT')
    self.send_response(200)
    for header, value in (('Content-Length', str(SIZE)), ('ETag', f'"{_crc32c(index)}"'),
                          ('Last-Modified', modified), ('Content-Type', 'image/jpeg')):
      self.send_header(header, value)
    self.end_headers()

  def _s3_list(self, bucket: str, names: SyntheticNames, query: dict):
    time.sleep(self.owner.list_latency)
    prefix, delimiter = query.get('prefix', ''), query.get('delimiter', '')
    token, after = query.get('continuation-token', ''), query.get('start-after', '')
    self.owner.listings.append((bucket, prefix, delimiter, token, after))
    first = int(token) if token else (bisect.bisect_right(names, after) if after else 0)
    found, common, following = names.page(prefix, delimiter, first,
                                          int(query.get('max-keys') or 1000))
    modified = UPDATED.strftime('%Y-%m-%dT%H:%M:%S.000Z')
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>'
             f'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
             f'<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>'
             f'<KeyCount>{len(found) + len(common)}</KeyCount><MaxKeys>1000</MaxKeys>'
             f'<Delimiter>{escape(delimiter)}</Delimiter>'
             f'<IsTruncated>{"true" if following is not None else "false"}</IsTruncated>']
    parts.extend(f'<Contents><Key>{escape(names[i])}</Key><LastModified>{modified}</LastModified>'
                 f'<ETag>&quot;{_crc32c(i)}&quot;</ETag><Size>{SIZE}</Size>'
                 f'<StorageClass>STANDARD</StorageClass></Contents>' for i in found)
    parts.extend(f'<CommonPrefixes><Prefix>{escape(c)}</Prefix></CommonPrefixes>'
                 for c in common)
    if following is not None:
      parts.append(f'<NextContinuationToken>{following}</NextContinuationToken>')
    parts.append('</ListBucketResult>')
    self._answer(200, ''.join(parts).encode(), [('Content-Type', 'application/xml')])

  do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _handle
