"""`pnasnet-embeddings export --collection` into a real PostgreSQL with pgvector (pgserver, on
127.0.0.1): the table equals the collection (ids, rows and vectors) after each sync; a sync reads
only the rows changed since the version it last applied, deletions propagate, a compaction makes
the next sync write nothing, a cleaned-up version makes it sync whole; a target following another
collection is refused unless --replace; bad targets are refused before any work, a failed batch
is retried and a batch that keeps failing leaves the table marked with its last complete state;
above 2,000 dimensions the index is on the PCA column and the query of docs/exporting.md
re-ranks by the full vector."""

import datetime
import logging
import os
import re
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import psycopg
import pytest

import collection
from commands.export import main as export_main
from tests.collection_nights import night, rows_of, vectors_of
from tests.export_servers import free_port, postgres_with_pgvector

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                    'exporting.md')


@pytest.fixture(scope='module')
def postgres():
  with postgres_with_pgvector() as url:
    yield url


def first_night(uri: str) -> int:
  """a, b, c, d under /photos."""
  names = ['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg', '/photos/d.jpg']
  return night(uri, 'night1', dict(zip(names, vectors_of(names, 8, 1))))


def second_night(uri: str) -> int:
  """a changed (a new vector), e new, c failed on its new version, d deleted: b, a, e remain."""
  names = ['/photos/a.jpg', '/photos/e.jpg']
  return night(uri, 'night2', dict(zip(names, vectors_of(names, 8, 2))),
               gone=['/photos/c.jpg', '/photos/d.jpg'])


def table_rows(url: str, table: str) -> dict:
  with psycopg.connect(url) as connection:
    found = connection.execute(f'SELECT id, uri, sha256, height, width, model, run, '
                               f'embedding::real[] FROM {table}').fetchall()
  return {r[0]: r[1:7] + (np.array(r[7], np.float32),) for r in found}


def assert_equal_rows(found: dict, expected: dict) -> None:
  assert sorted(found) == sorted(expected)
  for row_id, row in expected.items():
    assert found[row_id][:6] == row[:6], row_id
    np.testing.assert_array_equal(found[row_id][6], row[6])


def export(uri: str, to: str, *flags):
  return export_main(['--collection', uri, '--to', to, *flags])


class Nights(NamedTuple):
  uri: str
  reports: list  # of the exports after night 1, night 2, nights 3 and 4, the compaction
  tables: list  # the table's rows after each
  versions: list  # the collection's version at each


@pytest.fixture(scope='module')
def nights(postgres, tmp_path_factory) -> Nights:
  """Table `nights` follows a collection: exported after night 1, after night 2, after nights 3
  and 4 (two commits), then after a compaction."""
  uri = str(tmp_path_factory.mktemp('nights') / 'collection')
  to = f'{postgres}?table=nights'
  reports, tables, versions = [], [], []

  def sync():
    reports.append(export(uri, to))
    tables.append(table_rows(postgres, 'nights'))
    versions.append(collection.open_collection(uri).version)
  first_night(uri)
  sync()
  second_night(uri)
  sync()
  names = [f'/photos/n{i}.jpg' for i in range(5)]
  night(uri, 'night3', dict(zip(names, vectors_of(names, 8, 3))), gone=['/photos/b.jpg'])
  night(uri, 'night4', {'/photos/n0.jpg': vectors_of(['x'], 8, 4)[0]}, gone=['/photos/n1.jpg'])
  sync()
  collection.compact(uri)
  sync()
  return Nights(uri, reports, tables, versions)


