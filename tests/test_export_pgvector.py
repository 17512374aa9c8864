"""`python -m embeddings.export` into a real PostgreSQL with pgvector (pgserver, on 127.0.0.1):
the table equals `embeddings.load` row by row after two nights, a rerun with nothing new writes
nothing, bad targets are refused before any work, a failed batch is retried and a batch that keeps
failing leaves the table marked with its last complete state; above 2,000 dimensions the index is on
the PCA column and the query of docs/exporting.md re-ranks by the full vector."""

import os
import re
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import psycopg
import pytest

import embeddings
from commands.export import main as export_main
from tests.export_servers import free_port, postgres_with_pgvector
from tests.run_writer import rows, write_run

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                    'exporting.md')


@pytest.fixture(scope='module')
def postgres():
  with postgres_with_pgvector() as url:
    yield url


def two_nights(folder) -> str:
  """Night 1 embeds a, b, c, d under /photos; night 2 (same input) embeds a again (changed) and
  e (new), skips b (unchanged), dead-letters c and no longer finds d. Returns the runs' glob."""
  a, b, c, d = rows(['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg', '/photos/d.jpg'], 8, 1)
  write_run(f'{folder}/night1', [a, b, c, d], inputs=['/photos'],
            finished_at='2026-12-01T02:00:00Z')
  a2, e = rows(['/photos/a.jpg', '/photos/e.jpg'], 8, 2)
  write_run(f'{folder}/night2', [a2._replace(size_bytes=999), e], skipped_rows=[b],
            failed_uris=['/photos/c.jpg'], inputs=['/photos'], finished_at='2026-12-02T02:00:00Z')
  return f'{folder}/night*'


def table_rows(url: str, table: str) -> dict:
  with psycopg.connect(url) as connection:
    found = connection.execute(f'SELECT uri, sha256, height, width, model, run, '
                               f'embedding::real[] FROM {table}').fetchall()
  return {r[0]: r[1:6] + (np.array(r[6], np.float32),) for r in found}


def collection_rows(glob: str) -> dict:
  collection = embeddings.load(glob)
  metadata = collection.metadata.to_pylist()
  return {uri: (m['sha256'], m['height'], m['width'], m['model'], m['run'], collection.vectors[i])
          for i, (uri, m) in enumerate(zip(collection.uris, metadata))}


def assert_equal_rows(found: dict, expected: dict) -> None:
  assert sorted(found) == sorted(expected)
  for uri, row in expected.items():
    assert found[uri][:5] == row[:5], uri
    np.testing.assert_array_equal(found[uri][5], row[5])


def export(glob: str, to: str, *flags):
  return export_main(['--runs', glob, '--to', to, *flags])


class Nights(NamedTuple):
  glob: str
  first_report: object
  after_first: dict  # the table's rows after night 1 alone
  first_expected: dict
  report: object  # of the export of both nights


@pytest.fixture(scope='module')
def nights(postgres, tmp_path_factory) -> Nights:
  """Table `nights`: night 1 exported alone, then both nights; later tests rerun it and check
  it untouched."""
  folder = tmp_path_factory.mktemp('nights')
  to = f'{postgres}?table=nights'
  first = str(folder / 'first')
  write_run(f'{first}/night1', rows(['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg',
                                     '/photos/d.jpg'], 8, 1), inputs=['/photos'],
            finished_at='2026-12-01T02:00:00Z')
  first_report = export(f'{first}/night1', to)
  after_first = table_rows(postgres, 'nights')
  glob = two_nights(folder / 'both')
  # the same night 1 again under another directory: every row's run changes, so all are written
  return Nights(glob, first_report, after_first, collection_rows(f'{first}/night1'),
                export(glob, to))


def test_two_nights_one_deletion_and_one_dead_letter_leave_the_table_equal_to_load(
    postgres, nights):
  report = nights.first_report
  assert (report.written, report.deleted) == (4, 0)
  assert_equal_rows(nights.after_first, nights.first_expected)

  report = nights.report
  expected = collection_rows(nights.glob)
  assert sorted(expected) == ['/photos/a.jpg', '/photos/b.jpg', '/photos/e.jpg']
  assert_equal_rows(table_rows(postgres, 'nights'), expected)
  assert (report.written, report.deleted, report.rows) == (3, 2, 3)
  with psycopg.connect(postgres) as connection:
    indexes = connection.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'nights'"
                                 ).fetchall()
  assert any('hnsw (embedding vector_cosine_ops)' in i[0] for i in indexes)


def test_a_rerun_with_nothing_new_writes_nothing(postgres, nights, capsys):
  to = f'{postgres}?table=nights'

  def snapshot():
    with psycopg.connect(postgres) as connection:
      return sorted(connection.execute(
          'SELECT uri, xmin::text FROM nights UNION ALL SELECT name, xmin::text FROM '
          'nights_export').fetchall())
  before = snapshot()
  capsys.readouterr()
  report = export(nights.glob, to)
  assert (report.written, report.deleted, report.state) == (0, 0, None)
  assert 'nothing new' in capsys.readouterr().out
  assert snapshot() == before  # no row and no record rewritten


def _refused(capsys, glob, to) -> str:
  with pytest.raises(SystemExit) as exit_info:
    export(glob, to)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1, error
  return error


