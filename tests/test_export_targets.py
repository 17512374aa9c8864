"""`pnasnet-embeddings export --collection` into Milvus Lite (milvus-lite, in-process) and
Qdrant's local mode through their clients (numpy vectors), and into Vertex AI Vector Search's JSONL layout:
each equals the collection (ids, rows, vectors) after two nights, one changed file and one
deleted; a whole sync into a target holding rows writes them again without a second row of an
id (Milvus: an upsert, where a first export inserts); a compaction makes the next sync write nothing, a rerun with nothing new writes
nothing; the rows are read by workers; a target of another dimension, an unreachable server and a
collection this export did not make are refused with exit 2."""

import datetime
import glob as globbing
import json
import os

import numpy as np
# pymilvus runs logging.config.dictConfig when first imported, which closes the handlers that
# exist then: imported inside a test, it would close pytest's log capture of that test.
import pymilvus  # noqa: F401
import pytest

import collection
from tests.bundle_spy import calls_by_place
from tests.collection_nights import night, rows_of, vectors_of
from tests.export_servers import free_port
from tests.test_commands import _command
from tests.test_export_pgvector import (_refused, assert_equal_rows, export, first_night,
                                        second_night)


def milvus_rows(path: str, name: str) -> dict:
  from pymilvus import MilvusClient
  client = MilvusClient(path)
  try:
    found = client.query(name, filter='id >= 0', output_fields=[
        'id', 'uri', 'sha256', 'height', 'width', 'model', 'run', 'embedding'])
  finally:
    client.close()
  return {r['id']: (r['uri'], r['sha256'], r['height'], r['width'], r['model'], r['run'],
                    np.array(r['embedding'], np.float32)) for r in found}


def qdrant_rows(path: str, name: str) -> dict:
  from qdrant_client import QdrantClient
  client = QdrantClient(path=path)
  try:
    points, _ = client.scroll(name, limit=1000, with_payload=True, with_vectors=True)
  finally:
    client.close()
  return {p.id: tuple(p.payload[k] for k in ('uri', 'sha256', 'height', 'width', 'model',
                                              'run')) +
          (np.array(p.vector['dense'], np.float32),) for p in points}


def milvus_count(path: str, name: str) -> int:
  """Rows Milvus holds, a second row of one id counted (milvus_rows would keep one)."""
  from pymilvus import MilvusClient
  client = MilvusClient(path)
  try:
    return client.query(name, filter='', output_fields=['count(*)'])[0]['count(*)']
  finally:
    client.close()


def qdrant_count(path: str, name: str) -> int:
  from qdrant_client import QdrantClient
  client = QdrantClient(path=path)
  try:
    return client.count(name).count
  finally:
    client.close()


def _unit_rows(found: dict) -> dict:
  """Qdrant stores cosine collections' vectors normalised."""
  return {row_id: row[:6] + (row[6] / np.linalg.norm(row[6]),) for row_id, row in found.items()}


TARGETS = {
    'milvus-lite': (lambda folder: f'milvus-lite:{folder}/photos.db?collection=photos',
                    lambda folder: milvus_rows(f'{folder}/photos.db', 'photos'), False,
                    lambda folder: milvus_count(f'{folder}/photos.db', 'photos')),
    'qdrant-local': (lambda folder: f'qdrant-local:{folder}/qdrant?collection=photos',
                     lambda folder: qdrant_rows(f'{folder}/qdrant', 'photos'), True,
                     lambda folder: qdrant_count(f'{folder}/qdrant', 'photos')),
}


