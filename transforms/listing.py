"""Listing storage one page at a time, the same way on local disk, gs:// and s3://.

Beam's `FileSystems.match` builds the whole list of a pattern in memory, in one call; at 100M
objects that is tens of GB in one process and hours of single-threaded paging. Here a pattern
becomes a `Listing` (where to start, what to keep), and a listing is cut into pieces that a runner
lists on any worker:
- the first folder level under the input is listed with a delimiter, and each sub-folder becomes a
  piece of its own;
- a piece is a name range (`after`, `upto`] of one prefix, and lists at most `piece_pages` pages
  (a whole prefix, a tenth of that, so that a large one spreads early). A piece that still has
  pages left then cuts the rest of its range into pieces at name points
  spaced by what it saw (the first cut as wide as the names it listed, each next one wider), so a
  flat prefix of any size spreads over workers within a few rounds, each name in one piece only.
  The stores list from a name (GCS `startOffset`, S3 `StartAfter`), and every entry is also kept
  or dropped by its range here, so a store that ignores the offset costs requests, never a
  duplicate;
- a page that fails after the client's own retries is asked again from the last page that
  succeeded, by this piece alone; pages are asked one at a time (the client's iterator would keep
  every sub-folder name of a level in a set), and each is filtered and dropped before the next:
  memory is one page (1,000 objects). All spellings of an extension (`.jpg`/`.jpeg`, any case) are
  one regular expression applied to one listing.

Folder and glob listings also skip files whose names say they are not images (`names_to_skip`),
and say which; a pattern that names a file exactly, and manifests, are never filtered by name.

The clients are the ones Beam's own FileSystems build from the pipeline options
(google-cloud-storage through `GcsIO`, boto3 through Beam's S3 client), so credentials, endpoints
and retries are the same as for every other read and write of the run. Local folders have no
pages: a folder is one page, a piece of a tree is one walk.
"""

import collections
import datetime
import logging
import os
import re
import time
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

import storage
from run_format import TEMP_FOLDERS, run_file_name
from run_format.patterns import first_glob, has_glob, unescape

PAGE_SIZE = 1000
# Pages one piece lists before it cuts the rest of its name range into pieces (100k objects), and
# into how many pieces at most; a page that fails after the client's retries is asked again this
# many times by its piece.
PIECE_PAGES = 100
FIRST_CUT_DIVISOR = 10  # a whole prefix (no piece cut yet) is cut after 10 pages
CUT_WAYS = 16
PAGE_ATTEMPTS = 3
# Names this tool writes into a run directory (run_format's) and its sinks' temporary folders:
# never images.
_RUN_FILE = run_file_name()
_RUN_TEMP_FOLDER = TEMP_FOLDERS.rstrip('*')
_EXTENSION_ALIASES = ({'jpg', 'jpeg'}, {'tif', 'tiff'})
# Extensions that never name an image, skipped in folder and glob listings: documents, data,
# archives, code, video and sound, sidecar metadata (.xmp, .aae), system files. A deny list, not an
# allow list: an image without an extension or with a rare one (.jfif, .heic, a camera's raw) is
# still tried, and fails with its reason if it cannot be decoded.
NOT_IMAGE_EXTENSIONS = (
    'txt', 'md', 'rst', 'rtf', 'pdf', 'doc', 'docx', 'xls', 'xlsx', 'ppt', 'pptx', 'odt',
    'json', 'jsonl', 'csv', 'tsv', 'xml', 'html', 'htm', 'yaml', 'yml', 'toml', 'ini', 'cfg',
    'log', 'db', 'sqlite', 'parquet', 'tfrecord', 'npy', 'npz', 'pkl', 'h5',
    'zip', 'tar', 'gz', 'tgz', 'bz2', 'xz', 'zst', '7z', 'rar',
    'py', 'ipynb', 'js', 'css', 'sh', 'bat', 'exe', 'dll', 'so',
    'mp4', 'mov', 'avi', 'mkv', 'wmv', 'm4v', 'webm', 'mts', 'mp3', 'wav', 'flac', 'aac', 'm4a',
    'ogg', 'xmp', 'aae', 'lnk', 'url')
