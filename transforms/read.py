"""Stage 1: find the input files on any Beam FileSystem and read each image's bytes.

Inputs are patterns (`--input`) or manifests of URIs (`--input_manifest`). One syntax on every
FileSystem:
- a path without glob characters names a file, or else a folder: every file under it, recursively
  (`/data/cam`, `/data/cam/`, `gs://b/photos` and `gs://b/photos/` all mean the same);
- `*` matches within one path segment, `**` across segments, `?` one character, `[abc]` a class;
  a backslash makes the next character literal (`star\\[1\\].jpg`), and a pattern that names an
  existing file exactly is that file;
- a pattern's file extension matches in any case, with `.jpg`/`.jpeg` and `.tif`/`.tiff` as one;
- `--exclude` patterns leave files out: one with a `/` matches whole URIs, one without matches
  any file or folder name (`*.md`, `thumbnails`);
- local folders are walked following symbolic links (each real folder once), and a link that
  leads nowhere is reported as a `read` failure instead of vanishing;
- a folder that cannot be listed (permissions) is a `read` failure, not a silent gap;
- files a run of this tool wrote (claims, summaries, shards, beam-temp-*) are never read as
  images, so an output inside an input folder is left out, and said once;
- folders and globs skip files whose names say they are not images: hidden ones (a name, or a
  folder's below the input's fixed part, starting with '.') and a deny list of extensions
  (transforms/listing.py NOT_IMAGE_EXTENSIONS), unless the pattern asks for them; the summary
  counts them (`skipped_by_name`). `include_all_files` turns this off.

Listing streams, one page at a time, and spreads over workers (transforms/listing.py).
"""

import collections
import logging
import os
import re
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

import storage
from run_format.patterns import has_glob, unescape
from transforms.failures import FAILURES_TAG, READ, Failure
from transforms.listing import (PIECE_PAGES, FileRef, Listed, UnlistableError, exclude_regexes,
                                list_piece, list_sequentially, plan_listing,
                                read_object, say_once, stat_object, unlistable)
from transforms.manifests import (CSV, Inventory, check_inventory, csv_rows, inventory,
                                  row_object, suffix_kind, wanted_columns)

METRICS_NAMESPACE = 'read'
DEFAULT_MAX_FILE_BYTES = 256 << 20
# The launch's look at each input: at most this many list pages (plus one request for a pattern
# that might name a file), whatever the bucket holds.
CHECK_PAGES = 3
# Stages that list pieces after the input's first level: each piece that lists its pages and
# still has names left cuts them into pieces for the next stage; the last stage lists the pieces
# it is given, and those they cut, itself (Beam graphs have no loops).
LISTING_ROUNDS = 3
_PIECES_TAG = 'pieces'
_LOOK_UP_TAG = 'look_up'
SKIPPED_BY_NAME_TAG = 'skipped_by_name'


class ImageFile(NamedTuple):
  uri: str
  size_bytes: int
  last_modified: Optional[int]
  data: bytes
  content_id: Optional[str] = None
  # A shard's member (transforms/shards.py): where its bytes lie in the stored shard, when the
  # format allows (an uncompressed tar), and the shard's size; `last_modified` and `content_id`
  # are then the shard's, so that an unchanged shard can be told from its members.
  byte_offset: Optional[int] = None
  byte_length: Optional[int] = None
  shard_size_bytes: Optional[int] = None


class NoInputError(ValueError):
  """An input matches no file: a typo should not become an empty, successful run."""


class FileTooLargeError(ValueError):
  """Bigger than --max_file_bytes: not read, so one stray video cannot exhaust a worker."""


class ManifestError(NoInputError):
  """A manifest the launch cannot use: missing, not text, or naming no URI."""


def normalize_input(pattern: str) -> str:
  """Local patterns made absolute (so image/uri names one file) with `~` expanded."""
  if storage.is_remote(pattern):
    return pattern
  return os.path.abspath(os.path.expanduser(pattern[len('file://'):]
                                            if pattern.startswith('file://') else pattern))


def _literal_file(pattern: str) -> Optional[FileRef]:
  """The file a pattern names exactly, if any: one request."""
  try:
    return stat_object(unescape(pattern))
  except Exception:  # an unlistable bucket is reported by the listing that follows
    return None


def _excludes(excludes: Sequence[str], output: Optional[str]) -> Tuple[str, ...]:
  own = (re.escape(output.rstrip('/')) + '(?:/.*)?',) if output else ()
  return exclude_regexes(excludes) + own


