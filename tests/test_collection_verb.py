"""`pnasnet-embeddings collection`: import from run directories (the Beam job, once), then what
keeps the collection small (compact, cleanup) and what lists it (history); deleting run
directories changes nothing the collection returns."""

import shutil

import numpy as np
import pytest

import collection
import embeddings
from commands import collection as collection_command
from commands import neighbours as neighbours_command
from run_format import READ
from tests import collection_writer
from tests.run_writer import rows, write_run

MODEL = 'builtin:test@untrained-seed0'


def _vectors(loaded):
  return {uri: loaded.vectors[i] for i, uri in enumerate(loaded.uris)}


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """Three finished runs and an unfinished one, imported; then the run directories deleted."""
  root = tmp_path_factory.mktemp('import')
  first = rows(['/p/a', '/p/b', '/p/c', '/p/d'], 8, seed=1)
  second = rows(['/p/b'], 8, seed=2)  # b changed; c failed to decode; a skipped
  third = rows(['/p/e'], 8, seed=3)  # d failed to read
  write_run(str(root / 'runs' / '1'), first, finished_at='2026-01-01T00:00:00Z', shard_rows=3)
  write_run(str(root / 'runs' / '2'), second, finished_at='2026-01-02T00:00:00Z',
            failed_uris=['/p/c'], skipped_rows=first[:1], output_format='parquet')
  write_run(str(root / 'runs' / '3'), third, finished_at='2026-01-03T00:00:00Z',
            failed_uris=['/p/d'], failed_stage=READ)
  write_run(str(root / 'runs' / 'unfinished'), rows(['/p/f'], 8, seed=4), summary=False)
  uri = str(root / 'collection')
  result = collection_command.main(['import', '--runs', f'{root}/runs/*', '--collection', uri])
  before = embeddings.load(uri)
  shutil.rmtree(root / 'runs')
  expected = {'/p/a': first[0], '/p/b': second[0], '/p/e': third[0]}
  return uri, root, result, before, expected


def test_import_keeps_each_uris_newest_embedding_unless_a_newer_run_failed_it(imported):
  uri, root, result, _, expected = imported
  loaded = embeddings.load(uri)
  assert sorted(loaded.uris) == sorted(expected)
  for name, vector in _vectors(loaded).items():
    np.testing.assert_array_equal(vector, expected[name].embedding)
  runs = {r['uri']: r['run'] for r in loaded.metadata.to_pylist()}
  assert runs == {'/p/a': str(root / 'runs' / '1'), '/p/b': str(root / 'runs' / '2'),
                  '/p/e': str(root / 'runs' / '3')}
  assert (result.rows, result.runs, result.failed_in_newer) == (3, 3, 2)
  record = collection.open_collection(uri).record(result.version)
  assert (record.kind, record.run, record.added) == ('import', str(root / 'runs' / '3'), 3)


def test_deleting_the_run_directories_changes_nothing_the_collection_returns(imported):
  uri, _, _, before, _ = imported
  after = embeddings.load(uri)
  assert after.uris == before.uris
  np.testing.assert_array_equal(after.vectors, before.vectors)
  assert after.metadata.equals(before.metadata)


def test_import_into_a_collection_with_rows_is_refused(imported, capsys):
  uri, root, _, _, _ = imported
  write_run(str(root / 'again'), rows(['/p/z'], 8, seed=9))
  with pytest.raises(SystemExit) as refused:
    collection_command.main(['import', '--runs', str(root / 'again'), '--collection', uri])
  assert refused.value.code == 2
  assert 'already holds 3 rows' in capsys.readouterr().err


def test_runs_of_two_vector_types_are_refused_before_any_work(tmp_path, capsys):
  write_run(str(tmp_path / 'runs' / '1'), rows(['a'], 4, seed=1))
  write_run(str(tmp_path / 'runs' / '2'), rows(['b'], 4, seed=2))
  summary = tmp_path / 'runs' / '2' / 'run_summary.json'
  summary.write_text(summary.read_text().replace('"embedding_dtype": "float32"',
                                                 '"embedding_dtype": "float16"'))
  with pytest.raises(SystemExit) as refused:
    collection_command.main(['import', '--runs', f'{tmp_path}/runs/*', '--collection',
                             str(tmp_path / 'collection')])
  assert refused.value.code == 2 and 'float16 and float32' in capsys.readouterr().err
  assert not (tmp_path / 'collection').exists()