_EXTENSION = re.compile(r'\.([A-Za-z0-9]+)$')
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class FileRef(NamedTuple):
  """A file as its listing describes it; size and time are None when it has none.

  `content_id` names the bytes, not the metadata, where the store says so: `crc32c:` on GCS,
  `etag:` on S3; None on local disk, where size and modification time are all there is.
  """
  uri: str
  size_bytes: Optional[int]
  last_modified: Optional[int]  # microseconds since the Unix epoch, UTC
  content_id: Optional[str] = None


class Listing(NamedTuple):
  """One piece of one input's listing: everything under `prefix` that `regex` keeps.

  `levels`: folder levels below `prefix` that can still match (None: any depth), so that
  `photos/*.jpg` lists one level, not the whole tree. `by_level`: listed with a delimiter, one
  folder level (sub-folders become pieces), else everything under the prefix in name order.
  `after`, `upto`: the piece's name range (URIs; after < name <= upto, None: open). `root` is where
  the input starts (local links that lead back inside it are not followed: that folder is listed
  where it really is). `piece_pages`: pages a piece lists before it cuts the rest of its range.
  """
  root: str
  prefix: str
  regex: str
  levels: Optional[int]
  excludes: Tuple[str, ...] = ()  # regexes: a URI, or one of its folder names, to leave out
  skip_names: Optional[str] = None  # a regex of paths below `root` that are not images
  by_level: bool = True
  after: Optional[str] = None
  upto: Optional[str] = None
  piece_pages: int = PIECE_PAGES


class Page(NamedTuple):
  refs: List[FileRef]
  prefixes: List[str]  # sub-folders (level listings only), each ending with '/'
  unlistable: List[Tuple[str, BaseException]] = []  # local folders the walk could not open
  more: bool = False  # the store has pages after this one


class UnlistableError(OSError):
  """A folder or prefix that cannot be listed; says so plainly when permissions are the cause."""

  def __init__(self, message: str, denied: bool):
    super().__init__(message)
    self.denied = denied


def _escapes_as_classes(pattern: str) -> str:
  """`\\[` -> `[[]`: Beam's pattern syntax has no escape, but a one-character class works."""
  return re.sub(r'\\(.)', lambda m: m.group(1) if m.group(1) == ']' else f'[{m.group(1)}]',
                pattern)


def _any_case(text: str) -> str:
  return ''.join(f'[{c.lower()}{c.upper()}]' if c.isalpha() else c for c in text)


def _extension_variants(pattern: str) -> List[str]:
  """The pattern once per spelling of its extension, each matching in any case."""
  found = _EXTENSION.search(pattern)
  if not found:
    return [pattern]
  extension = found.group(1).lower()
  spellings = next((sorted(a) for a in _EXTENSION_ALIASES if extension in a), [extension])
  stem = pattern[:found.start()]
  return [f'{stem}.{_any_case(spelling)}' for spelling in spellings]


def pattern_regex(pattern: str) -> str:
  """One regular expression for every spelling of the pattern's extension."""
  return '|'.join(f'(?:{_translate(v)})' for v in _extension_variants(_escapes_as_classes(pattern)))


def _translate(pattern: str) -> str:
  """Beam's glob translation, without its global flags and end anchor (so that several can be
  joined, and a name matched within a path)."""
  regex = FileSystem.translate_pattern(pattern)
  regex = regex[:-2] if regex.endswith('\\Z') else regex
  flags = re.match(r'\(\?[a-z]+\)', regex)
  return (f'(?{flags.group(0)[2:-1]}:' + regex[flags.end():] + ')') if flags else regex


def exclude_regexes(excludes: Sequence[str]) -> Tuple[str, ...]:
  """`--exclude`: a pattern with a `/` matches whole URIs; one without, any file or folder name
  (`*.md`, `thumbnails`), its extension in any case like the inputs'."""
  regexes = []
  for pattern in excludes:
    regex = pattern_regex(pattern)
    regexes.append(regex if '/' in pattern else f'(?:.*/)?(?:{regex})(?:/.*)?')
  return tuple(regexes)


