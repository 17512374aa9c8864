"""`--to` as users of each database write it: any libpq URI or keyword/value string (a Unix
socket, pgserver's own URI, sslmode, options, a password from the URI, PGPASSWORD, a password
file or a service file) reaches a real PostgreSQL (pgserver, a role with password
authentication); milvus[+https]:// and qdrant[+https]:// give their clients the URL and the
token or API key of the environment. A password, token or key is shown nowhere: not in the
target's name, the summary, the logs, the errors (also when the server cannot be reached), nor
the export's record."""

import base64
import concurrent.futures
import http.server
import logging
import threading
import urllib.parse
from typing import NamedTuple

# pymilvus configures logging when first imported: imported here, not inside a test (whose log
# capture it would close).
import pymilvus  # noqa: F401
import psycopg
import pytest

from jobs.export import open_target
from jobs.export_target import TargetError
from tests.collection_nights import rows_of
from tests.export_servers import free_port, postgres_with_pgvector
from tests.json_handler import JsonHandler
from tests.test_export_pgvector import assert_equal_rows, export, first_night, table_rows

ROLE = 'secretive'
PASSWORD = 'Pw-7q@ x'  # an @ and a space: percent-encoded in a URI
ENCODED = urllib.parse.quote(PASSWORD, safe='')
WRONG = 'Wr0ng-pw'


class Server(NamedTuple):
  url: str  # the superuser's URI (trusted, over TCP)
  port: int
  sockets: str  # the folder of its Unix socket


@pytest.fixture(scope='module')
def server():
  """pgserver's PostgreSQL, where ROLE must give PASSWORD (scram-sha-256), over TCP and the
  Unix socket; every other role is trusted."""
  with postgres_with_pgvector() as url:
    with psycopg.connect(url, autocommit=True) as connection:
      connection.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
      hba_file, port, sockets = (connection.execute(f'SHOW {name}').fetchone()[0] for name in (
          'hba_file', 'port', 'unix_socket_directories'))
      with open(hba_file) as f:
        rules = f.read()
      with open(hba_file, 'w') as f:
        f.write(f'host all {ROLE} 127.0.0.1/32 scram-sha-256\n'
                f'local all {ROLE} scram-sha-256\n' + rules)
      connection.execute('SELECT pg_reload_conf()')
    for _ in range(100):  # the postmaster rereads the rules on its own, soon after
      try:
        psycopg.connect(f'postgresql://{ROLE}@127.0.0.1:{port}/postgres').close()
      except psycopg.OperationalError:
        break
    else:
      raise AssertionError('password authentication was not switched on')
    yield Server(url, int(port), sockets)