@pytest.mark.parametrize('kind', sorted(TARGETS))
def test_defect_2_after_a_compaction_a_sync_writes_nothing_and_the_target_equals_the_collection(
    kind, tmp_path, capsys):
  to_of, rows_of_target, normalised, count_of_target = TARGETS[kind]
  folder = str(tmp_path / 'target')
  os.makedirs(folder)
  uri = str(tmp_path / 'collection')
  first_night(uri)
  assert export(uri, to_of(folder)).written == 4
  second_night(uri)
  report = export(uri, to_of(folder))
  assert (report.rows_read, report.written, report.deleted, report.rows) == (2, 2, 3, 3)
  expected, found = rows_of(uri), rows_of_target(folder)
  if normalised:
    found, expected = _unit_rows(found), _unit_rows(expected)
    assert sorted(found) == sorted(expected)
    for row_id, row in expected.items():
      assert found[row_id][:6] == row[:6]
      np.testing.assert_allclose(found[row_id][6], row[6], rtol=1e-6, atol=1e-7)
  else:
    assert_equal_rows(found, expected)
  collection.compact(uri)
  report = export(uri, to_of(folder))
  assert (report.rows_read, report.written, report.deleted) == (0, 0, 0)
  capsys.readouterr()
  report = export(uri, to_of(folder))
  assert (report.written, report.deleted, report.state) == (0, 0, None)
  assert 'nothing new' in capsys.readouterr().out
  # The version it holds cleaned up: a whole sync, the target's ids read to delete the stale one.
  night(uri, 'night3', {'/photos/f.jpg': vectors_of(['f'], 8, 7)[0]}, gone=['/photos/e.jpg'])
  collection.cleanup(uri, datetime.timedelta(0))
  report = export(uri, to_of(folder))
  assert (report.whole, report.written, report.deleted) == (True, 3, 1)
  assert sorted(rows_of_target(folder)) == sorted(rows_of(uri))
  assert count_of_target(folder) == 3  # the rows it held written again, not added again

  wide = str(tmp_path / 'wide')
  night(wide, 'run', {'/photos/a.jpg': vectors_of(['a'], 16, 3)[0]}, dimension=16)
  assert '8-d vectors of builtin:test@untrained-seed0, not 16-d' in _refused(
      capsys, wide, to_of(folder))


def test_unreachable_servers_are_refused_with_exit_2(tmp_path, capsys):
  uri = str(tmp_path / 'collection')
  first_night(uri)
  port = free_port()
  assert 'cannot connect' in _refused(capsys, uri, f'qdrant://127.0.0.1:{port}/photos')
  assert 'cannot connect' in _refused(capsys, uri, f'milvus://127.0.0.1:{port}/photos')
  assert 'collection' in _refused(capsys, uri, f'milvus-lite:{tmp_path}/x.db')
  assert 'ends in .db' in _refused(capsys, uri, f'milvus-lite:{tmp_path}/x?collection=c')


def test_a_remote_runner_without_a_temp_location_is_refused(tmp_path, capsys):
  uri = str(tmp_path / 'collection')
  first_night(uri)
  with pytest.raises(SystemExit) as exit_info:
    export(uri, f'vertex:{tmp_path}/vertex', '--runner', 'DataflowRunner')
  assert exit_info.value.code == 2
  assert 'needs --temp_location' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'vertex')


def test_a_collection_this_export_did_not_make_is_refused(tmp_path, capsys):
  from qdrant_client import QdrantClient, models
  client = QdrantClient(path=str(tmp_path / 'qdrant'))
  client.create_collection('theirs', vectors_config=models.VectorParams(
      size=8, distance=models.Distance.COSINE))
  client.close()
  uri = str(tmp_path / 'collection')
  first_night(uri)
  assert 'was not made by this export' in _refused(
      capsys, uri, f'qdrant-local:{tmp_path}/qdrant?collection=theirs')