def names_to_skip(rest: str, shard_suffixes: Tuple[str, ...] = ()) -> Optional[str]:
  """What a folder or glob listing skips by name, below where it starts: a file or folder whose name
  starts with '.' (`.DS_Store`, `.git/`, `._IMG_1.jpg`), unless `rest` (the pattern's part below
  that) asks for one; and NOT_IMAGE_EXTENSIONS, unless `rest` names an extension itself (`**.jpg`,
  or `**.json`: then it is what was asked for), or the name ends in one of `shard_suffixes`
  (`.tar`, `.parquet`: shards whose members are images, transforms/shards.py). None: nothing."""
  rules = [] if re.search(r'(?:^|/)\.', rest) else [r'(?:.*/)?\..*']
  if not _EXTENSION.search(rest):
    shards = ('(?!.*(?:' + '|'.join(map(re.escape, shard_suffixes)) + ')$)'
              if shard_suffixes else '')
    rules.append(shards + r'.*\.(?:' + '|'.join(map(re.escape, NOT_IMAGE_EXTENSIONS)) + ')')
  return f'(?is:{"|".join(rules)})' if rules else None


def plan_listing(pattern: str, excludes: Tuple[str, ...] = (), include_all_files: bool = False,
                 shard_suffixes: Tuple[str, ...] = ()) -> Listing:
  """Where a glob or folder input starts listing, and what it keeps (see transforms/read.py);
  `shard_suffixes`: names kept as shards to read, though their extension is not an image's."""
  if not has_glob(pattern):
    folder = unescape(pattern).rstrip('/') + '/'
    return Listing(folder, folder, re.escape(folder) + '.*', None, excludes,
                   None if include_all_files else names_to_skip('', shard_suffixes))
  head = pattern[:first_glob(pattern)]
  fixed = unescape(head)
  folder = fixed[:fixed.rfind('/') + 1]
  rest = pattern[len(head):]
  levels = None if '**' in rest else rest.count('/')
  # Remote stores list by name prefix, so `gs://b/img_*` lists only names starting `img_`.
  prefix = folder if not storage.is_remote(pattern) else fixed
  return Listing(folder, prefix, pattern_regex(pattern), levels, excludes,
                 None if include_all_files else names_to_skip(pattern[head.rfind('/') + 1:],
                                                              shard_suffixes))


def is_run_file(uri: str) -> bool:
  """A file some run of this tool wrote (its claim, summary, shards or temporary files)."""
  name = uri.rsplit('/', 1)[-1]
  return bool(_RUN_FILE.fullmatch(name)) or f'/{_RUN_TEMP_FOLDER}' in uri


def microseconds(moment: Optional[datetime.datetime]) -> Optional[int]:
  if moment is None:
    return None
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return (moment - _EPOCH) // datetime.timedelta(microseconds=1)


def _permission_message(where: str, exc: BaseException) -> str:
  return (f'permission denied: cannot list {where} ({exc}); check that the account running the '
          'job may list it (local: the folder\'s read and execute permissions; GCS: '
          'storage.objects.list; S3: s3:ListBucket)')


def unlistable(where: str, exc: BaseException) -> UnlistableError:
  denied = isinstance(exc, PermissionError) or getattr(exc, 'code', None) == 403 or \
      _s3_error_code(exc) in ('AccessDenied', '403')
  return UnlistableError(_permission_message(where, exc) if denied else
                         f'cannot list {where}: {exc}', denied)


def _s3_error_code(exc: BaseException) -> Optional[str]:
  response = getattr(exc, 'response', None)
  return response.get('Error', {}).get('Code') if isinstance(response, dict) else None


# -- the three stores ----------------------------------------------------------------------------
# Each lists a piece's pages from a name on (`pages`), and the remote ones read an object's bytes
# in one request (`read`).