def match_input(pattern: str, excludes: Sequence[str] = (),
                include_all_files: bool = False) -> Iterator[FileRef]:
  """Every file one `--input` names (see the module docstring), listed in this process."""
  literal = _literal_file(pattern)
  if literal is not None:
    yield literal
    return
  for listed in list_sequentially(plan_listing(pattern, exclude_regexes(excludes),
                                               include_all_files)):
    yield from listed.refs


def _first_match(pattern: str, excludes: Tuple[str, ...], include_all_files: bool,
                 shard_suffixes: Tuple[str, ...]) -> Tuple[Optional[bool], List[str]]:
  """True: the input names a file; False: it names none; None: no match within CHECK_PAGES
  pages, which are not all (the job lists the rest). Beside it, the files skipped by name."""
  if _literal_file(pattern) is not None:
    return True, []
  pages, seen, denied, skipped = 0, 0, [], []
  for listed in list_sequentially(plan_listing(pattern, excludes, include_all_files,
                                               shard_suffixes), max_pages=CHECK_PAGES):
    if listed.refs or listed.bad_names:
      return True, []
    pages, seen = pages + 1, seen + listed.seen
    denied.extend(unlistable(folder, exc) for folder, exc in listed.unlistable)
    skipped.extend(listed.skipped_by_name)
  if denied:
    raise denied[0]
  return (None if pages >= CHECK_PAGES and seen else False), skipped


def _is_empty_local_folder(pattern: str) -> bool:
  """A local folder with no file in it or under it (a walk that stops at the first file)."""
  if has_glob(pattern) or storage.is_remote(pattern):
    return False
  folder = storage.local_path(unescape(pattern))
  return os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder))


def check_inputs_match(patterns: Sequence[str], excludes: Sequence[str] = (),
                       output: Optional[str] = None, include_all_files: bool = False,
                       shard_suffixes: Tuple[str, ...] = ()) -> None:
  """Fails before the pipeline starts when an input names nothing, in a bounded number of
  requests per input (the launch must not list a bucket). `shard_suffixes`: as MatchFiles'."""
  empty: List[str] = []
  skipped: List[str] = []
  for pattern in patterns:
    try:
      found, skipped_here = _first_match(pattern, _excludes(excludes, output), include_all_files,
                                         shard_suffixes)
    except Exception as exc:  # a bad bucket, scheme or permission: say which pattern
      raise NoInputError(f'--input {pattern!r} cannot be listed: {exc}') from exc
    if found is False and not skipped_here and _is_empty_local_folder(pattern):
      raise NoInputError(f'--input {pattern!r} is a folder with no file in it or under it: '
                         'nothing to embed; check that it is the folder you meant')
    if found is False:
      empty.append(pattern)
      skipped.extend(skipped_here)
    elif found is None:
      logging.warning('--input %r: no match among its first %d pages of listing; the job lists '
                      'the rest', pattern, CHECK_PAGES)
  if empty:
    raise NoInputError(
        'no file matches --input ' + ', '.join(repr(p) for p in empty) +
        '; check the path (and --exclude). A folder means every file under it; patterns use * '
        '(one folder level), ** (any depth) and ?, e.g. "gs://bucket/images/**.jpg" (quoted, so '
        'that the shell does not expand it)' + (
            '. Skipped by name as hidden or not images: ' + ', '.join(skipped[:3]) +
            '; --include_all_files reads them' if skipped else ''))


def manifest_uri(line: str) -> Optional[str]:
  """A manifest line's URI: blank lines and `#` comments ignored, also after a URI (`uri  # note`,
  a `#` after white space); a `#` inside a name (`photo#1.jpg`) is part of it. Local paths are
  made absolute."""
  uri = re.split(r'(?:^|\s)#', line, maxsplit=1)[0].strip()
  return normalize_input(uri) if uri else None


