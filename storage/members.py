"""Images inside shards (WebDataset tar, Parquet, TFRecord): member URIs, streaming a shard's
members, and reading one member's bytes back.

A member URI is its shard's URI, `#`, and the member's name in the shard:
`gs://b/shards/00017.tar#000123.jpg`, `....parquet#row=42` (or `#<key>` with a key column),
`....tfrecord#<image/filename>` (or `#record=7` when the record has no filename). A URI is a
member URI only when a `#` follows a shard suffix (SHARD_SUFFIXES, any case); it is split at the
first such `#`, so a member's name may hold `#` itself. A plain file named like one
(`a.tar#1.jpg`) is still read whole when no shard `a.tar` exists beside it.

Shards are read once, front to back, one member at a time: a 1 GB tar is never in memory.
"""

import gzip
import re
import tarfile
from typing import BinaryIO, Callable, Iterator, NamedTuple, Optional, Tuple

import storage

WEBDATASET, PARQUET, TFRECORD = 'webdataset', 'parquet', 'tfrecord'
SHARD_FORMATS = (WEBDATASET, PARQUET, TFRECORD)
SHARD_SUFFIXES = {'.tar': WEBDATASET, '.tar.gz': WEBDATASET, '.tgz': WEBDATASET,
                  '.parquet': PARQUET, '.tfrecord': TFRECORD, '.tfrecord.gz': TFRECORD}
DEFAULT_IMAGE_FEATURE = 'image/encoded'
KEY_FEATURE = 'image/filename'
ROW, RECORD = 'row=', 'record='
_SUFFIX_ALTERNATIVES = '|'.join(re.escape(s) for s in sorted(SHARD_SUFFIXES, key=len, reverse=True))
_MEMBER_URI = re.compile(rf'(.*?(?:{_SUFFIX_ALTERNATIVES}))#(.*)', re.IGNORECASE | re.DOTALL)
_TAR_BLOCK = 512
PARQUET_BATCH_ROWS = 64  # rows decoded at a time; a row group is read one column chunk at a time


class Member(NamedTuple):
  """`data` is None for a member over the reader's size limit (left unread) or a Parquet row
  without image bytes. `byte_offset` and
  `byte_length` locate `data` inside the stored shard where the format allows (uncompressed tar)."""
  name: str
  data: Optional[bytes]
  size_bytes: int
  byte_offset: Optional[int] = None
  byte_length: Optional[int] = None


class ShardReadError(IOError):
  """A shard that stops being readable part way: the members before `byte_offset` were read."""

  def __init__(self, message: str, byte_offset: int, members_read: int):
    super().__init__(message)
    self.byte_offset = byte_offset
    self.members_read = members_read


class ShardFormat(NamedTuple):
  """How to read shards: the format and, for Parquet and TFRecord, where the image is."""
  kind: str  # one of SHARD_FORMATS
  image_column: Optional[str] = None  # Parquet: None = the first binary or struct<bytes> column
  key_column: Optional[str] = None  # Parquet: None = `row=N`
  image_feature: str = DEFAULT_IMAGE_FEATURE  # TFRecord


def suffix_format(uri: str) -> Optional[str]:
  """The shard format a URI's suffix says, if any."""
  lowered = uri.lower()
  return next((kind for suffix, kind in SHARD_SUFFIXES.items() if lowered.endswith(suffix)), None)


def member_uri(shard: str, name: str) -> str:
  return f'{shard}#{name}'


def split_member_uri(uri: str) -> Optional[Tuple[str, str]]:
  """(shard URI, member name) of a member URI; None for any other URI."""
  found = _MEMBER_URI.fullmatch(uri)
  return (found.group(1), found.group(2)) if found else None


def _is_compressed(uri: str) -> bool:
  return uri.lower().endswith('.gz')


# --- WebDataset tar --------------------------------------------------------------------------

_COMPRESSED_MAGIC = (b'\x1f\x8b', b'BZh', b'\xfd7zXZ\x00')  # gzip, bzip2, xz


def _is_compressed_stream(raw: BinaryIO) -> bool:
  """Whether a tar is compressed, by its first bytes (as tarfile's `r|*` decides), whatever its
  name says: its members' offsets are then not offsets in the stored file."""
  start = raw.read(6)
  raw.seek(0)
  return start.startswith(_COMPRESSED_MAGIC)