class _Local:
  resumable = False  # a folder is one page: nothing to resume from

  @staticmethod
  def stat(path: str) -> Optional[FileRef]:
    if not (os.path.isfile(path) or (os.path.islink(path) and not os.path.isdir(path))):
      return None
    try:
      stat = os.stat(path)
    except OSError:  # a dangling link: the read reports it
      return FileRef(path, None, None)
    return FileRef(path, stat.st_size, stat.st_mtime_ns // 1000)

  @staticmethod
  def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip('/') + '/')

  def pages(self, listing: Listing, after: Optional[str]) -> Iterator[Page]:
    return (self._level if listing.by_level else self._tree)(listing, listing.prefix)

  def _level(self, listing: Listing, prefix: str) -> Iterator[Page]:
    """One folder: its files, and its sub-folders except links back inside the input."""
    real_root = os.path.realpath(listing.root)
    try:
      entries = sorted(os.scandir(prefix), key=lambda entry: entry.name)
    except FileNotFoundError:  # nothing there: the input matches nothing
      return
    except OSError as exc:
      yield Page([], [], [(prefix, exc)])
      return
    refs, folders = [], []
    for entry in entries:
      path = os.path.join(prefix, entry.name)
      if entry.is_dir():
        if not (entry.is_symlink() and self._inside(os.path.realpath(path), real_root)):
          folders.append(path + '/')
      else:
        refs.append(self.stat(path) or FileRef(path, None, None))
    yield Page(refs, folders)

  def _tree(self, listing: Listing, prefix: str) -> Iterator[Page]:
    """os.walk following links, each real folder once, one folder a page."""
    real_root = os.path.realpath(listing.root)
    seen = {real_root} if os.path.realpath(prefix) != real_root else set()
    errors = []
    for folder, folders, files in os.walk(prefix.rstrip('/') or '/', followlinks=True,
                                          onerror=errors.append):
      while errors:
        yield self._unlistable(errors.pop(0))
      real = os.path.realpath(folder)
      if real in seen:
        folders[:] = []
        continue
      seen.add(real)
      folders[:] = sorted(
          name for name in folders
          if not (os.path.islink(os.path.join(folder, name)) and
                  self._inside(os.path.realpath(os.path.join(folder, name)), real_root)))
      yield Page([self.stat(os.path.join(folder, name)) or
                  FileRef(os.path.join(folder, name), None, None) for name in sorted(files)], [])
    while errors:  # the last folders' errors come after the walk
      yield self._unlistable(errors.pop(0))

  @staticmethod
  def _unlistable(error: OSError) -> Page:
    if isinstance(error, FileNotFoundError):  # removed while being listed
      return Page([], [])
    return Page([], [], [(error.filename.rstrip('/') + '/', error)])


def _split(uri: str, scheme: str) -> Tuple[str, str]:
  bucket, _, name = uri[len(scheme):].partition('/')
  return bucket, name


class _Gcs:
  """google-cloud-storage, through the client Beam's GcsIO builds: one iterator per page (an
  iterator keeps the sub-folder names of every page it saw, in a set)."""
  _FIELDS = 'items(name,size,updated,crc32c),prefixes,nextPageToken'
  resumable = True

  def __init__(self):
    from apache_beam.io.gcp import gcsio
    options = FileSystems.get_filesystem('gs://')._pipeline_options  # pylint: disable=protected-access
    self._io = gcsio.GcsIO(pipeline_options=options)
    self._retry = self._io._storage_client_retry  # pylint: disable=protected-access

  @staticmethod
  def _ref(bucket: str, blob) -> FileRef:
    return FileRef(f'gs://{bucket}/{blob.name}', blob.size, microseconds(blob.updated),
                   f'crc32c:{blob.crc32c}' if blob.crc32c else None)

  def stat(self, uri: str) -> Optional[FileRef]:
    bucket, name = _split(uri, 'gs://')
    if not name or name.endswith('/'):
      return None
    blob = self._io.client.bucket(bucket).get_blob(name, retry=self._retry)
    return None if blob is None else self._ref(bucket, blob)

  def read(self, uri: str) -> bytes:
    """The object's bytes as stored (no transcoding), in one request: Beam's reader reloads the
    metadata first."""
    bucket, name = _split(uri, 'gs://')
    return self._io.client.bucket(bucket).blob(name).download_as_bytes(raw_download=True,
                                                                       retry=self._retry)

  def pages(self, listing: Listing, after: Optional[str]) -> Iterator[Page]:
    bucket, name = _split(listing.prefix, 'gs://')
    client, token = self._io.client, None
    while True:
      blobs = client.list_blobs(
          client.bucket(bucket), prefix=name, delimiter='/' if listing.by_level else None,
          start_offset=_split(after, 'gs://')[1] if after else None, page_token=token,
          page_size=PAGE_SIZE, fields=self._FIELDS, retry=self._retry)
      page = next(blobs.pages, None)
      if page is None:
        return
      refs = [self._ref(bucket, blob) for blob in page]
      token = blobs.next_page_token
      yield Page(refs, [f'gs://{bucket}/{p}' for p in page.prefixes], more=token is not None)
      if token is None:
        return


