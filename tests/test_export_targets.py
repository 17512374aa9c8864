"""`python -m embeddings.export` into Milvus Lite (milvus-lite, in-process) and Qdrant's local mode
through Beam's own writers, and into Vertex AI Vector Search's JSONL layout: each equals
`embeddings.load` row by row after two nights, one deletion and one dead letter; a rerun with
nothing new writes nothing; a target of another dimension, an unreachable server and a
collection this export did not make are refused with exit 2."""

import glob as globbing
import json
import os

import numpy as np
# pymilvus runs logging.config.dictConfig when first imported, which closes the handlers that
# exist then: imported inside a test, it would close pytest's log capture of that test.
import pymilvus  # noqa: F401
import pytest

from tests.bundle_spy import calls_by_place
from tests.export_servers import free_port
from tests.run_writer import rows, write_run
from tests.test_commands import _command
from tests.test_export_pgvector import (_refused, assert_equal_rows, collection_rows, export,
                                        two_nights)


def milvus_rows(path: str, collection: str) -> dict:
  from pymilvus import MilvusClient
  client = MilvusClient(path)
  try:
    found = client.query(collection, filter='uri != ""', output_fields=[
        'uri', 'sha256', 'height', 'width', 'model', 'run', 'embedding'])
  finally:
    client.close()
  return {r['uri']: (r['sha256'], r['height'], r['width'], r['model'], r['run'],
                     np.array(r['embedding'], np.float32)) for r in found}


def qdrant_rows(path: str, collection: str) -> dict:
  from qdrant_client import QdrantClient
  client = QdrantClient(path=path)
  try:
    points, _ = client.scroll(collection, limit=1000, with_payload=True, with_vectors=True)
  finally:
    client.close()
  return {p.payload['uri']: tuple(p.payload[k] for k in ('sha256', 'height', 'width', 'model',
                                                         'run')) +
          (np.array(p.vector['dense'], np.float32),) for p in points}


def _unit_rows(found: dict) -> dict:
  """Qdrant stores cosine collections' vectors normalised."""
  return {uri: row[:5] + (row[5] / np.linalg.norm(row[5]),) for uri, row in found.items()}


TARGETS = {
    'milvus-lite': (lambda folder: f'milvus-lite:{folder}/photos.db?collection=photos',
                    lambda folder: milvus_rows(f'{folder}/photos.db', 'photos'), False),
    'qdrant-local': (lambda folder: f'qdrant-local:{folder}/qdrant?collection=photos',
                     lambda folder: qdrant_rows(f'{folder}/qdrant', 'photos'), True),
}


@pytest.mark.parametrize('kind', sorted(TARGETS))
def test_two_nights_leave_the_collection_equal_to_load_and_a_rerun_writes_nothing(
    kind, tmp_path, capsys):
  to_of, rows_of, normalised = TARGETS[kind]
  folder = str(tmp_path / 'target')
  os.makedirs(folder)
  first = str(tmp_path / 'first')
  write_run(f'{first}/night1', rows(['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg',
                                     '/photos/d.jpg'], 8, 1), inputs=['/photos'],
            finished_at='2026-12-01T02:00:00Z')
  assert export(f'{first}/night1', to_of(folder)).written == 4
  glob = two_nights(tmp_path / 'both')
  report = export(glob, to_of(folder))
  assert (report.written, report.deleted, report.rows) == (3, 2, 3)
  expected = collection_rows(glob)
  found = rows_of(folder)
  if normalised:
    found, expected = _unit_rows(found), _unit_rows(expected)
    assert sorted(found) == sorted(expected)
    for uri, row in expected.items():
      assert found[uri][:5] == row[:5]
      np.testing.assert_allclose(found[uri][5], row[5], rtol=1e-6, atol=1e-7)
  else:
    assert_equal_rows(found, expected)
  capsys.readouterr()
  report = export(glob, to_of(folder))
  assert (report.written, report.deleted, report.state) == (0, 0, None)
  assert 'nothing new' in capsys.readouterr().out

  wide = str(tmp_path / 'wide')
  write_run(f'{wide}/run', rows(['/photos/a.jpg'], 16, 3))
  assert '8-d vectors of builtin:test@untrained-seed0, not 16-d' in _refused(
      capsys, f'{wide}/run', to_of(folder))


def test_unreachable_servers_are_refused_with_exit_2(tmp_path, capsys):
  glob = two_nights(tmp_path)
  port = free_port()
  assert 'cannot connect' in _refused(capsys, glob, f'qdrant://127.0.0.1:{port}/photos')
  assert 'cannot connect' in _refused(capsys, glob, f'milvus://127.0.0.1:{port}/photos')
  assert 'collection' in _refused(capsys, glob, f'milvus-lite:{tmp_path}/x.db')
  assert 'ends in .db' in _refused(capsys, glob, f'milvus-lite:{tmp_path}/x?collection=c')


