"""Manifests: files that name the images, so that the job lists nothing.

Two kinds. A plain manifest holds one URI a line (`#` comments; read by transforms/read.py). An
inventory report holds one object a row with a header, as the storage services write them: a CSV
(`.csv`, `.csv.gz`) or Parquet (`.parquet`) file whose columns name the object by `uri`, or by
`bucket` and `name` (GCS Storage Insights), or by `bucket` and `key` (S3 Inventory; URL-encoded in
its CSV files, as S3 writes them), with optional `size`, a content identity (`crc32c` on GCS;
`etag` / `e_tag` on S3) and the update time (`updated`, `last_modified_date`). A row with a size and
a content identity or an update time is the object's FileRef as a listing would give it, and
needs no request before the read; a row without is looked up like a plain manifest's URI.

GCS's `md5Hash` is not used as the content identity: listings give crc32c, and two identities of
different kinds never match, so a night after a listing would re-embed everything. A GCS row
without crc32c is compared by size and update time instead (what GCS's `updated` says: any
rewrite of the object changes it).
"""

import csv
import datetime
import urllib.parse
from typing import Dict, List, NamedTuple, Optional, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.listing import FileRef, microseconds

CSV, PARQUET = 'csv', 'parquet'
_SUFFIXES = {'.csv': CSV, '.csv.gz': CSV, '.parquet': PARQUET}
_NAMING = (('uri',), ('bucket', 'name'), ('bucket', 'key'))
_CONTENT = {'gs://': ('crc32c', 'crc32c'), 's3://': ('etag', 'etag', 'e_tag')}
_UPDATED = ('updated', 'last_modified_date', 'last_modified')


class Inventory(NamedTuple):
  """One inventory manifest pattern: its format and header (column names as written)."""
  pattern: str
  kind: str  # CSV or PARQUET
  columns: Sequence[str]


def suffix_kind(path: str) -> Optional[str]:
  lowered = path.lower()
  return next((kind for suffix, kind in _SUFFIXES.items() if lowered.endswith(suffix)), None)


def names_objects(columns: Sequence[str]) -> bool:
  lowered = [column.lower() for column in columns]
  return any(all(name in lowered for name in naming) for naming in _NAMING)


def wanted_columns(columns: Sequence[str]) -> List[str]:
  """The columns a row's FileRef is made of (a report may have dozens)."""
  known = {name for naming in _NAMING for name in naming} | set(_UPDATED) | {'size'} | {
      name for names in _CONTENT.values() for name in names}
  return [column for column in columns if column.lower() in known]


def _csv_header(path: str) -> List[str]:
  with FileSystems.open(path) as f:  # gzip from the suffix
    line = f.readline().decode('utf-8', 'replace')
  return [cell.strip() for cell in next(csv.reader([line]), [])]


def _parquet_columns(path: str) -> List[str]:
  import pyarrow.parquet as pq
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return list(pq.ParquetFile(f).schema_arrow.names)


def inventory(pattern: str) -> Optional[Inventory]:
  """The pattern's inventory format (its suffix, its first file's header), or None for a plain
  manifest: a CSV whose first line names no object column is read as one URI a line, as before."""
  kind = suffix_kind(pattern)
  files = [m.path for m in FileSystems.match([pattern])[0].metadata_list] if kind else []
  if not files:
    return None
  columns = _csv_header(files[0]) if kind == CSV else _parquet_columns(files[0])
  if kind == CSV and not names_objects(columns):
    return None
  return Inventory(pattern, kind, tuple(columns))


class InventoryError(ValueError):
  """A manifest whose header names no object."""


def check_inventory(found: Inventory) -> None:
  if not names_objects(found.columns):
    raise InventoryError(
        f'--input_manifest {found.pattern!r}: a {found.kind} manifest needs a column `uri`, or '
        f'`bucket` and `name` (GCS Storage Insights), or `bucket` and `key` (S3 Inventory); it '
        f'has {", ".join(found.columns) or "none"}')


def _text(value) -> Optional[str]:
  if value is None:
    return None
  text = str(value).strip()
  return text or None


def _uri(row: Dict[str, object], url_encoded_keys: bool) -> Optional[str]:
  if _text(row.get('uri')):
    return _text(row['uri'])
  bucket, name, key = _text(row.get('bucket')), _text(row.get('name')), _text(row.get('key'))
  if bucket and name:
    return f'gs://{bucket}/{name}'
  if bucket and key:
    return f's3://{bucket}/{urllib.parse.unquote_plus(key) if url_encoded_keys else key}'
  return None


def _moment(value) -> Optional[int]:
  if isinstance(value, datetime.datetime):
    return microseconds(value)
  text = _text(value)
  return microseconds(datetime.datetime.fromisoformat(text)) if text else None


class RowObject(NamedTuple):
  uri: Optional[str]
  ref: Optional[FileRef]  # None: the row lacks size or identity, look the object up


def row_object(row: Dict[str, object], url_encoded_keys: bool) -> RowObject:
  """A row -> its URI, and its FileRef when the row says enough."""
  row = {column.lower(): value for column, value in row.items()}
  uri = _uri(row, url_encoded_keys)
  if uri is None:
    return RowObject(None, None)
  size = _text(row.get('size'))
  modified = next((_moment(row[c]) for c in _UPDATED if _text(row.get(c))), None)
  kind, *columns = _CONTENT.get(uri[:5], (None,))
  content = next((_text(row[c]).strip('"') for c in columns if _text(row.get(c))), None)
  content_id = f'{kind}:{content}' if content else None
  if size is None or (content_id is None and modified is None):
    return RowObject(uri, None)
  return RowObject(uri, FileRef(uri, int(float(size)), modified, content_id))


def csv_rows(line: bytes, columns: Sequence[str]) -> List[Dict[str, str]]:
  """One CSV line -> its row, or none for a header line (each file of a report has one)."""
  cells = next(csv.reader([line.decode('utf-8')]), [])
  if not cells or [cell.strip() for cell in cells] == list(columns):
    return []
  return [dict(zip((column.lower() for column in columns), cells))]