class _S3:
  """boto3's list_objects_v2, through the client Beam's S3 FileSystem builds."""
  resumable = True

  def __init__(self):
    from apache_beam.io.aws import s3io
    options = FileSystems.get_filesystem('s3://')._options  # pylint: disable=protected-access
    self._client = s3io.S3IO(options=options).client.client

  @staticmethod
  def _ref(bucket: str, key: str, item) -> FileRef:
    etag = (item.get('ETag') or '').strip('"')
    return FileRef(f's3://{bucket}/{key}', item.get('Size', item.get('ContentLength')),
                   microseconds(item.get('LastModified')), f'etag:{etag}' if etag else None)

  def stat(self, uri: str) -> Optional[FileRef]:
    bucket, key = _split(uri, 's3://')
    if not key or key.endswith('/'):
      return None
    try:
      return self._ref(bucket, key, self._client.head_object(Bucket=bucket, Key=key))
    except Exception as exc:  # botocore's ClientError: 404 is "no such object", others raise
      if _s3_error_code(exc) in ('404', 'NoSuchKey', 'NotFound'):
        return None
      raise

  def read(self, uri: str) -> bytes:
    """One GET (Beam's reader asks for the object's metadata first, then reads ranges)."""
    bucket, key = _split(uri, 's3://')
    return self._client.get_object(Bucket=bucket, Key=key)['Body'].read()

  def pages(self, listing: Listing, after: Optional[str]) -> Iterator[Page]:
    bucket, key = _split(listing.prefix, 's3://')
    arguments = {'Bucket': bucket, 'Prefix': key, 'MaxKeys': PAGE_SIZE}
    if listing.by_level:
      arguments['Delimiter'] = '/'
    if after:
      arguments['StartAfter'] = _split(after, 's3://')[1]
    while True:
      page = self._client.list_objects_v2(**arguments)
      more = bool(page.get('IsTruncated'))
      yield Page([self._ref(bucket, item['Key'], item) for item in page.get('Contents', ())],
                 [f's3://{bucket}/{p["Prefix"]}' for p in page.get('CommonPrefixes', ())], more=more)
      if not more:
        return
      arguments['ContinuationToken'] = page['NextContinuationToken']


_clients = {}


def store_for(uri: str):
  """The store a URI lives in; other schemes go through Beam's FileSystems (whole lists).

  One client per process and set of options (a client fetches bucket metadata when it starts).
  """
  if not storage.is_remote(uri):
    return _Local()
  kind = {'gs://': _Gcs, 's3://': _S3}.get(uri[:5])
  if kind is None:
    return _BeamFileSystem()
  key = (kind, id(FileSystems._pipeline_options),  # pylint: disable=protected-access
         os.environ.get('STORAGE_EMULATOR_HOST'))
  if key not in _clients:
    if len(_clients) > 8:  # options of earlier runs in this process
      _clients.clear()
    _clients[key] = kind()
  return _clients[key]


class _BeamFileSystem:
  """Any other Beam FileSystem (hdfs://, azfs://...): its own match, in one call."""
  resumable = False

  @staticmethod
  def stat(uri: str) -> Optional[FileRef]:
    if not FileSystems.exists(uri) or uri.endswith('/'):
      return None
    metadata = FileSystems.get_filesystem(uri).metadata(uri)
    return FileRef(uri, metadata.size_in_bytes,
                   round(metadata.last_updated_in_seconds * 1_000_000)
                   if metadata.last_updated_in_seconds is not None else None)

  @staticmethod
  def pages(listing: Listing, after: Optional[str]) -> Iterator[Page]:
    result = FileSystems.match([listing.prefix + '**'])[0]
    yield Page([FileRef(m.path, m.size_in_bytes, round(m.last_updated_in_seconds * 1_000_000))
                for m in result.metadata_list if not m.path.endswith('/')], [])


def read_object(uri: str) -> Optional[bytes]:
  """An object's bytes in one request where the store allows it (gs://, s3://), else None: the
  caller opens it through Beam's FileSystems."""
  store = store_for(uri)
  return store.read(uri) if hasattr(store, 'read') else None