def test_each_sync_reads_only_the_changes_and_leaves_the_table_equal_to_the_collection(
    postgres, nights):
  counts = [(r.rows_read, r.written, r.deleted, r.rows, r.whole) for r in nights.reports]
  assert counts == [
      (4, 4, 0, 4, True),  # the first export: every row
      (2, 2, 3, 3, False),  # a and e written; a's old row, c and d deleted
      (4, 4, 1, 6, False),  # two commits: n0 (again), n2, n3, n4 remain of 6 inserted; b gone
      (0, 0, 0, 6, False),  # compaction changes no row: nothing read, written or deleted
  ]
  for table, version in zip(nights.tables, nights.versions):
    assert_equal_rows(table, rows_of(nights.uri, version))
  assert nights.reports[-1].state.version == nights.versions[-1]
  with psycopg.connect(postgres) as connection:
    indexes = [i[0] for i in connection.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'nights'").fetchall()]
  assert any('hnsw (embedding vector_cosine_ops)' in i for i in indexes)
  assert any('btree (uri)' in i for i in indexes)


def test_a_rerun_with_nothing_new_writes_nothing(postgres, nights, capsys):
  to = f'{postgres}?table=nights'

  def snapshot():
    with psycopg.connect(postgres) as connection:
      return sorted(connection.execute(
          'SELECT uri, xmin::text FROM nights UNION ALL SELECT name, xmin::text FROM '
          'nights_export').fetchall())
  before = snapshot()
  capsys.readouterr()
  report = export(nights.uri, to)
  assert (report.written, report.deleted, report.rows_read, report.state) == (0, 0, 0, None)
  assert 'nothing new' in capsys.readouterr().out
  assert snapshot() == before  # no row and no record rewritten


def _refused(capsys, uri, to, *flags) -> str:
  with pytest.raises(SystemExit) as exit_info:
    export(uri, to, *flags)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1, error
  return error


def test_bad_targets_and_collections_are_refused_before_any_work_with_exit_2_and_one_line(
    postgres, nights, tmp_path, capsys):
  uri = nights.uri
  assert 'not a target' in _refused(capsys, uri, 'mysql://root@127.0.0.1/db?table=t')
  assert 'name one table' in _refused(capsys, uri, postgres)
  assert 'cannot connect' in _refused(capsys, uri,
                                      f'postgresql://postgres@127.0.0.1:{free_port()}/postgres'
                                      f'?table=t')
  assert 'no collection at' in _refused(capsys, str(tmp_path / 'none'),
                                        f'{postgres}?table=nights')
  wide = str(tmp_path / 'wide')
  night(wide, 'run', {'/photos/a.jpg': vectors_of(['a'], 16, 3)[0]}, dimension=16)
  assert '8-d vectors of builtin:test@untrained-seed0, not 16-d' in _refused(
      capsys, wide, f'{postgres}?table=nights')
  other_model = str(tmp_path / 'model')
  night(other_model, 'run', {'/photos/a.jpg': vectors_of(['a'], 8, 3)[0]},
        model='builtin:other@seed1')
  assert 'not 8-d of builtin:other@seed1' in _refused(capsys, other_model,
                                                     f'{postgres}?table=nights')
  other = str(tmp_path / 'other')
  first_night(other)
  assert f'holds collection {uri}, not {other}: give --replace' in _refused(
      capsys, other, f'{postgres}?table=nights')
  assert 'newer than version 1' in _refused(capsys, uri, f'{postgres}?table=nights',
                                            '--version', '1')
  with psycopg.connect(postgres) as connection:
    connection.execute('CREATE TABLE users_own (uri text PRIMARY KEY)')
    assert connection.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'"
                              ).fetchone()[0] == 0
  assert 'was not made by this export' in _refused(capsys, uri, f'{postgres}?table=users_own')
  assert_equal_rows(table_rows(postgres, 'nights'), rows_of(uri))  # untouched


def test_a_table_of_the_export_of_run_directories_is_replaced_only_when_asked(
    postgres, nights, capsys):
  with psycopg.connect(postgres) as connection:  # as the export of run directories left it
    connection.execute('CREATE TABLE legacy (uri text PRIMARY KEY, run text NOT NULL)')
    connection.execute('CREATE TABLE legacy_export (name text PRIMARY KEY, value jsonb)')
    connection.execute(
        "INSERT INTO legacy_export VALUES ('target', %s), ('state', %s)",
        ('{"model": "builtin:test@untrained-seed0", "dimension": 8, "reduced_dimension": null}',
         '{"status": "complete", "runs": ["/runs/night1"], "rows": 1, "started_at": "t", '
         '"finished_at": "t", "last_complete": null}'))
  to = f'{postgres}?table=legacy'
  assert 'holds an export of run directories (before the collection)' in _refused(
      capsys, nights.uri, to)
  report = export(nights.uri, to, '--replace')
  assert (report.whole, report.written) == (True, 6)
  assert_equal_rows(table_rows(postgres, 'legacy'), rows_of(nights.uri))


