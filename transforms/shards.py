"""Stage 1, for shards: a WebDataset tar, a Parquet file or a TFRecord file read into its images,
each an ImageFile with its member URI (storage/members.py), beside the files read whole.

- Which inputs are shards: `--input_format auto` by suffix (`.tar`, `.tar.gz`, `.tgz`,
  `.parquet`, `.tfrecord`, `.tfrecord.gz`); a named format reads every matched file as a shard of
  that format (a folder listing then keeps only that format's suffixes among shard names);
  `files` reads nothing as a shard.
- Which members are images: in a tar, every regular file but hidden ones and those whose
  extension is never an image's (the listing's NOT_IMAGE_EXTENSIONS, and WebDataset's metadata
  extensions `.cls`, `.pyd`, ...): they are not inputs, and not counted. In Parquet every row's
  image column, in TFRecord every record's image feature.
- A shard is read once, front to back, on the worker that decodes its images (only the shard's
  reference crosses to the GPU step); shards are spread over workers as files are.
- A shard that cannot be opened, or stops being readable part way (truncated, corrupt), keeps
  the images read before, and the rest is one `read` failure naming the shard and the byte
  offset. A member over --max_file_bytes, or a row without image bytes, is its own `read`
  failure.
"""

import logging
import re
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam

from storage.members import (DEFAULT_IMAGE_FEATURE, SHARD_FORMATS, SHARD_SUFFIXES, WEBDATASET,
                             ShardFormat, iter_members, member_uri, suffix_format)
from transforms.failures import FAILURES_TAG, READ, Failure
from transforms.listing import FileRef, names_to_skip
from transforms.read import DEFAULT_MAX_FILE_BYTES, FileTooLargeError, ImageFile, ReadFile

METRICS_NAMESPACE = 'shards'
AUTO, FILES = 'auto', 'files'
INPUT_FORMATS = (AUTO, FILES) + SHARD_FORMATS
# The URIs of what the shards held (members read, and each shard's unread rest): `matched`.
MEMBERS_TAG = 'members'
# WebDataset's metadata beside each image (`000123.cls`, `000123.pyd`), never an image.
WEBDATASET_NOT_IMAGE_EXTENSIONS = ('cls', 'cls2', 'id', 'idx', 'index', 'key', 'pyd', 'pickle',
                                   'mp', 'msgpack', 'ten')
_NOT_IMAGE = re.compile(names_to_skip('') + r'|(?is:.*\.(?:' +
                        '|'.join(WEBDATASET_NOT_IMAGE_EXTENSIONS) + '))')


def is_image_member(name: str) -> bool:
  """A tar member that is an input: not hidden, and not of an extension never an image's
  (`./` before a name, as `tar -cf shard.tar .` writes, hides nothing)."""
  return not _NOT_IMAGE.fullmatch(name[2:] if name.startswith('./') else name)


class ShardInputs(NamedTuple):
  """--input_format and where Parquet and TFRecord shards keep their images."""
  input_format: str = AUTO
  image_column: Optional[str] = None
  key_column: Optional[str] = None
  image_feature: str = DEFAULT_IMAGE_FEATURE

  def format_of(self, uri: str) -> Optional[ShardFormat]:
    """How to read `uri` as a shard; None: it is a file."""
    kind = suffix_format(uri) if self.input_format == AUTO else (
        None if self.input_format == FILES else self.input_format)
    return None if kind is None else ShardFormat(kind, self.image_column, self.key_column,
                                                 self.image_feature)

  @property
  def suffixes(self) -> Tuple[str, ...]:
    """Names that folder and glob listings keep as shards (transforms/listing.names_to_skip)."""
    return tuple(suffix for suffix, kind in SHARD_SUFFIXES.items()
                 if self.input_format in (AUTO, kind))

  def file_uri(self, ref: FileRef):
    """A matched input's URI when it is a file; a shard's members are counted as it is read."""
    if self.format_of(ref.uri) is None:
      yield ref.uri


def _utf8(name: str) -> str:
  """A tar member's name as UTF-8, with \\xNN for bytes that are not (tarfile keeps them as
  surrogates, which no output can write), as the listing shows such file names."""
  return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


class _ReadFileOrShard(ReadFile):
  """A file read whole (ReadFile), or a shard read into an ImageFile per image member, the
  members' URIs (and the shard's, for an unread rest) under MEMBERS_TAG, failures under
  FAILURES_TAG. One DoFn for both, so that the stages after it stay fused with it: one model
  per worker process, not one for files and one for shards."""

  def __init__(self, shard_inputs: ShardInputs, max_file_bytes: int):
    super().__init__(max_file_bytes)
    self._shard_inputs = shard_inputs
    self._shards = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'shards')
    self._members = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'members')
    self._failed_shards = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'failed_shards')

  def _failure(self, uri: str, exc: BaseException, ref: FileRef, size_bytes: Optional[int]):
    return beam.pvalue.TaggedOutput(FAILURES_TAG, Failure.from_exception(
        uri, READ, exc, size_bytes=size_bytes, last_modified=ref.last_modified,
        content_id=ref.content_id))

  def process(self, ref: FileRef):
    shard_format = self._shard_inputs.format_of(ref.uri)
    if shard_format is None:
      yield from super().process(ref)
      return
    wanted = is_image_member if shard_format.kind == WEBDATASET else lambda name: True
    self._shards.inc()
    try:
      for member in iter_members(ref.uri, shard_format, wanted, self._max_file_bytes):
        uri = member_uri(ref.uri, _utf8(member.name))
        self._members.inc()
        yield beam.pvalue.TaggedOutput(MEMBERS_TAG, uri)
        if uri != member_uri(ref.uri, member.name):
          yield beam.pvalue.TaggedOutput(FAILURES_TAG, Failure(
              uri, READ, 'UnicodeEncodeError', 'the name of this member is not UTF-8 (shown '
              'with \\xNN for its other bytes): no output can name it', member.size_bytes,
              ref.last_modified, content_id=ref.content_id))
          continue
        if member.size_bytes > self._max_file_bytes:
          yield self._failure(uri, FileTooLargeError(
              f'{member.size_bytes} bytes, over --max_file_bytes {self._max_file_bytes}'),
              ref, member.size_bytes)
          continue
        if member.data is None:
          yield self._failure(uri, ValueError('no image bytes in this row'), ref, 0)
          continue
        yield ImageFile(uri, len(member.data), ref.last_modified, member.data, ref.content_id,
                        member.byte_offset, member.byte_length, ref.size_bytes)
    except Exception as exc:  # the rest of this shard is one failure, not the run's
      logging.warning('cannot read shard %s: %s', ref.uri, exc)
      self._failed_shards.inc()
      yield beam.pvalue.TaggedOutput(MEMBERS_TAG, ref.uri)
      yield self._failure(ref.uri, exc, ref, ref.size_bytes)


class ReadInputs(beam.PTransform):
  """FileRef -> ImageFile (tag 'images'), Failure (FAILURES_TAG) and the URIs of what shards held
  (MEMBERS_TAG): files read whole, shards into their image members. Shards are spread over
  workers as files are: by the grouping by URI that ends matching (MatchFiles, or the incremental
  join), and on Dataflow by the GPU step being a stage of its own."""

  def __init__(self, shard_inputs: ShardInputs, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    super().__init__()
    self._shard_inputs = shard_inputs
    self._max_file_bytes = max_file_bytes

  def expand(self, refs):
    return refs | 'Read' >> beam.ParDo(
        _ReadFileOrShard(self._shard_inputs, self._max_file_bytes)).with_outputs(
            FAILURES_TAG, MEMBERS_TAG, main='images')