@pytest.fixture(autouse=True)
def no_libpq_files(monkeypatch, tmp_path):
  """Neither the machine's ~/.pgpass and service file nor its PG* variables."""
  for name in ('PGPASSWORD', 'PGSERVICE', 'PGHOST', 'PGPORT', 'PGUSER', 'PGDATABASE',
               'PGCONNECT_TIMEOUT', 'MILVUS_TOKEN', 'QDRANT_API_KEY'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('PGPASSFILE', str(tmp_path / 'no-pgpass'))
  monkeypatch.setenv('PGSERVICEFILE', str(tmp_path / 'no-services'))


def _with_password_file(monkeypatch, tmp_path, server):
  path = tmp_path / 'pgpass'
  path.write_text(f'127.0.0.1:{server.port}:*:{ROLE}:{PASSWORD}\n')
  path.chmod(0o600)  # libpq ignores a password file others can read
  monkeypatch.setenv('PGPASSFILE', str(path))


def _with_service_file(monkeypatch, tmp_path, server):
  path = tmp_path / 'services'
  path.write_text(f'[photos]\nhost=127.0.0.1\nport={server.port}\ndbname=postgres\n'
                  f'user={ROLE}\npassword={PASSWORD}\n')
  monkeypatch.setenv('PGSERVICEFILE', str(path))


# name -> (--to, what sets the environment up, the role connected, its statement_timeout)
FORMS = {
    'a Unix socket': ('postgresql:///postgres?host={sockets}&port={port}&user=postgres&table=t',
                      None, 'postgres', '0'),
    "pgserver's own URI": ('postgresql://postgres:@/postgres?host={sockets}&port={port}&'
                           'table=images', None, 'postgres', '0'),
    'keyword/value': ("host={sockets} port={port} dbname=postgres user=postgres table='t'", None,
                      'postgres', '0'),
    'a password, sslmode and options': (
        'postgres://' + ROLE + ':' + ENCODED + '@127.0.0.1:{port}/postgres?sslmode=prefer&'
        'options=-c%20statement_timeout%3D5000&table=t', None, ROLE, '5s'),
    'a password in keyword/value': (
        "host=127.0.0.1 port={port} dbname=postgres user=" + ROLE + " password='" + PASSWORD +
        "' sslmode=disable table=t", None, ROLE, '0'),
    'PGPASSWORD': ('postgresql://' + ROLE + '@127.0.0.1:{port}/postgres?sslmode=disable&table=t',
                   lambda monkeypatch, tmp_path, server: monkeypatch.setenv('PGPASSWORD',
                                                                           PASSWORD),
                   ROLE, '0'),
    'a password file': ('postgresql://' + ROLE + '@127.0.0.1:{port}/postgres?table=t',
                        _with_password_file, ROLE, '0'),
    'a service file': ('service=photos table=t', _with_service_file, ROLE, '0'),
}


@pytest.mark.parametrize('form', FORMS)
def test_libpq_connection_strings_reach_the_server_as_written(server, tmp_path, monkeypatch,
                                                               form):
  to, environment, role, timeout = FORMS[form]
  if environment:
    environment(monkeypatch, tmp_path, server)
  target = open_target(to.format(port=server.port, sockets=server.sockets))
  assert target.table in ('t', 'images')
  assert PASSWORD not in target.name and ENCODED not in target.name
  with target.connect() as connection:
    assert connection.execute("SELECT current_user, current_setting('statement_timeout')"
                              ).fetchone() == (role, timeout)


def test_an_export_through_pgservers_own_uri_over_the_unix_socket(server, tmp_path):
  uri = str(tmp_path / 'collection')
  first_night(uri)
  to = f'postgresql://postgres:@/postgres?host={server.sockets}&port={server.port}&table=images'
  assert export(uri, to).written == 4
  assert_equal_rows(table_rows(server.url, 'images'), rows_of(uri))


@pytest.mark.parametrize('to, conninfo, table', [
    ('postgresql:///db?host=/var/run/postgresql&table=t', 'postgresql:///db?host=/var/run/'
     'postgresql', 't'),
    ('postgres://u@h/db?table=t&sslmode=require', 'postgres://u@h/db?sslmode=require', 't'),
    ('postgresql://h1:5432,h2:5433/db?options=-c%20statement_timeout%3D5000&tab%6ce=t%5f1',
     'postgresql://h1:5432,h2:5433/db?options=-c%20statement_timeout%3D5000', 't_1'),
    ("host='/tmp/my pg' table = 'photos' dbname=postgres", "host='/tmp/my pg' dbname=postgres",
     'photos'),
    ('service=photos table=t', 'service=photos', 't'),
])
def test_only_the_table_is_taken_out_of_the_connection_string(to, conninfo, table):
  target = open_target(to)
  assert (target.conninfo, target.table, target.name) == (conninfo, table, to)


@pytest.mark.parametrize('to, said', [
    ('postgresql://u:S3cret%zz@h/db?table=t', 'postgresql://u:***@h/db?table=t: not a '
     'PostgreSQL connection string: invalid percent-encoded token: "..."'),
    ('postgresql://u:S3cret@h/db?password=S3cret&bogus=1&table=t',
     'invalid URI query parameter: "bogus"'),
    ("host=h password='S3cret' bogus=1 table=t", 'host=h password=*** bogus=1 table=t: not a '
     'PostgreSQL connection string: invalid connection option "bogus"'),
    ('host=h password=S3cret dbname=db', 'host=h password=*** dbname=db: name one table, as '
     'postgresql://USER@HOST:PORT/DB?table=NAME or "host=HOST dbname=DB table=NAME"'),
    ("host=h password='S3cret table=t", 'host=h password=***: not a PostgreSQL connection '
     'string: unterminated quoted string'),
    ("host=h password=S3cret ' table=t", "host=h password=*** ' table=t: not a libpq "
     "keyword/value string: write KEYWORD=VALUE pairs"),
    ('mysql://u:S3cret@h/db?table=t', 'mysql://u:***@h/db?table=t: not a target'),
    ('qdrant://S3cret@h/photos', 'qdrant://***@h/photos: give the API key in QDRANT_API_KEY'),
    ('milvus://S3cret@h/photos', 'milvus://***@h/photos: give USER:PASSWORD@, or the token in '
     'MILVUS_TOKEN'),
    ('milvus://u:S3cret@h:port/photos', 'milvus://u:***@h:port/photos: not a URL'),
    ('milvus://h/photos?secure=true', 'milvus://h/photos?secure=true: a server takes no '
     '?parameters: milvus://HOST:PORT/COLLECTION, or milvus+https://HOST:PORT/COLLECTION'),
])
def test_a_to_that_cannot_be_used_is_refused_without_its_password(to, said):
  with pytest.raises(TargetError) as refused:
    open_target(to)
  assert said in str(refused.value) and 'S3cret' not in str(refused.value)


@pytest.mark.parametrize('to, token, uri, name', [
    ('milvus://db.internal/photos', 'root:Milvus', 'http://db.internal:19530',
     'milvus://db.internal/photos'),
    ('milvus+https://in03-x.serverless.gcp-us-west1.cloud.zilliz.com/photos', 'api-key-1',
     'https://in03-x.serverless.gcp-us-west1.cloud.zilliz.com:443',
     'milvus+https://in03-x.serverless.gcp-us-west1.cloud.zilliz.com/photos'),
    ('milvus+https://root:p%40ss@[::1]:19530/photos', 'root:p@ss', 'https://[::1]:19530',
     'milvus+https://root:***@[::1]:19530/photos'),
])
def test_milvus_forms_give_the_client_its_uri_and_token(monkeypatch, to, token, uri, name):
  monkeypatch.setenv('MILVUS_TOKEN', token)
  target = open_target(to)
  assert (target.uri, target.token, target.collection, target.name) == (uri, token, 'photos',
                                                                       name)


@pytest.mark.parametrize('to, url', [
    ('qdrant://db.internal/photos', 'http://db.internal:6333'),
    ('qdrant+https://xyz.eu-central.aws.cloud.qdrant.io:6333/photos',
     'https://xyz.eu-central.aws.cloud.qdrant.io:6333'),
    ('QDRANT+HTTPS://db.internal:443/photos', 'https://db.internal:443'),
])
def test_qdrant_forms_give_the_client_its_url_and_the_api_key(monkeypatch, to, url):
  monkeypatch.setenv('QDRANT_API_KEY', 'key-1')
  target = open_target(to)
  assert (target.url, target.api_key, target.collection, target.name) == (url, 'key-1',
                                                                         'photos', to)


class _RecordingQdrant(JsonHandler):
  """Answers that no collection exists; keeps each request's api-key header."""
  keys = []

  def do_GET(self):  # pylint: disable=invalid-name
    self.keys.append(self.headers.get('api-key'))
    self.send_json({'result': {'exists': False}, 'status': 'ok', 'time': 0})


def test_the_api_key_and_the_token_of_the_environment_reach_the_servers(monkeypatch):
  """Qdrant's REST API gets the key in its api-key header, Milvus's gRPC the token in its
  authorization metadata (base64), as their clients send them."""
  import grpc
  qdrant = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _RecordingQdrant)
  threading.Thread(target=qdrant.serve_forever, daemon=True).start()
  metadata = []

  class Refuse(grpc.GenericRpcHandler):
    def service(self, details):
      metadata.append(dict(details.invocation_metadata))
      return grpc.unary_unary_rpc_method_handler(
          lambda request, context: context.abort(grpc.StatusCode.UNAVAILABLE, 'recorded'))
  milvus = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
  milvus.add_generic_rpc_handlers((Refuse(),))
  milvus_port = milvus.add_insecure_port('127.0.0.1:0')
  milvus.start()
  monkeypatch.setenv('QDRANT_API_KEY', 'key-from-env')
  monkeypatch.setenv('MILVUS_TOKEN', 'root:token-from-env')
  try:
    open_target(f'qdrant://127.0.0.1:{qdrant.server_address[1]}/photos').check('m', 8)
    assert _RecordingQdrant.keys and set(_RecordingQdrant.keys) == {'key-from-env'}
    for to, token in ((f'milvus://127.0.0.1:{milvus_port}/photos', 'root:token-from-env'),
                      (f'milvus://root:p%40ss@127.0.0.1:{milvus_port}/photos', 'root:p@ss')):
      with pytest.raises(TargetError) as refused:
        open_target(to).check('m', 8)
      assert 'cannot connect' in str(refused.value)
      assert 'token-from-env' not in str(refused.value) and 'p@ss' not in str(refused.value)
      assert metadata[-1]['authorization'] == base64.b64encode(token.encode()).decode()
  finally:
    qdrant.shutdown()
    milvus.stop(0)