def vertex_state(folder: str) -> dict:
  """Applies the complete exports' folders in order, as index updates would (a complete
  overwrite starting again): id -> record."""
  import pyarrow.parquet as pq
  state = {}
  for export_folder in sorted(globbing.glob(f'{folder}/export-*/')):
    stamp = os.path.basename(export_folder.rstrip('/'))[len('export-'):]
    record = f'{folder}/state-{stamp}.parquet'
    assert os.path.exists(record)  # written last: complete
    if json.loads(pq.read_schema(record).metadata[b'export'])['overwrite']:
      state = {}
    for path in sorted(globbing.glob(f'{export_folder}/delete/*')):
      for line in open(path).read().split():
        del state[line]
    for path in sorted(globbing.glob(f'{export_folder}/*.json')):
      for line in open(path):
        row = json.loads(line)
        state[row['id']] = row
  return state


def test_vertex_jsonl_folders_with_delete_records_replay_to_the_collection(tmp_path,
                                                                           monkeypatch):
  folder = str(tmp_path / 'vertex')
  uri = str(tmp_path / 'collection')
  first_night(uri)
  export(uri, f'vertex:{folder}')
  second_night(uri)
  reads = calls_by_place(monkeypatch, collection.Collection, 'changes')
  report = export(uri, f'vertex:{folder}')
  assert (report.written, report.deleted) == (2, 3)
  assert reads['in the launcher'] == 0 and reads['in a bundle'] > 0, reads
  exports = sorted(globbing.glob(f'{folder}/export-*/'))
  assert len(exports) == 2
  assert sorted(open(globbing.glob(f'{exports[1]}/delete/*')[0]).read().split()) == ['0', '2',
                                                                                     '3']
  state = vertex_state(folder)
  expected = rows_of(uri)
  assert sorted(state) == sorted(str(row_id) for row_id in expected)
  for row_id, (uri_, sha256, height, width, model, run, vector) in expected.items():
    record = state[str(row_id)]
    restricts = {r['namespace']: r['allow'] for r in record['restricts']}
    assert restricts == {'model': [model], 'run': [run]}
    assert record['embedding_metadata'] == {'uri': uri_, 'sha256': sha256, 'height': height,
                                            'width': width}
    np.testing.assert_array_equal(np.array(record['embedding'], np.float32), vector)
  assert export(uri, f'vertex:{folder}').state is None
  assert len(globbing.glob(f'{folder}/export-*/')) == 2  # nothing new: no folder


def test_milvus_lite_exports_leave_stderr_empty(tmp_path):
  """Milvus Lite serves no timestamp call: its server logged `Exception calling application:
  Method not implemented!` with a traceback, pymilvus `failed to get mvccTs` (issue 38)."""
  uri = str(tmp_path / 'collection')
  first_night(uri)
  to = f'milvus-lite:{tmp_path}/photos.db?collection=photos'
  for step in (None, second_night):  # the first creates the collection, the second reads it back
    if step:
      step(uri)
    result = _command('export', '--collection', uri, '--to', to)
    assert (result.returncode, result.stderr) == (0, '')


def test_record_batches_cross_stages_by_arrow_and_their_size_is_not_measured_by_pickling(
    tmp_path):
  """Beam samples the size of a stage's outputs through their coder: a batch of 1,024 4320-d
  vectors pickled to be measured cost 30 ms; the fragments' batches carry Arrow's coder."""
  import apache_beam as beam
  import pyarrow as pa
  from jobs.collection_reads import ReadFragments, RecordBatchCoder, Snapshot
  uri = str(tmp_path / 'collection')
  first_night(uri)
  snapshot = Snapshot.of(collection.open_collection(uri))
  with beam.Pipeline() as pipeline:
    read = (pipeline | beam.Create(snapshot.open().fragment_ids())
            | beam.ParDo(ReadFragments(snapshot, ['uri', 'embedding'])))
    assert isinstance(beam.coders.registry.get_coder(read.element_type), RecordBatchCoder)
  batch = next(snapshot.open().batches(['uri', 'embedding'], with_row_id=True))
  coder = RecordBatchCoder()
  assert coder.decode(coder.encode(batch)).equals(batch)
  assert coder.estimate_size(batch) == batch.nbytes
  assert coder.to_type_hint() is pa.RecordBatch