# -- listing -------------------------------------------------------------------------------------

class Listed(NamedTuple):
  """What one page of a listing gives: files kept, sub-listings to spread, folders that failed,
  run files left out, names that are not UTF-8 (escaped: no output can hold them), and files
  skipped because their names say they are not images (escaped likewise)."""
  refs: List[FileRef]
  pieces: List[Listing]
  unlistable: List[Tuple[str, BaseException]]
  run_files: List[str]
  seen: int  # objects and sub-folders the page held before filtering
  bad_names: List[str] = []
  skipped_by_name: List[str] = []


def name_if_undecodable(uri: str) -> Optional[str]:
  """The name with its undecodable bytes as \\xNN, to show in messages; None for a UTF-8 name
  (local file names are bytes: Python keeps the ones that are not UTF-8 as lone surrogates)."""
  try:
    uri.encode('utf-8')
    return None
  except UnicodeEncodeError:
    return os.fsencode(uri).decode('utf-8', 'backslashreplace')


def _in_range(entry: str, after: Optional[str], upto: Optional[str]) -> bool:
  return (after is None or entry > after) and (upto is None or entry <= upto)


def _keep(listing: Listing, page: Page, regex: 're.Pattern', excludes,
          skip: Optional['re.Pattern'], after: Optional[str]) -> Listed:
  refs, run_files, bad_names, skipped = [], [], [], []
  for ref in page.refs:
    if ref.uri.endswith('/') or not _in_range(ref.uri, after, listing.upto) or \
        not regex.fullmatch(ref.uri):  # '/': a "folder" placeholder
      continue
    if is_run_file(ref.uri):
      run_files.append(ref.uri)
    elif any(e.fullmatch(ref.uri) for e in excludes):
      continue  # --exclude: left out as the user said, not counted
    elif skip and skip.fullmatch(ref.uri[len(listing.root):]):
      skipped.append(name_if_undecodable(ref.uri) or ref.uri)
    else:
      undecodable = name_if_undecodable(ref.uri)
      if undecodable:
        bad_names.append(undecodable)
      else:
        refs.append(ref)
  pieces = []
  if listing.levels is None or listing.levels > 0:
    levels = None if listing.levels is None else listing.levels - 1
    for prefix in page.prefixes:
      if not _in_range(prefix, after, listing.upto) or \
          any(e.fullmatch(prefix.rstrip('/')) for e in excludes) or \
          prefix.rstrip('/').rsplit('/', 1)[-1].startswith(_RUN_TEMP_FOLDER):
        continue
      undecodable = name_if_undecodable(prefix)
      if undecodable:
        bad_names.append(undecodable)
      else:
        pieces.append(listing._replace(prefix=prefix, levels=levels, by_level=levels is not None,
                                       after=None, upto=None))
  return Listed(refs, pieces, page.unlistable, run_files, len(page.refs) + len(page.prefixes),
                bad_names, skipped)


