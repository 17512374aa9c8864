"""Stage 1: find the input files on any Beam FileSystem and read each image's bytes.

Inputs are patterns (`--input`) or manifests of URIs (`--input_manifest`). One syntax on every
FileSystem:
- a path without glob characters names a file, or else a folder: every file under it, recursively
  (`/data/cam`, `/data/cam/`, `gs://b/photos` and `gs://b/photos/` all mean the same);
- `*` matches within one path segment, `**` across segments, `?` one character, `[abc]` a class;
  a backslash makes the next character literal (`star\\[1\\].jpg`), and a pattern that names an
  existing file exactly is that file;
- a pattern's file extension matches in any case, with `.jpg`/`.jpeg` and `.tif`/`.tiff` as one;
- local folders are walked following symbolic links (each real folder once), and a link that
  leads nowhere is reported as a `read` failure instead of vanishing.
"""

import logging
import os
import re
from typing import Iterator, List, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems

from transforms.failures import FAILURES_TAG, READ, Failure

METRICS_NAMESPACE = 'read'
DEFAULT_MAX_FILE_BYTES = 256 << 20

_GLOB_CHARACTERS = '*?['
_EXTENSION_ALIASES = ({'jpg', 'jpeg'}, {'tif', 'tiff'})
_EXTENSION = re.compile(r'\.([A-Za-z0-9]+)$')


class FileRef(NamedTuple):
  """A matched file as its listing describes it; size and time are None when it has none."""
  uri: str
  size_bytes: Optional[int]
  last_modified: Optional[int]  # microseconds since the Unix epoch, UTC


class ImageFile(NamedTuple):
  uri: str
  size_bytes: int
  last_modified: Optional[int]
  data: bytes


class NoInputError(ValueError):
  """An input matches no file: a typo should not become an empty, successful run."""


class FileTooLargeError(ValueError):
  """Bigger than --max_file_bytes: not read, so one stray video cannot exhaust a worker."""


def _is_local(path: str) -> bool:
  return '://' not in path or path.startswith('file://')


def normalize_input(pattern: str) -> str:
  """Local patterns made absolute (so image/uri names one file) with `~` expanded."""
  if not _is_local(pattern):
    return pattern
  return os.path.abspath(os.path.expanduser(pattern[len('file://'):]
                                            if pattern.startswith('file://') else pattern))


def _has_glob(pattern: str) -> bool:
  escaped = False
  for character in pattern:
    if escaped:
      escaped = False
    elif character == '\\':
      escaped = True
    elif character in _GLOB_CHARACTERS:
      return True
  return False


def _unescape(pattern: str) -> str:
  return re.sub(r'\\(.)', r'\1', pattern)


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


def _static_prefix(pattern: str) -> str:
  """The folder part before the first glob character."""
  first = min((pattern.find(c) for c in _GLOB_CHARACTERS if c in pattern), default=len(pattern))
  return pattern[:pattern.rfind('/', 0, first) + 1]


def _microseconds(seconds: Optional[float]) -> Optional[int]:
  return None if seconds is None else int(round(seconds * 1_000_000))


def _local_ref(path: str) -> FileRef:
  try:
    stat = os.stat(path)
  except OSError:  # a dangling link: the read reports it
    return FileRef(path, None, None)
  return FileRef(path, stat.st_size, stat.st_mtime_ns // 1000)


def _walk_local(folder: str, regex: 're.Pattern', max_depth: Optional[int]) -> Iterator[FileRef]:
  """os.walk following links, each real folder once (a link back up cannot loop)."""
  seen = set()
  base_depth = folder.rstrip('/').count('/')
  for root, folders, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      folders[:] = []
      continue
    seen.add(real)
    if max_depth is not None and root.rstrip('/').count('/') - base_depth >= max_depth - 1:
      folders[:] = []
    for name in sorted(files):
      path = os.path.join(root, name)
      if regex.fullmatch(path):
        yield _local_ref(path)


def _match_local(pattern: str) -> Iterator[FileRef]:
  prefix = _static_prefix(pattern)
  regex = re.compile(FileSystem.translate_pattern(pattern))
  if not os.path.isdir(prefix or '.'):
    return
  rest = pattern[len(prefix):]
  depth = None if '**' in rest else rest.count('/') + 1
  yield from _walk_local(prefix, regex, depth)


def _remote_ref(metadata) -> FileRef:
  return FileRef(metadata.path, metadata.size_in_bytes,
                 _microseconds(metadata.last_updated_in_seconds))


def _match_remote(pattern: str, limit: Optional[int]) -> Iterator[FileRef]:
  result = FileSystems.match([pattern], limits=[limit] if limit else None)[0]
  for metadata in result.metadata_list:
    if not metadata.path.endswith('/'):  # a "folder" placeholder object
      yield _remote_ref(metadata)


def _is_file(path: str) -> bool:
  if _is_local(path):
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.isdir(path))
  try:
    return FileSystems.exists(path) and not path.endswith('/')
  except Exception:  # an unlistable bucket is reported by the match that follows
    return False


def _file_ref(path: str) -> FileRef:
  """One request for a remote file; raises when it is missing or unreadable."""
  if _is_local(path):
    return _local_ref(path)
  return _remote_ref(FileSystems.get_filesystem(path).metadata(path))


