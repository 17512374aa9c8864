"""Inventory reports as manifests: rows that carry an object's size and identity are read without
a look-up (counted through tests/fault_proxy.py), in each header style (`uri`; `bucket`+`name` of
GCS Storage Insights; `bucket`+`key` of S3 Inventory, CSV and Parquet); a row whose metadata
changed is embedded again; each image costs one request to read."""

import csv
import datetime
import gzip
import os
import subprocess
import sys
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from pipeline.launcher import run
from tests.fault_proxy import FaultProxy
from transforms.listing import FileRef, microseconds
from transforms.read import MatchFiles

TINY = '--model=builtin:pnasnet_tiny'
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_csv(path, header, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _gcs_row(gcs_server, bucket, name):
  blob = gcs_server.client.bucket(bucket).get_blob(name)
  return [bucket, name, blob.size, blob.crc32c, blob.md5_hash,
          blob.updated.isoformat().replace('+00:00', 'Z'), 'image/png']


def test_gcs_inventory_rows_need_no_look_up_and_a_changed_row_is_embedded_again(
    gcs_server, image_folder, tmp_path, monkeypatch):
  bucket = f'inventory-{uuid.uuid4().hex[:10]}'
  gcs_server.create_bucket(bucket)
  names = ['photos/camera.png', 'photos/rocket.jpg', 'photos/coffee.png', 'photos/chelsea.png']
  for name in names:
    gcs_server.upload(f'gs://{bucket}/{name}', (image_folder / name.split('/')[1]).read_bytes())
  header = ['bucket', 'name', 'size', 'crc32c', 'md5Hash', 'updated', 'contentType']
  insights = _write_csv(tmp_path / 'insights.csv', header,
                        [_gcs_row(gcs_server, bucket, name) for name in names[:2]])
  coffee = _gcs_row(gcs_server, bucket, names[2])
  uris = _write_csv(tmp_path / 'uris.csv', ['uri', 'size', 'crc32c', 'updated'],
                    [[f'gs://{bucket}/{names[2]}', coffee[2], coffee[3], coffee[5]],
                     [f'gs://{bucket}/{names[3]}', '', '', '']])  # no metadata: looked up
  with FaultProxy(gcs_server.host) as proxy:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
    first = run([f'--input_manifest={insights}', f'--input_manifest={uris}', TINY,
                 f'--output={tmp_path}/emb/1', f'--collection={tmp_path}/collection'])
    assert (first['matched'], first['embedded'], first['failed']) == (4, 4, 0)
    assert dict(proxy.metadata_requests) == {f'{bucket}/{names[3]}': 1}
    assert dict(proxy.downloads) == {f'{bucket}/{name}': 1 for name in names}

    # The next night: rocket.jpg was overwritten, and the report says so.
    gcs_server.upload(f'gs://{bucket}/{names[1]}', (image_folder / 'astronaut.png').read_bytes())
    insights = _write_csv(tmp_path / 'insights-2.csv', header,
                          [_gcs_row(gcs_server, bucket, name) for name in names[:2]])
    proxy.metadata_requests.clear()
    proxy.downloads.clear()
    second = run([f'--input_manifest={insights}', f'--input_manifest={uris}', TINY,
                  f'--output={tmp_path}/emb/2', f'--collection={tmp_path}/collection'])
  assert (second['matched'], second['embedded'], second['skipped']) == (4, 1, 3)
  assert dict(proxy.metadata_requests) == {f'{bucket}/{names[3]}': 1}
  assert dict(proxy.downloads) == {f'{bucket}/{names[1]}': 1}


def test_s3_inventory_csv_and_parquet_rows_need_no_look_up(s3_server, image_folder, tmp_path):
  bucket = f'inventory-{uuid.uuid4().hex[:10]}'
  s3_server.create_bucket(bucket)
  keys = ['photos/my camera.png', 'photos/rocket+1.jpg', 'photos/coffee.png']
  for key, name in zip(keys, ['camera.png', 'rocket.jpg', 'coffee.png']):
    s3_server.upload(f's3://{bucket}/{key}', (image_folder / name).read_bytes())

  def row(key):
    head = s3_server.client.head_object(Bucket=bucket, Key=key)
    return {'bucket': bucket, 'key': key, 'size': head['ContentLength'],
            'last_modified_date': head['LastModified'].isoformat(),
            'e_tag': head['ETag'].strip('"')}

  rows = [row(key) for key in keys]
  # S3 Inventory's CSV URL-encodes keys; its Parquet does not.
  encoded = [dict(r, key=r['key'].replace('+', '%2B').replace(' ', '+')) for r in rows[:2]]
  report = _write_csv(tmp_path / 'inventory.csv', list(rows[0]),
                      [list(r.values()) for r in encoded])
  parquet = str(tmp_path / 'inventory.parquet')
  pq.write_table(pa.Table.from_pylist(rows[2:]), parquet)
  with FaultProxy(s3_server.endpoint) as proxy:
    options = [o.replace(s3_server.endpoint, proxy.url) for o in s3_server.options]
    summary = run([f'--input_manifest={report}', f'--input_manifest={parquet}', TINY,
                   f'--output={tmp_path}/emb'] + options)
  assert (summary['matched'], summary['embedded'], summary['failed']) == (3, 3, 0)
  assert not proxy.metadata_requests
  assert dict(proxy.downloads) == {f'{bucket}/{key}': 1 for key in keys}


def test_the_documented_duckdb_lines_write_inventories_read_without_a_request(tmp_path):
  """docs/running.md's `inventory-*.csv` lines, run as printed on an S3 Inventory part (no
  header, URL-encoded keys, gzip) and a Storage Insights report: every row a FileRef as listed."""
  docs = open(os.path.join(PROJECT, 'docs', 'running.md')).read()
  lines = [line for line in docs.splitlines()
           if line.startswith('python -c "import duckdb') and 'inventory-' in line]
  assert len(lines) == 2
  (tmp_path / 'inventory').mkdir()
  with gzip.open(tmp_path / 'inventory' / 'part-0.csv.gz', 'wt') as f:
    f.write('"photos","cam/IMG%20001.JPG","1234","2026-11-30T01:02:03.000Z","abc"\n'
            '"photos","cam/notes.txt","10","2026-11-30T01:02:03.000Z","def"\n')
  (tmp_path / 'report').mkdir()
  (tmp_path / 'report' / 'r.csv').write_text(
      'bucket,name,size,crc32c,md5Hash,updated\n'
      'shots,a/x.jpg,5,AAAAAA==,bWQ1,2026-11-30T01:02:03.456Z\n')
  for line in lines:
    result = subprocess.run(['bash', '-c', line.replace('python -c', f'{sys.executable} -c', 1)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  when = datetime.datetime(2026, 11, 30, 1, 2, 3, tzinfo=datetime.timezone.utc)
  expected = [FileRef('s3://photos/cam/IMG 001.JPG', 1234, microseconds(when), 'etag:abc'),
              FileRef('gs://shots/a/x.jpg', 5, microseconds(when) + 456_000, 'crc32c:AAAAAA==')]
  with beam.Pipeline() as pipeline:
    matched = pipeline | MatchFiles([], [str(tmp_path / 'inventory-s3.csv'),
                                         str(tmp_path / 'inventory-gs.csv')])
    assert_that(matched['refs'], equal_to(expected))