def test_replace_and_a_cleaned_up_version_sync_whole_and_drop_what_the_collection_lacks(
    postgres, tmp_path, caplog):
  to = f'{postgres}?table=replaced'
  first, other = str(tmp_path / 'first'), str(tmp_path / 'other')
  first_night(first)
  export(first, to)
  first_night(other)
  second_night(other)
  report = export(other, to, '--replace')
  assert (report.whole, report.rows_read, report.written) == (True, 3, 3)
  assert_equal_rows(table_rows(postgres, 'replaced'), rows_of(other))

  names = ['/photos/f.jpg', '/photos/g.jpg']
  night(other, 'night3', dict(zip(names, vectors_of(names, 8, 5))), gone=['/photos/e.jpg'])
  collection.cleanup(other, datetime.timedelta(0))  # the version the table holds is gone
  with caplog.at_level(logging.WARNING):
    report = export(other, to)
  assert 'no longer kept' in caplog.text and 'syncing it whole' in caplog.text
  assert (report.whole, report.rows_read, report.written, report.deleted) == (True, 4, 4, 1)
  assert_equal_rows(table_rows(postgres, 'replaced'), rows_of(other))


def _fail_writes_of(postgres: str, table: str, uri: str, times: int) -> None:
  """A trigger that makes PostgreSQL refuse the row of `uri` the first `times` times (counted by
  a sequence, which a failed transaction does not roll back)."""
  with psycopg.connect(postgres) as connection:
    connection.execute('DROP SEQUENCE IF EXISTS attempts')
    connection.execute('CREATE SEQUENCE attempts')
    connection.execute(f"""
      CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$
      BEGIN
        IF NEW.uri = '{uri}' AND nextval('attempts') <= {times} THEN
          RAISE EXCEPTION 'refused % for the test', NEW.uri;
        END IF;
        RETURN NEW;
      END $$ LANGUAGE plpgsql""")
    connection.execute(f'CREATE OR REPLACE TRIGGER refuse BEFORE INSERT OR UPDATE ON {table} '
                       f'FOR EACH ROW EXECUTE FUNCTION refuse()')


def _log_writes(postgres: str, table: str) -> None:
  """A trigger that logs each row written to `table` as an INSERT (COPY's too) or an UPDATE
  (an upsert of a row the table held), in the transaction that writes it."""
  with psycopg.connect(postgres) as connection:
    connection.execute('CREATE TABLE IF NOT EXISTS writes (operation text, uri text)')
    connection.execute("""
      CREATE OR REPLACE FUNCTION log_write() RETURNS trigger AS $$
      BEGIN
        INSERT INTO writes VALUES (TG_OP, NEW.uri);
        RETURN NEW;
      END $$ LANGUAGE plpgsql""")
    connection.execute(f'CREATE OR REPLACE TRIGGER log_write AFTER INSERT OR UPDATE ON {table} '
                       f'FOR EACH ROW EXECUTE FUNCTION log_write()')


def _writes(postgres: str) -> list:
  """The writes logged since the last call."""
  with psycopg.connect(postgres) as connection:
    return sorted(connection.execute('DELETE FROM writes RETURNING operation, uri').fetchall())