def _text_at_or_after(raw: bytes) -> Optional[str]:
  """The smallest text whose UTF-8 is at or after `raw` (names sort by their UTF-8 bytes, as
  Python sorts str), or None past every text."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as exc:
    head, tail = raw[:exc.start].decode('utf-8'), raw[exc.start:]

  def encoded(code: int) -> bytes:
    return chr(0xE000 if 0xD800 <= code < 0xE000 else code).encode('utf-8')

  low, high = 0, 0x110000
  while low < high:
    middle = (low + high) // 2
    if encoded(middle) >= tail:
      high = middle
    else:
      low = middle + 1
  return None if low == 0x110000 else head + chr(0xE000 if 0xD800 <= low < 0xE000 else low)


def cut(listing: Listing, first: str, last: str) -> List[Listing]:
  """The rest of a piece's range, after `last`, in CUT_WAYS pieces at most: the first as wide in
  name space (names read as base-256 numbers) as `first`..`last`, the ones after it wider each
  time by one factor, so that the last reaches the end of the range; a piece that still holds too
  much cuts itself again. Names crowd and thin out (`img0099999` to `img0100000` is a long way in
  name space), which is why the widths grow: no guess of the density is needed beyond the first."""
  width = max(len(text.encode('utf-8')) for text in (first, last, listing.upto or '',
                                                     listing.prefix)) + 1

  def number(text: str) -> int:
    return int.from_bytes(text.encode('utf-8').ljust(width, b'\0'), 'big')

  prefix = listing.prefix.encode('utf-8')
  end = number(listing.upto) if listing.upto else \
      (int.from_bytes(prefix, 'big') + 1) << (8 * (width - len(prefix)))
  low, step = number(last), max(number(last) - number(first), 1)
  growth = max(1, -(-max((end - low).bit_length() - step.bit_length(), 0) // (CUT_WAYS - 1)))
  points, offset = [], step
  while len(points) < CUT_WAYS - 1 and low + offset < end:
    text = _text_at_or_after((low + offset).to_bytes(width, 'big').rstrip(b'\0'))
    if text is not None and text > (points[-1] if points else last) and \
        (listing.upto is None or text < listing.upto):
      points.append(text)
    offset <<= growth
  bounds = [last] + points + [listing.upto]
  return [listing._replace(after=after, upto=upto) for after, upto in zip(bounds, bounds[1:])]


def _last_entry(page: Page, after: Optional[str], upto: Optional[str]) -> Optional[str]:
  entries = [e for e in [ref.uri for ref in page.refs] + page.prefixes if _in_range(e, after, upto)]
  return max(entries) if entries else None


def list_piece(listing: Listing) -> Iterator[Listed]:
  """One piece, a page at a time: at most `piece_pages` pages of its range, the last one carrying
  the pieces the rest is cut into. A page that fails after the client's retries is asked again,
  from the last page listed, up to PAGE_ATTEMPTS times; then the runner retries the piece."""
  regex, excludes = re.compile(listing.regex), [re.compile(e) for e in listing.excludes]
  skip = re.compile(listing.skip_names) if listing.skip_names else None
  store = store_for(listing.prefix)
  cursor, first, pages, failures = listing.after, None, 0, 0
  # A whole prefix that turns out large is cut early, so that other workers start on it soon.
  budget = listing.piece_pages if listing.after or listing.upto else \
      max(1, listing.piece_pages // FIRST_CUT_DIVISOR)
  while True:
    try:
      for page in store.pages(listing, cursor):
        pages += 1
        # Local walks are not in name order: only remote pages are kept from the cursor on.
        lower = cursor if store.resumable else listing.after
        listed = _keep(listing, page, regex, excludes, skip, lower)
        last = _last_entry(page, lower, listing.upto)
        beyond = listing.upto is not None and any(
            e > listing.upto for e in [ref.uri for ref in page.refs] + page.prefixes)
        if last is not None:
          first, cursor = first or min(
              e for e in [ref.uri for ref in page.refs] + page.prefixes
              if _in_range(e, listing.after, listing.upto)), last
        if beyond:
          yield listed
          return
        if page.more and pages >= budget and first is not None and first != cursor:
          yield listed._replace(pieces=listed.pieces + cut(listing, first, cursor))
          return
        yield listed
      return
    except Exception as exc:  # the store's error after its own retries
      error = unlistable(listing.prefix, exc)
      failures += 1
      if error.denied or not store.resumable or failures >= PAGE_ATTEMPTS:
        raise error from exc
      logging.warning('%s; listing it again from %s', error, cursor or 'its start')
      time.sleep(0.5 * failures)


def stat_object(uri: str) -> Optional[FileRef]:
  """One request: the file's FileRef, or None when nothing (or a folder) is there."""
  return store_for(uri).stat(uri)


def list_sequentially(listing: Listing, max_pages: Optional[int] = None) -> Iterator[Listed]:
  """A whole listing in this process (what a runner does spread over workers), each page's
  pieces listed after it; at most `max_pages` pages when given."""
  pages, queue = 0, collections.deque([listing])
  while queue:
    for listed in list_piece(queue.popleft()):
      pages += 1
      queue.extend(listed.pieces)
      yield listed._replace(pieces=[])
      if max_pages and pages >= max_pages:
        return


_said = set()


def say_once(message: str, *args, key: Optional[str] = None) -> None:
  """Logs a warning once per process (a listing of many pages says a thing once): once per
  `key` when given, else per text."""
  key = key or message % args
  if key not in _said:
    _said.add(key)
    logging.warning(message, *args)