def test_bad_targets_are_refused_before_any_work_with_exit_2_and_one_line(postgres, nights,
                                                                          tmp_path, capsys):
  glob = nights.glob
  assert 'not a target' in _refused(capsys, glob, 'mysql://root@127.0.0.1/db?table=t')
  assert 'name one table' in _refused(capsys, glob, postgres)
  assert 'cannot connect' in _refused(capsys, glob,
                                      f'postgresql://postgres@127.0.0.1:{free_port()}/postgres'
                                      f'?table=t')
  other_size = str(tmp_path / 'wide')
  write_run(f'{other_size}/run', rows(['/photos/a.jpg'], 16, 3))
  assert '8-d vectors of builtin:test@untrained-seed0, not 16-d' in _refused(
      capsys, f'{other_size}/run', f'{postgres}?table=nights')
  other_model = str(tmp_path / 'model')
  write_run(f'{other_model}/run', rows(['/photos/a.jpg'], 8, 3), model='builtin:other@seed1')
  assert 'not 8-d of builtin:other@seed1' in _refused(capsys, f'{other_model}/run',
                                                     f'{postgres}?table=nights')
  with psycopg.connect(postgres) as connection:
    connection.execute('CREATE TABLE users_own (uri text PRIMARY KEY)')
    assert connection.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'"
                              ).fetchone()[0] == 0
  assert 'was not made by this export' in _refused(capsys, glob, f'{postgres}?table=users_own')
  assert_equal_rows(table_rows(postgres, 'nights'), collection_rows(glob))  # untouched


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


def test_a_failed_batch_is_retried_and_one_that_keeps_failing_names_the_last_complete_state(
    postgres, tmp_path, capsys):
  """The failure is PostgreSQL's own (a trigger raising); a batch is one transaction, so a
  failure leaves none of it, and the retry writes it whole."""
  to = f'{postgres}?table=failing'
  first = str(tmp_path / 'first')
  write_run(f'{first}/night1', rows(['/photos/a.jpg', '/photos/b.jpg', '/photos/c.jpg',
                                     '/photos/d.jpg'], 8, 1), inputs=['/photos'],
            finished_at='2026-12-01T02:00:00Z')
  export(f'{first}/night1', to)
  glob = two_nights(tmp_path / 'both')

  _fail_writes_of(postgres, 'failing', '/photos/e.jpg', times=1)  # then it succeeds
  export(glob, to, '--batch_size', '2')
  assert_equal_rows(table_rows(postgres, 'failing'), collection_rows(glob))

  night3 = str(tmp_path / 'both' / 'night3')
  write_run(night3, rows(['/photos/f.jpg', '/photos/g.jpg'], 8, 4),
            finished_at='2026-12-03T02:00:00Z', inputs=['/photos/f.jpg', '/photos/g.jpg'])
  _fail_writes_of(postgres, 'failing', '/photos/g.jpg', times=100)  # more than the retries
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    export(glob, to, '--batch_size', '1')
  assert exit_info.value.code == 1
  error = capsys.readouterr().err
  assert 'failed part way' in error and 'refused /photos/g.jpg for the test' in error
  assert re.search(r'last complete state: complete export of \S+ \(3 rows from 2 run\(s\)',
                   error), error
  with psycopg.connect(postgres) as connection:
    assert connection.execute("SELECT value->>'status' FROM failing_export WHERE name = 'state'"
                              ).fetchone()[0] == 'in progress'
    connection.execute('DROP TRIGGER refuse ON failing')
  export(glob, to)
  assert_equal_rows(table_rows(postgres, 'failing'), collection_rows(glob))
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
  from benchmarks.synthetic_collection import write_synthetic_run
  run = write_synthetic_run(str(tmp_path / 'synthetic'), 600, shard_rows=250, clusters=20)
  report = export(run.directory, f'{postgres}?table=photos')
  assert report.written == 600
  collection = embeddings.load(run.directory)
  unit = collection.vectors / np.linalg.norm(collection.vectors, axis=1, keepdims=True)
  sql = docs_query()
  with psycopg.connect(postgres) as connection:
    indexdef = connection.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'photos'"
                                  " AND indexname = 'photos_hnsw'").fetchone()[0]
    assert 'hnsw (embedding_reduced vector_l2_ops)' in indexdef
    *settings, query_sql = [s for s in sql.split(';') if s.strip()]
    for row in (0, 17, 333):
      query = collection.vectors[row]
      with connection.transaction():
        for statement in settings:  # SET LOCAL: for this transaction
          connection.execute(statement)
        found = connection.execute(query_sql, {'query': str(query.tolist()), 'k': 10}).fetchall()
      exact = np.argsort(-(unit @ (query / np.linalg.norm(query))), kind='stable')[:10]
      assert [uri for uri, _ in found] == [collection.uris[i] for i in exact]
      assert found[0][0] == collection.uris[row] and found[0][1] == pytest.approx(1, abs=1e-5)
    plan = '\n'.join(r[0] for r in connection.execute(
        'EXPLAIN ' + query_sql, {'query': str(collection.vectors[0].tolist()), 'k': 10}
    ).fetchall())
    assert 'Index Scan using photos_hnsw' in plan, plan
  row = 17
  script = subprocess.run([sys.executable, '-c', docs_query('python'), f'{postgres}?table=photos',
                           collection.uris[row]], capture_output=True, text=True, check=True)
  printed = [line.split('  ', 1) for line in script.stdout.splitlines()]
  exact = np.argsort(-(unit @ unit[row]), kind='stable')[:10]
  assert [uri for _, uri in printed] == [collection.uris[i] for i in exact]
  assert float(printed[0][0]) == pytest.approx(1, abs=1e-4)