def test_a_password_token_or_key_is_shown_nowhere(server, tmp_path, monkeypatch, capsys,
                                                 caplog):
  """An export, its rerun, and refusals (a wrong port, a wrong password, servers that do not
  answer): stdout, stderr, every log record and the table's record of the export."""
  caplog.set_level(logging.DEBUG)
  monkeypatch.setenv('MILVUS_TOKEN', 'root:milvus-token')
  monkeypatch.setenv('QDRANT_API_KEY', 'qdrant-key')
  uri = str(tmp_path / 'collection')
  first_night(uri)
  to = f'postgresql://{ROLE}:{ENCODED}@127.0.0.1:{server.port}/postgres?table=secrets'
  shown = []

  def run(to, code=0):
    if code:
      with pytest.raises(SystemExit) as exit_info:
        export(uri, to)
      assert exit_info.value.code == code
    else:
      export(uri, to)
    captured = capsys.readouterr()
    shown.extend([captured.out, captured.err])
    return captured
  assert f'postgresql://{ROLE}:***@127.0.0.1:{server.port}/postgres?table=secrets: version' in (
      run(to).out)
  assert 'nothing new' in run(to).out
  port = free_port()
  assert 'cannot connect' in run(to.replace(str(server.port), str(port)), code=2).err
  assert 'password authentication failed' in run(to.replace(ENCODED, WRONG), code=2).err
  assert 'cannot connect' in run(f"host=127.0.0.1 port={port} user={ROLE} password='{PASSWORD}'"
                                 f" table=secrets", code=2).err
  assert 'cannot connect' in run(f'milvus://127.0.0.1:{port}/photos', code=2).err
  assert 'cannot connect' in run(f'milvus://root:{ENCODED}@127.0.0.1:{port}/photos', code=2).err
  assert 'cannot connect' in run(f'qdrant+https://127.0.0.1:{port}/photos', code=2).err
  with psycopg.connect(server.url) as connection:
    shown += [row[0] for row in connection.execute('SELECT value::text FROM secrets_export')]
  shown.append(caplog.text)
  shown += [str(record.args) for record in caplog.records]
  everything = '\n'.join(shown)
  assert 'secrets' in everything and 'version' in everything
  for secret in (PASSWORD, ENCODED, WRONG, 'milvus-token', 'qdrant-key'):
    assert secret not in everything, secret