def match_input(pattern: str, limit: Optional[int] = None) -> Iterator[FileRef]:
  """Every file one `--input` names (see the module docstring), possibly with repeats."""
  literal = _unescape(pattern)
  if _is_file(literal):
    yield _file_ref(literal)
    return
  if _has_glob(pattern):
    patterns = _extension_variants(_escapes_as_classes(pattern))
  else:
    patterns = [literal.rstrip('/') + '/**']
  found = 0
  for variant in patterns:
    matches = _match_local(variant) if _is_local(variant) else _match_remote(variant, limit)
    for ref in matches:
      yield ref
      found += 1
      if limit and found >= limit:
        return


def check_inputs_match(patterns: Sequence[str]) -> None:
  """Fails before the pipeline starts when any input names nothing; asks for one file only."""
  empty: List[str] = []
  for pattern in patterns:
    try:
      if next(match_input(pattern, limit=1), None) is None:
        empty.append(pattern)
    except Exception as exc:  # a bad bucket, scheme or permission: say which pattern
      raise NoInputError(f'--input {pattern!r} cannot be listed: {exc}') from exc
  if empty:
    raise NoInputError(
        'no file matches --input ' + ', '.join(repr(p) for p in empty) +
        '; check the path. A folder means every file under it; patterns use * (one folder '
        'level), ** (any depth) and ?, e.g. "gs://bucket/images/**.jpg" (quoted, so that the '
        'shell does not expand it)')


def check_manifests_exist(manifests: Sequence[str]) -> None:
  missing = [m for m in manifests if not FileSystems.match([m])[0].metadata_list]
  if missing:
    raise NoInputError('no manifest file matches --input_manifest ' +
                       ', '.join(repr(m) for m in missing))


class _MatchInput(beam.DoFn):

  def process(self, pattern: str):
    yield from match_input(pattern)


def manifest_uris(text: str) -> Iterator[str]:
  """One URI a line; blank lines and `#` comments ignored; local paths made absolute."""
  line = text.strip()
  if line and not line.startswith('#'):
    yield normalize_input(line)


class _StatUri(beam.DoFn):
  """A manifest URI's size and time, one request each, without listing anything; a missing file
  is a failure."""

  def process(self, uri: str):
    try:
      yield _file_ref(uri)
    except Exception as exc:  # missing, or a storage error: this image's failure, not the run's
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(uri, READ, exc))


def _first(refs):
  return next(iter(refs))


class MatchFiles(beam.PTransform):
  """Patterns and manifests -> FileRef, each file once however often it is named.

  The grouping by URI also breaks fusion, so that runners spread the reads over workers instead of
  reading on the one that listed them; manifest URIs are reshuffled before their metadata is
  looked up, so that a long manifest is not stat-ed by one worker.
  """

  def __init__(self, patterns: Sequence[str], manifests: Sequence[str] = ()):
    super().__init__()
    self._patterns = list(patterns)
    self._manifests = list(manifests)

  def expand(self, pbegin):
    listed = (pbegin
              | 'Patterns' >> beam.Create(self._patterns)
              | 'Match' >> beam.ParDo(_MatchInput()))
    stat_failures = []
    sources = [listed]
    if self._manifests:
      stated = (pbegin
                | 'Manifests' >> beam.Create(self._manifests)
                | 'ReadManifests' >> beam.io.ReadAllFromText()
                | 'Uris' >> beam.FlatMap(manifest_uris)
                | 'Reshuffle' >> beam.Reshuffle()
                | 'Stat' >> beam.ParDo(_StatUri()).with_outputs(FAILURES_TAG, main='refs'))
      sources.append(stated.refs)
      stat_failures.append(stated[FAILURES_TAG])
    refs = (tuple(sources)
            | 'AllRefs' >> beam.Flatten()
            | 'KeyByUri' >> beam.Map(lambda ref: (ref.uri, ref))
            | 'OnePerUri' >> beam.CombinePerKey(_first)
            | 'Values' >> beam.Values())
    failures = (tuple(stat_failures) | 'StatFailures' >> beam.Flatten()) if stat_failures \
        else pbegin | 'NoStatFailures' >> beam.Create([])
    return {'refs': refs, FAILURES_TAG: failures}


class _ReadFile(beam.DoFn):
  """Reads one matched file; a file that cannot be read becomes a dead-letter record."""

  def __init__(self, max_file_bytes: int):
    self._max_file_bytes = max_file_bytes
    self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'failed')
    self._bytes = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'bytes')

  def process(self, ref: FileRef):
    try:
      if ref.size_bytes is None:
        raise FileNotFoundError(f'{ref.uri} does not exist (or is a link that leads nowhere)')
      if ref.size_bytes > self._max_file_bytes:
        raise FileTooLargeError(
            f'{ref.size_bytes} bytes, over --max_file_bytes {self._max_file_bytes}')
      # UNCOMPRESSED: Beam would otherwise gunzip a file named *.gz behind our back.
      with FileSystems.open(ref.uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()
    except Exception as exc:  # any storage error is this image's failure, not the run's
      logging.warning('cannot read %s: %s', ref.uri, exc)
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(
          ref.uri, READ, exc, size_bytes=ref.size_bytes, last_modified=ref.last_modified))
      return
    self._bytes.inc(len(data))
    yield ImageFile(ref.uri, len(data), ref.last_modified, data)


class ReadImages(beam.PTransform):
  """FileRef -> ImageFile, plus Failure records under FAILURES_TAG."""

  def __init__(self, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    super().__init__()
    self._max_file_bytes = max_file_bytes

  def expand(self, refs):
    return refs | 'Read' >> beam.ParDo(_ReadFile(self._max_file_bytes)).with_outputs(
        FAILURES_TAG, main='images')