def _tar_members(uri: str, wanted: Callable[[str], bool],
                 max_bytes: Optional[int]) -> Iterator[Member]:
  """Tar's stream mode reads forward only; an unwanted or oversized member's data is skipped."""
  next_offset, count = 0, 0
  with storage.open_file(uri) as raw:
    compressed = _is_compressed_stream(raw)
    try:
      with tarfile.open(fileobj=raw, mode='r|*') as archive:
        for info in archive:
          if info.isfile() and wanted(info.name):
            if max_bytes is not None and info.size > max_bytes:
              yield Member(info.name, None, info.size)
            else:
              data = archive.extractfile(info).read()
              yield Member(info.name, data, info.size,
                           None if compressed else info.offset_data,
                           None if compressed else info.size)
            count += 1
          next_offset = info.offset_data + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
    except (tarfile.TarError, EOFError, OSError) as exc:
      where = 'of the uncompressed tar' if compressed else ''
      raise ShardReadError(f'{uri} cannot be read at byte {next_offset} {where}'.rstrip() +
                           f' after {count} members: {exc}', next_offset, count) from exc


# --- Parquet ----------------------------------------------------------------------------------

def _image_column(schema, wanted: Optional[str]) -> str:
  """The named column, or the first binary or struct<bytes: binary, ...> one (Hugging Face)."""
  import pyarrow as pa

  def binary(kind) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

  if wanted is not None:
    if wanted not in schema.names:
      raise ValueError(f'no column {wanted!r} (--image_column); columns: {schema.names}')
    return wanted
  for field in schema:
    if binary(field.type) or (pa.types.is_struct(field.type) and
                              field.type.get_field_index('bytes') >= 0 and
                              binary(field.type.field('bytes').type)):
      return field.name
  raise ValueError(f'no binary or struct<bytes> column to read images from (columns: '
                   f'{schema.names}); name one with --image_column')


def _image_values(column):
  """The image bytes of each row; a struct's `bytes` field with the struct's own nulls."""
  import pyarrow as pa
  if not pa.types.is_struct(column.type):
    return column
  return column.flatten()[column.type.get_field_index('bytes')]


def _parquet_members(uri: str, image_column: Optional[str],
                     key_column: Optional[str]) -> Iterator[Member]:
  """Row group by row group, PARQUET_BATCH_ROWS rows at a time: only the image and key columns."""
  import pyarrow.parquet as pq
  row, offset = 0, 0
  with storage.open_file(uri) as raw:
    try:
      parquet = pq.ParquetFile(raw)
      image = _image_column(parquet.schema_arrow, image_column)
      if key_column is not None and key_column not in parquet.schema_arrow.names:
        raise ValueError(f'no column {key_column!r} (--key_column); columns: '
                         f'{parquet.schema_arrow.names}')
      columns = [image] + ([key_column] if key_column else [])
      for group in range(parquet.num_row_groups):
        first = parquet.metadata.row_group(group).column(0)
        offset = first.dictionary_page_offset if first.has_dictionary_page else \
            first.data_page_offset
        for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group],
                                          columns=columns):
          images = _image_values(batch.column(image)).to_pylist()
          keys = batch.column(key_column).to_pylist() if key_column else [None] * len(images)
          for data, key in zip(images, keys):
            name = f'{ROW}{row}' if key is None else str(key)
            yield Member(name, data, len(data or b''))
            row += 1
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, a column that is not there
      raise ShardReadError(f'{uri} cannot be read at byte {offset} (row {row}): {exc}',
                           offset, row) from exc


# --- TFRecord of tf.train.Example ----------------------------------------------------------

def _varint(buffer: bytes, position: int) -> Tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = buffer[position]
    position += 1
    value |= (byte & 0x7f) << shift
    if byte < 0x80:
      return value, position
    shift += 7


def _fields(buffer: bytes) -> Iterator[Tuple[int, bytes]]:
  """A protobuf message's length-delimited fields (number, bytes); the others skipped."""
  position = 0
  while position < len(buffer):
    key, position = _varint(buffer, position)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      _, position = _varint(buffer, position)
    elif wire_type == 1:
      position += 8
    elif wire_type == 5:
      position += 4
    elif wire_type == 2:
      length, position = _varint(buffer, position)
      yield number, buffer[position:position + length]
      position += length
    else:
      raise ValueError(f'not a tf.train.Example: protobuf wire type {wire_type}')