def _first_uri(manifest: str) -> Optional[str]:
  """Reads a manifest up to its first URI; a line before it that is not UTF-8 is an error."""
  with FileSystems.open(manifest) as f:
    for number, raw in enumerate(iter(f.readline, b''), start=1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as exc:
        raise ManifestError(f'--input_manifest {manifest} line {number} is not UTF-8 text '
                            f'({exc.reason} at byte {exc.start}): {raw[:80]!r}; save the '
                            'manifest as UTF-8') from exc
      uri = manifest_uri(line)
      if uri:
        return uri
  return None


def check_manifests_exist(manifests: Sequence[str]) -> None:
  """Each manifest exists and names a URI before its first line that is not UTF-8; reads only up
  to its first URI (a manifest may hold 100M lines: later lines that are not UTF-8 become
  dead-letter records of the run)."""
  for pattern in manifests:
    files = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if not files:
      raise ManifestError(f'no manifest file matches --input_manifest {pattern!r}')
    found = inventory(pattern)
    if found is not None or suffix_kind(pattern) == 'parquet':
      try:
        check_inventory(found or Inventory(pattern, 'parquet', ()))
      except ValueError as exc:
        raise ManifestError(str(exc)) from exc
      continue
    if not any(_first_uri(manifest) for manifest in files):
      raise ManifestError(f'--input_manifest {pattern!r} names no image: only blank lines and '
                          '# comments')


def _say_run_files(run_files: Sequence[str], counter) -> None:
  for uri in run_files:
    counter.inc()
    say_once('left out %s: a run directory of this tool (what a run writes is never read as '
             'an image)', uri.rsplit('/', 1)[0])


def _unlistable_failures(listed: Listed):
  for folder, exc in listed.unlistable:
    error = unlistable(folder, exc)
    logging.warning('%s', error)
    yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(folder, READ, type(exc).__name__,
                                                         str(error)))


def _bad_name_failures(listed: Listed):
  for name in listed.bad_names:
    logging.warning('cannot read %s: its name is not UTF-8', name)
    yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
        name, READ, 'UnicodeEncodeError',
        f'the name of {name} is not UTF-8 (shown with \\xNN for its other bytes): no output '
        'can name it; rename the file to UTF-8'))


class _ListingDoFn(beam.DoFn):

  def __init__(self):
    self._run_files = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'run_files_left_out')
    self._pages = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'list_pages')

  def _emit(self, listings: Iterator[Listed], where: str):
    try:
      for listed in listings:
        self._pages.inc()
        yield from listed.refs
        for piece in listed.pieces:
          yield beam.pvalue.TaggedOutput(_PIECES_TAG, piece)
        yield from _unlistable_failures(listed)
        yield from _bad_name_failures(listed)
        _say_run_files(listed.run_files, self._run_files)
        for uri in listed.skipped_by_name:
          say_once('skipped %s by its name, as every hidden file and file whose extension is '
                   'not an image\'s (.txt, .json, ...): run_summary.json counts them as '
                   'skipped_by_name; --include_all_files reads them', uri, key=SKIPPED_BY_NAME_TAG)
          yield beam.pvalue.TaggedOutput(SKIPPED_BY_NAME_TAG, uri)
    except UnlistableError as exc:
      if not exc.denied:
        raise  # the runner retries this listing alone
      logging.warning('%s', exc)
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(where, READ, 'PermissionError',
                                                           str(exc)))


class _PlanListing(_ListingDoFn):
  """An input -> the file it names, or its first folder level: files, and one piece per
  sub-folder, for the runner to spread."""

  def __init__(self, excludes: Tuple[str, ...], piece_pages: int, include_all_files: bool,
               shard_suffixes: Tuple[str, ...]):
    super().__init__()
    self._excludes = excludes
    self._piece_pages = piece_pages
    self._include_all_files = include_all_files
    self._shard_suffixes = shard_suffixes

  def process(self, pattern: str):
    literal = _literal_file(pattern)
    if literal is not None:
      yield literal
      return
    listing = plan_listing(pattern, self._excludes, self._include_all_files,
                           self._shard_suffixes)._replace(
        piece_pages=self._piece_pages)
    yield from self._emit(list_piece(listing), listing.prefix)


class _ListPiece(_ListingDoFn):
  """One piece (a sub-folder, or a name range of one), one page at a time; the pieces it cuts
  go to the next stage, or, in the last (`drain`), are listed here after it."""

  def __init__(self, drain: bool):
    super().__init__()
    self._drain = drain

  def process(self, listing):
    pending = collections.deque([listing])
    while pending:
      piece = pending.popleft()
      for output in self._emit(list_piece(piece), piece.prefix):
        if self._drain and isinstance(output, beam.pvalue.TaggedOutput) and \
            output.tag == _PIECES_TAG:
          pending.append(output.value)
        else:
          yield output