def test_a_failed_batch_is_retried_and_one_that_keeps_failing_names_the_last_complete_state(
    postgres, tmp_path, capsys):
  """The failure is PostgreSQL's own (a trigger raising); a batch is one transaction, so a
  failure leaves none of it, and the retry writes it whole. New rows go by COPY straight into
  the table; only the rows it held when an export completes a failed one are upserted."""
  to = f'{postgres}?table=failing'
  uri = str(tmp_path / 'collection')
  first_night(uri)
  export(uri, to)
  _log_writes(postgres, 'failing')
  second_night(uri)
  _fail_writes_of(postgres, 'failing', '/photos/e.jpg', times=1)  # then it succeeds
  export(uri, to, '--batch_size', '2')
  assert_equal_rows(table_rows(postgres, 'failing'), rows_of(uri))
  assert _writes(postgres) == [('INSERT', '/photos/a.jpg'), ('INSERT', '/photos/e.jpg')]
  held = collection.open_collection(uri).version

  names = ['/photos/f.jpg', '/photos/g.jpg']
  night(uri, 'night3', dict(zip(names, vectors_of(names, 8, 4))), gone=['/photos/b.jpg'])
  _fail_writes_of(postgres, 'failing', '/photos/g.jpg', times=100)  # more than the retries
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    export(uri, to, '--batch_size', '1')
  assert exit_info.value.code == 1
  error = capsys.readouterr().err
  assert 'failed part way' in error and 'refused /photos/g.jpg for the test' in error
  assert re.search(rf'last complete state: complete export of \S+ \(3 rows, version {held} of '
                   rf'{re.escape(uri)}\)', error), error
  with psycopg.connect(postgres) as connection:
    assert connection.execute("SELECT value->>'status' FROM failing_export WHERE name = 'state'"
                              ).fetchone()[0] == 'in progress'
    connection.execute('DROP TRIGGER refuse ON failing')
  assert _writes(postgres) == [('INSERT', '/photos/f.jpg')]  # before g's batch failed
  report = export(uri, to)
  assert (report.whole, report.state.since) == (False, held)  # the changes again, from there
  assert_equal_rows(table_rows(postgres, 'failing'), rows_of(uri))
  assert _writes(postgres) == [('INSERT', '/photos/g.jpg'), ('UPDATE', '/photos/f.jpg')]
  with psycopg.connect(postgres) as connection:
    assert connection.execute("SELECT value->>'status' FROM failing_export WHERE name = 'state'"
                              ).fetchone()[0] == 'complete'


def docs_query(language: str = 'sql') -> str:
  """The query SQL (or the Python script) of docs/exporting.md, as printed there."""
  text = open(DOCS).read()
  section = text[text.index('## Querying pgvector'):]
  return re.search(rf'```{language}\n(.*?)```', section, re.S)[1]


def test_above_2000_dimensions_the_index_is_on_the_pca_column_and_the_docs_query_reranks(
    postgres, tmp_path):
  """The SQL of docs/exporting.md, and its Python script run as printed with the export's --to."""
  from benchmarks.synthetic_collection import write_synthetic_collection
  made = write_synthetic_collection(str(tmp_path / 'synthetic'), 600, fragment_rows=250,
                                    clusters=20)
  report = export(made.uri, f'{postgres}?table=photos')
  assert report.written == 600
  rows = sorted(rows_of(made.uri).values(), key=lambda row: row[0])
  uris = [row[0] for row in rows]
  vectors = np.stack([row[6] for row in rows])
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  sql = docs_query()
  with psycopg.connect(postgres) as connection:
    indexdef = connection.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'photos'"
                                  " AND indexname = 'photos_hnsw'").fetchone()[0]
    assert 'hnsw (embedding_reduced vector_l2_ops)' in indexdef
    *settings, query_sql = [s for s in sql.split(';') if s.strip()]
    for row in (0, 17, 333):
      query = vectors[row]
      with connection.transaction():
        for statement in settings:  # SET LOCAL: for this transaction
          connection.execute(statement)
        found = connection.execute(query_sql, {'query': str(query.tolist()), 'k': 10}).fetchall()
      exact = np.argsort(-(unit @ (query / np.linalg.norm(query))), kind='stable')[:10]
      assert [uri for uri, _ in found] == [uris[i] for i in exact]
      assert found[0][0] == uris[row] and found[0][1] == pytest.approx(1, abs=1e-5)
    plan = '\n'.join(r[0] for r in connection.execute(
        'EXPLAIN ' + query_sql, {'query': str(vectors[0].tolist()), 'k': 10}
    ).fetchall())
    assert 'Index Scan using photos_hnsw' in plan, plan
  row = 17
  script = subprocess.run([sys.executable, '-c', docs_query('python'), f'{postgres}?table=photos',
                           uris[row]], capture_output=True, text=True, check=True)
  printed = [line.split('  ', 1) for line in script.stdout.splitlines()]
  exact = np.argsort(-(unit @ unit[row]), kind='stable')[:10]
  assert [uri for _, uri in printed] == [uris[i] for i in exact]
  assert float(printed[0][0]) == pytest.approx(1, abs=1e-4)