def test_a_remote_runner_without_a_temp_location_is_refused(tmp_path, capsys):
  """Its workers could not share the plan's files in a local folder."""
  with pytest.raises(SystemExit) as exit_info:
    export(two_nights(tmp_path), f'vertex:{tmp_path}/vertex', '--runner', 'DataflowRunner')
  assert exit_info.value.code == 2
  assert 'needs --temp_location' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'vertex')


def test_a_collection_this_export_did_not_make_is_refused(tmp_path, capsys):
  from qdrant_client import QdrantClient, models
  client = QdrantClient(path=str(tmp_path / 'qdrant'))
  client.create_collection('theirs', vectors_config=models.VectorParams(
      size=8, distance=models.Distance.COSINE))
  client.close()
  assert 'was not made by this export' in _refused(
      capsys, two_nights(tmp_path), f'qdrant-local:{tmp_path}/qdrant?collection=theirs')


def vertex_state(folder: str) -> dict:
  """Applies the complete exports' folders in order, as index updates would: id -> record."""
  state = {}
  for export_folder in sorted(globbing.glob(f'{folder}/export-*/')):
    stamp = os.path.basename(export_folder.rstrip('/'))[len('export-'):]
    assert os.path.exists(f'{folder}/state-{stamp}.parquet')  # written last: complete
    for path in sorted(globbing.glob(f'{export_folder}/delete/*')):
      for line in open(path).read().split():
        del state[line]
    for path in sorted(globbing.glob(f'{export_folder}/*.json')):
      for line in open(path):
        record = json.loads(line)
        state[record['id']] = record
  return state


def test_vertex_jsonl_folders_with_delete_records_replay_to_load(tmp_path, capsys, monkeypatch):
  folder = str(tmp_path / 'vertex')
  first = str(tmp_path / 'first')
  write_run(f'{first}/night1', rows(['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg',
                                     '/photos/d.jpg'], 8, 1), inputs=['/photos'],
            finished_at='2026-12-01T02:00:00Z')
  export(f'{first}/night1', f'vertex:{folder}')
  glob = two_nights(tmp_path / 'both')
  report = export(glob, f'vertex:{folder}')
  assert (report.written, report.deleted) == (3, 2)
  exports = sorted(globbing.glob(f'{folder}/export-*/'))
  assert len(exports) == 2
  assert sorted(open(globbing.glob(f'{exports[1]}/delete/*')[0]).read().split()) == [
      '/photos/c.jpg', '/photos/d.jpg']
  state = vertex_state(folder)
  expected = collection_rows(glob)
  assert sorted(state) == sorted(expected)
  for uri, (sha256, height, width, model, run, vector) in expected.items():
    record = state[uri]
    restricts = {r['namespace']: r['allow'] for r in record['restricts']}
    assert restricts == {'model': [model], 'run': [run]}
    assert record['embedding_metadata'] == {'uri': uri, 'sha256': sha256, 'height': height,
                                            'width': width}
    np.testing.assert_array_equal(np.array(record['embedding'], np.float32), vector)
  capsys.readouterr()
  _assert_planned_by_workers(monkeypatch, lambda: export(glob, f'vertex:{folder}').state is None)
  assert len(globbing.glob(f'{folder}/export-*/')) == 2  # nothing new: no folder


def _assert_planned_by_workers(monkeypatch, export_is_a_no_op) -> None:
  """Spies on the collection's rule and on the target's read of its rows: every call is made in
  a Beam bundle (a worker's work, however many there are), none by the launcher's own code,
  where either would grow with the collection in one process."""
  from embeddings.collection import SourceRule
  from jobs.export_vertex import VertexTarget
  rule_calls = calls_by_place(monkeypatch, SourceRule, 'decide')
  read_calls = calls_by_place(monkeypatch, VertexTarget, 'current_rows')
  assert export_is_a_no_op()
  for calls in (rule_calls, read_calls):
    assert calls['in the launcher'] == 0 and calls['in a bundle'] > 0, calls


def test_milvus_lite_exports_leave_stderr_empty(tmp_path):
  """Milvus Lite serves no timestamp call: its server logged `Exception calling application:
  Method not implemented!` with a traceback, pymilvus `failed to get mvccTs` (issue 38)."""
  glob = two_nights(tmp_path / 'both')
  to = f'milvus-lite:{tmp_path}/photos.db?collection=photos'
  for _ in range(2):  # the first creates the collection, the second reads it back first
    result = _command('export', '--runs', glob, '--to', to)
    assert (result.returncode, result.stderr) == (0, '')