def _manifest_line(line: Tuple[str, bytes]):
  manifest, raw = line
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as exc:
    yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
        manifest, READ, 'UnicodeDecodeError',
        f'a line of manifest {manifest} is not UTF-8 ({exc.reason} at byte {exc.start}): '
        f'{raw[:200]!r}'))
    return
  uri = manifest_uri(text)
  if uri:
    yield uri


class _InventoryRows(beam.DoFn):
  """Rows of an inventory manifest (CSV lines, or Parquet rows as dicts) -> the FileRef of each
  row that says the object's size and identity (no request); the URIs of the others, to look up
  (tag _LOOK_UP_TAG); a row that names no object is a failure naming the manifest."""

  def __init__(self, found: Inventory):
    self._found = found
    self._described = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'manifest_rows_described')
    self._looked_up = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'manifest_rows_looked_up')

  def process(self, row):
    try:
      rows = csv_rows(row, self._found.columns) if isinstance(row, bytes) else [row]
      objects = [row_object(values, url_encoded_keys=self._found.kind == CSV)
                 for values in rows]
    except (ValueError, UnicodeDecodeError) as exc:  # a bad number, date or encoding
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
          self._found.pattern, READ, type(exc).__name__,
          f'a row of manifest {self._found.pattern} cannot be read ({exc}): {str(row)[:200]}'))
      return
    for found in objects:
      if found.uri is None:
        yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
            self._found.pattern, READ, 'ValueError',
            f'a row of manifest {self._found.pattern} names no object: {str(row)[:200]}'))
      elif found.ref is not None:
        self._described.inc()
        yield found.ref._replace(uri=normalize_input(found.ref.uri))
      else:
        self._looked_up.inc()
        yield beam.pvalue.TaggedOutput(_LOOK_UP_TAG, normalize_input(found.uri))


class _StatUri(beam.DoFn):
  """A manifest URI's size, time and content identity, one request each, without listing
  anything; a missing file is a failure."""

  def process(self, uri: str):
    try:
      ref = stat_object(uri)
      if ref is None:
        raise FileNotFoundError(f'{uri} does not exist')
      yield ref
    except Exception as exc:  # missing, or a storage error: this image's failure, not the run's
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(uri, READ, exc))


def _first(refs):
  return next(iter(refs))


