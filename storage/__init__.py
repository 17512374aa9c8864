"""Files on the local disk or any Beam FileSystem; Beam is imported only for remote paths."""

import datetime
import glob
import os
from typing import BinaryIO, List, NamedTuple, Sequence


class FileInfo(NamedTuple):
  path: str
  size_bytes: int
  modified: datetime.datetime  # UTC


def is_remote(path: str) -> bool:
  """On a Beam FileSystem other than the local disk: a scheme other than file://."""
  return '://' in path and not path.startswith('file://')


def local_path(path: str) -> str:
  """A local path without its file:// scheme."""
  return path[len('file://'):] if path.startswith('file://') else path


def join(directory: str, name: str) -> str:
  return directory.rstrip('/') + '/' + name


def dirname(path: str) -> str:
  return path.rstrip('/').rsplit('/', 1)[0]


def basename(path: str) -> str:
  return path.rstrip('/').rsplit('/', 1)[-1]


def set_filesystem_options(flags: Sequence[str]) -> None:
  """Beam's FileSystem flags (--s3_endpoint_url, --s3_region_name, ...) for remote paths."""
  if flags:
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    FileSystems.set_options(PipelineOptions(list(flags)))


def match(pattern: str) -> List[FileInfo]:
  """The files a glob matches (none is not an error), sorted by path."""
  if is_remote(pattern):
    from apache_beam.io.filesystems import FileSystems
    found = [FileInfo(m.path, m.size_in_bytes,
                      datetime.datetime.fromtimestamp(m.last_updated_in_seconds,
                                                      datetime.timezone.utc))
             for result in FileSystems.match([pattern]) for m in result.metadata_list]
  else:
    found = []
    for path in glob.glob(local_path(pattern), recursive=True):
      if os.path.isfile(path):
        stat = os.stat(path)
        found.append(FileInfo(path, stat.st_size, datetime.datetime.fromtimestamp(
            stat.st_mtime, datetime.timezone.utc)))
  return sorted(found)


def open_file(path: str) -> BinaryIO:
  """A seekable binary reader of the stored bytes (no decompression)."""
  if is_remote(path):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  return open(local_path(path), 'rb')


def create(path: str) -> BinaryIO:
  """A binary writer that creates or replaces the file."""
  if is_remote(path):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
  return open(local_path(path), 'wb')


def write_bytes(path: str, data: bytes) -> None:
  with create(path) as f:
    f.write(data)


def read_bytes(path: str) -> bytes:
  with open_file(path) as f:
    return f.read()


def exists(path: str) -> bool:
  if is_remote(path):
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.exists(path)
  return os.path.isfile(local_path(path))