def example_bytes_features(record: bytes) -> dict:
  """A serialized tf.train.Example -> {feature name: its first bytes value}, without TensorFlow:
  Example.features (1) -> Features.feature (1, map entries of key 1, Feature 2) ->
  Feature.bytes_list (1) -> BytesList.value (1)."""
  found = {}
  for _, features in (f for f in _fields(record) if f[0] == 1):
    for _, entry in (f for f in _fields(features) if f[0] == 1):
      parts = dict(_fields(entry))
      bytes_list = dict(_fields(parts.get(2, b''))).get(1)
      if bytes_list is not None:
        value = dict(_fields(bytes_list)).get(1)
        if value is not None:
          found[parts.get(1, b'').decode('utf-8', 'replace')] = value
  return found


def _tfrecord_members(uri: str, image_feature: str) -> Iterator[Member]:
  from apache_beam.io.tfrecordio import _TFRecordUtil
  number, offset = 0, 0
  with storage.open_file(uri) as raw:
    stream: BinaryIO = gzip.GzipFile(fileobj=raw) if _is_compressed(uri) else raw
    try:
      while True:
        record = _TFRecordUtil.read_record(stream)
        if record is None:
          return
        features = example_bytes_features(record)
        key = features.get(KEY_FEATURE)
        name = key.decode('utf-8', 'replace') if key else f'{RECORD}{number}'
        data = features.get(image_feature)
        if data is None:
          raise ValueError(f'record {number} has no bytes feature {image_feature!r} '
                           '(--image_feature)')
        yield Member(name, data, len(data))
        number += 1
        offset += len(record) + 16
    except (ValueError, OSError, EOFError, IndexError) as exc:
      where = ' of the uncompressed records' if _is_compressed(uri) else ''
      raise ShardReadError(f'{uri} cannot be read at byte {offset}{where} (record {number}): '
                           f'{exc}', offset, number) from exc


def iter_members(uri: str, shard_format: ShardFormat,
                 wanted: Callable[[str], bool] = lambda name: True,
                 max_bytes: Optional[int] = None) -> Iterator[Member]:
  """Every member of a shard in stored order, read in one pass. `wanted`: which tar members are
  read at all (by name); `max_bytes`: tar members larger than this come without their data.
  ShardReadError when the shard stops being readable, after the members before it."""
  if shard_format.kind == WEBDATASET:
    return _tar_members(uri, wanted, max_bytes)
  if shard_format.kind == PARQUET:
    return _parquet_members(uri, shard_format.image_column, shard_format.key_column)
  return _tfrecord_members(uri, shard_format.image_feature)


def read_image_bytes(uri: str, byte_offset: Optional[int] = None,
                     byte_length: Optional[int] = None) -> bytes:
  """An image's bytes: a file's, or a shard member's (a member URI). With the member's byte
  range (from the run's index), one ranged read; without, a scan of the shard up to the member
  (with the default image column and feature)."""
  split = split_member_uri(uri)
  if split is None:
    return storage.read_bytes(uri)
  shard, name = split
  if byte_offset is not None and byte_length is not None:
    with storage.open_file(shard) as f:
      f.seek(byte_offset)
      return f.read(byte_length)
  if not storage.exists(shard):
    return storage.read_bytes(uri)  # a plain file with `#` in its name
  kind = suffix_format(shard)
  if kind == PARQUET and not name.startswith(ROW):
    return _parquet_keyed(shard, name)
  for member in iter_members(shard, ShardFormat(kind), wanted=lambda found: found == name):
    if member.name == name:
      return member.data
  raise FileNotFoundError(f'{uri}: no member {name!r} in {shard}')


def _parquet_keyed(shard: str, name: str) -> bytes:
  """A `#<key>` member of a Parquet shard, its key column unknown here: the image of the first
  row where a column other than the image's holds `name`."""
  import pyarrow.parquet as pq
  with storage.open_file(shard) as raw:
    parquet = pq.ParquetFile(raw)
    image = _image_column(parquet.schema_arrow, None)
    for batch in parquet.iter_batches(PARQUET_BATCH_ROWS):
      for column in (c for c in batch.schema.names if c != image):
        for row, value in enumerate(batch.column(column).to_pylist()):
          if value is not None and str(value) == name:
            return _image_values(batch.column(image))[row].as_py()
  raise FileNotFoundError(f'{shard}#{name}: no row keyed {name!r} in {shard}')