class MatchFiles(beam.PTransform):
  """Patterns and manifests -> FileRef, each file once however often it is named (unless
  `deduplicate` is off: then the caller's join on the URI does it).

  Each input's first folder level is listed where the input is; its sub-folders, and the name
  ranges a piece cuts off when it holds more than `piece_pages` pages, are reshuffled and listed in
  parallel, page by page, over LISTING_ROUNDS stages. The grouping by URI also breaks fusion, so
  that runners spread the reads over workers. Manifest lines are read in parallel ranges; rows of
  inventory reports that carry the object's metadata are FileRefs at once, the other URIs are
  made distinct (a URI named twice is looked up, and counted, once) and looked up in parallel.
  `output`: this run's own directory, never listed. Also returns, under SKIPPED_BY_NAME_TAG, the
  URIs that folder and glob listings skipped by name, each once (unless `include_all_files`),
  but for names ending in `shard_suffixes`, which are shards to read (transforms/shards.py).
  """

  def __init__(self, patterns: Sequence[str], manifests: Sequence[str] = (),
               excludes: Sequence[str] = (), output: Optional[str] = None,
               deduplicate: bool = True, piece_pages: int = PIECE_PAGES,
               include_all_files: bool = False, shard_suffixes: Tuple[str, ...] = ()):
    super().__init__()
    self._patterns = list(patterns)
    self._manifests = list(manifests)
    self._excludes = _excludes(excludes, output)
    self._deduplicate = deduplicate
    self._piece_pages = piece_pages
    self._include_all_files = include_all_files
    self._shard_suffixes = tuple(shard_suffixes)

  def _listed(self, pbegin, sources: List, failures: List, skipped: List) -> None:
    tags = (_PIECES_TAG, FAILURES_TAG, SKIPPED_BY_NAME_TAG)
    planned = (pbegin
               | 'Patterns' >> beam.Create(self._patterns)
               | 'Plan' >> beam.ParDo(_PlanListing(self._excludes, self._piece_pages,
                                                   self._include_all_files, self._shard_suffixes))
               .with_outputs(*tags, main='refs'))
    sources.append(planned.refs)
    failures.append(planned[FAILURES_TAG])
    skipped.append(planned[SKIPPED_BY_NAME_TAG])
    pieces = planned[_PIECES_TAG]
    for number in range(1, LISTING_ROUNDS + 1):
      suffix = '' if number == 1 else str(number)
      listed = (pieces
                | f'SpreadPieces{suffix}' >> beam.Reshuffle()
                | f'ListPieces{suffix}' >> beam.ParDo(_ListPiece(drain=number == LISTING_ROUNDS))
                .with_outputs(*tags, main='refs'))
      sources.append(listed.refs)
      failures.append(listed[FAILURES_TAG])
      skipped.append(listed[SKIPPED_BY_NAME_TAG])
      pieces = listed[_PIECES_TAG]

  def _from_manifests(self, pbegin, sources: List, failures: List) -> None:
    found = {pattern: inventory(pattern) for pattern in self._manifests}
    plain = [pattern for pattern, kind in found.items() if kind is None]
    look_up = []
    if plain:
      lines = (pbegin
               | 'Manifests' >> beam.Create(plain)
               | 'ReadManifests' >> beam.io.ReadAllFromText(coder=BytesCoder(),
                                                            with_filename=True)
               | 'Uris' >> beam.FlatMap(_manifest_line).with_outputs(FAILURES_TAG, main='uris'))
      look_up.append(lines.uris)
      failures.append(lines[FAILURES_TAG])
    for number, report in enumerate(kind for kind in found.values() if kind is not None):
      if report.kind == CSV:
        rows = pbegin | f'ReadInventory{number}' >> beam.io.ReadFromText(
            report.pattern, coder=BytesCoder())
      else:
        rows = pbegin | f'ReadInventory{number}' >> beam.io.ReadFromParquet(
            report.pattern, columns=wanted_columns(report.columns))
      described = rows | f'InventoryRows{number}' >> beam.ParDo(_InventoryRows(report)) \
          .with_outputs(_LOOK_UP_TAG, FAILURES_TAG, main='refs')
      sources.append(described.refs)
      look_up.append(described[_LOOK_UP_TAG])
      failures.append(described[FAILURES_TAG])
    if look_up:
      stated = (tuple(look_up)
                | 'UrisToLookUp' >> beam.Flatten()
                | 'DistinctUris' >> beam.Distinct()
                | 'Stat' >> beam.ParDo(_StatUri()).with_outputs(FAILURES_TAG, main='refs'))
      sources.append(stated.refs)
      failures.append(stated[FAILURES_TAG])

  def expand(self, pbegin):
    sources, failures, skipped = [], [], []
    self._listed(pbegin, sources, failures, skipped)
    if self._manifests:
      self._from_manifests(pbegin, sources, failures)
    refs = tuple(sources) | 'AllRefs' >> beam.Flatten()
    failures = tuple(failures) | 'ListFailures' >> beam.Flatten()
    skipped = tuple(skipped) | 'SkippedByName' >> beam.Flatten()
    if len(self._patterns) > 1:  # one input lists each name once; several may name it again
      skipped = skipped | 'DistinctSkipped' >> beam.Distinct()
    if self._deduplicate:  # else the caller's own shuffle on the URI keeps one of each
      refs = (refs
              | 'KeyByUri' >> beam.Map(lambda ref: (ref.uri, ref))
              | 'OnePerUri' >> beam.CombinePerKey(_first)
              | 'Values' >> beam.Values())
    return {'refs': refs, FAILURES_TAG: failures, SKIPPED_BY_NAME_TAG: skipped}


class ReadFile(beam.DoFn):
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
      data = read_object(ref.uri)
      if data is None:
        # UNCOMPRESSED: Beam would otherwise gunzip a file named *.gz behind our back.
        with FileSystems.open(ref.uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
          data = f.read()
    except Exception as exc:  # any storage error is this image's failure, not the run's
      logging.warning('cannot read %s: %s', ref.uri, exc)
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(
          ref.uri, READ, exc, size_bytes=ref.size_bytes, last_modified=ref.last_modified,
          content_id=ref.content_id))
      return
    self._bytes.inc(len(data))
    yield ImageFile(ref.uri, len(data), ref.last_modified, data, ref.content_id)


class ReadImages(beam.PTransform):
  """FileRef -> ImageFile, plus Failure records under FAILURES_TAG."""

  def __init__(self, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    super().__init__()
    self._max_file_bytes = max_file_bytes

  def expand(self, refs):
    return refs | 'Read' >> beam.ParDo(ReadFile(self._max_file_bytes)).with_outputs(
        FAILURES_TAG, main='images')