@pytest.fixture(scope='module')
def nights(tmp_path_factory):
  """Three nights of small fragments, then a compaction."""
  uri = str(tmp_path_factory.mktemp('nights') / 'collection')
  collection_writer.commit(uri, collection_writer.rows([f'/n/{i}' for i in range(30)], 6, 1),
                           '/runs/1')
  collection_writer.commit(uri, collection_writer.rows([f'/n/{i}' for i in range(25, 40)], 6, 2),
                           '/runs/2', gone=['/n/0', '/n/1'])
  night = collection_writer.commit(uri, collection_writer.rows(['/n/40'], 6, 3), '/runs/3')
  snapshot = collection.open_collection(uri)
  rows_before = {b['uri']: (b['_rowid'], b['embedding']) for batch in snapshot.batches(
      ['uri', 'embedding'], with_row_id=True) for b in batch.to_pylist()}
  fragments_before = len(snapshot.fragment_ids())
  return uri, night, rows_before, fragments_before


def test_compaction_keeps_every_row_id_and_vector(nights, capsys):
  uri, night, rows_before, fragments_before = nights
  collection_command.main(['compact', '--collection', uri])
  printed = capsys.readouterr().out
  snapshot = collection.open_collection(uri)
  assert len(snapshot.fragment_ids()) == 1 < fragments_before
  assert f'fragments {fragments_before} -> 1' in printed and f'version {night} -> ' in printed
  rows_after = {b['uri']: (b['_rowid'], b['embedding']) for batch in snapshot.batches(
      ['uri', 'embedding'], with_row_id=True) for b in batch.to_pylist()}
  assert rows_after == rows_before and len(rows_after) == 39
  assert list(snapshot.changes(night).inserted()) == []  # followers have nothing to apply


def test_history_then_cleanup_then_a_removed_version_is_refused(nights, capsys):
  uri, night, _, _ = nights
  entries = collection_command.main(['history', '--collection', uri])
  printed = capsys.readouterr().out
  kinds = [(e.kind, e.run) for e in entries if e.kind in ('create', 'night')]
  assert kinds == [('create', None), ('night', '/runs/1'), ('night', '/runs/2'),
                   ('night', '/runs/3')]
  assert 'compaction' in {e.kind for e in entries}
  second = next(e for e in entries if e.run == '/runs/2')
  assert (second.added, second.removed, second.rows) == (15, 7, 38)
  assert '/runs/2' in printed and '+15' in printed and '-7' in printed
  kept_before = embeddings.load(uri, night)

  cleaned = collection_command.main(['cleanup', '--collection', uri, '--older_than', '0s'])
  printed = capsys.readouterr().out
  assert cleaned.versions_removed == len(entries) - 1
  assert 'Run directories may be deleted at any time' in printed
  assert 're-syncs whole' in printed
  latest = embeddings.load(uri)
  assert sorted(latest.uris) == sorted(kept_before.uris)
  with pytest.raises(collection.CollectionError, match=f'has no version {night}'):
    embeddings.load(uri, night)
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--collection', uri, '--version', str(night), '--query', '/n/5'])
  assert refused.value.code == 2
  assert f'has no version {night} (it may have been cleaned up' in capsys.readouterr().err


@pytest.mark.parametrize('age', ['7', 'week', '-1d'])
def test_an_age_that_is_not_one_is_refused(tmp_path, capsys, age):
  with pytest.raises(SystemExit) as refused:
    collection_command.main(['cleanup', '--collection', str(tmp_path), f'--older_than={age}'])
  assert refused.value.code == 2 and 'such as 7d' in capsys.readouterr().err


def test_a_missing_collection_says_how_to_make_one(tmp_path, capsys):
  with pytest.raises(SystemExit) as refused:
    collection_command.main(['history', '--collection', str(tmp_path / 'none')])
  assert refused.value.code == 2
  assert 'collection import' in capsys.readouterr().err
