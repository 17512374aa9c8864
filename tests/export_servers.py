"""A real PostgreSQL with pgvector on 127.0.0.1 for the export's tests and benchmark: the server
`pgserver` (PyPI) ships, initialised by it, then restarted by its own pg_ctl to listen on TCP
(pgserver alone serves a Unix socket only, and --to takes HOST:PORT)."""

import contextlib
import os
import socket
import tempfile
from typing import Iterator

SYSTEM_USER = 'pgserver'  # pgserver runs the server as this user when we are root


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def postgres_with_pgvector() -> Iterator[str]:
  """Yields postgresql://postgres@127.0.0.1:PORT/postgres; stops the server after."""
  import pgserver
  with tempfile.TemporaryDirectory(prefix='export-pg-') as folder:
    data = os.path.join(folder, 'data')
    os.makedirs(data)
    server = pgserver.get_server(data, cleanup_mode=None)  # initdb, user, permissions
    user = SYSTEM_USER if os.geteuid() == 0 else None
    port = free_port()
    log = os.path.join(data, 'tcp.log')
    pgserver.pg_ctl(['-w', 'stop'], pgdata=server.pgdata, user=user)
    pgserver.pg_ctl(['-w', '-o', f'-h 127.0.0.1 -p {port} -k {data}', '-l', log, 'start'],
                    pgdata=server.pgdata, user=user, timeout=60)
    try:
      yield f'postgresql://postgres@127.0.0.1:{port}/postgres'
    finally:
      pgserver.pg_ctl(['-w', '-m', 'fast', 'stop'], pgdata=server.pgdata, user=user)
