"""`pnasnet-embeddings browse`: a local web page to search the collection by an uploaded image, a
URI or a click, and look at its duplicate groups (embeddings/browse.py).

    pnasnet-embeddings browse --collection URI [--version N] [--index INDEX_DIR] \
        [--duplicates dups.csv] [--host 127.0.0.1] [--port 8000] [--allowed_host NAME ...] \
        [--max_upload 32MB] [--k 24] [Beam flags]
"""

import argparse
import sys
from typing import Optional, Sequence

from collection import CollectionError
from commands.common import (FILESYSTEM_EPILOG, INTERRUPTED, add_collection_flags, exits, parse,
                             parse_size, verb_parser)
from embeddings.browse import (DEFAULT_HOST, DEFAULT_K, DEFAULT_MAX_UPLOAD, Browser,
                               allowed_hosts, create_app, listening_socket, load_embedder,
                               page_url, read_duplicates, server)
from embeddings.neighbour_index import NeighbourIndex
from embeddings.runs import embedding_run, open_snapshot
from storage.run_dirs import RUN_ERRORS, NoRunsError


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('browse', __doc__.split('\n\n')[0], FILESYSTEM_EPILOG)
  add_collection_flags(parser)
  parser.add_argument('--index', help='an index directory (pnasnet-embeddings index build) of '
                      'this collection: search it instead of a pass over the collection')
  parser.add_argument('--duplicates', help='a CSV of pnasnet-embeddings duplicates --csv, shown '
                      'as rows of thumbnails')
  parser.add_argument('--host', default=DEFAULT_HOST,
                      help='the address to listen on (0.0.0.0: every address of this machine, '
                      'which needs --allowed_host); there is no login, so anyone who reaches it '
                      'can search the collection and see its images')
  parser.add_argument('--port', type=int, default=8000,
                      help='the port to listen on (0: any free port, printed)')
  parser.add_argument('--allowed_host', action='append', metavar='NAME',
                      help='a name the page is reached by besides --host (a reverse proxy\'s, '
                      'a machine name; *.example.org for the names under it), without port; '
                      'repeatable. Requests naming any other host get a 400, so that a page '
                      'on another site cannot read the collection through DNS rebinding; '
                      'loopback --host allows localhost, 127.0.0.1 and [::1]')
  parser.add_argument('--max_upload', type=parse_size,
                      default=f'{DEFAULT_MAX_UPLOAD // 1_000_000}MB',
                      help='the largest upload accepted (the request\'s body, as 20MB or a '
                      'count of bytes); a larger one gets a 413 before it is read')
  parser.add_argument('--k', type=int, default=DEFAULT_K, help='neighbours shown per query')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Ctrl-C ends the page with one line and exit 130, whether it comes while the model loads or
  after uvicorn has shut the server down and raised it again."""
  try:
    serve(argv)
  except KeyboardInterrupt:
    print('browse: stopped', file=sys.stderr)
    sys.exit(INTERRUPTED)


def serve(argv: Optional[Sequence[str]]) -> None:
  parser = build_parser()
  args, _ = parse(parser, argv)
  if args.k < 1:
    parser.error('--k must be at least 1')
  if not 0 <= args.port <= 65535:
    parser.error(f'--port {args.port}: a port from 1 to 65535, or 0 for any free one')
  if args.max_upload < 1:
    parser.error(f'--max_upload {args.max_upload}: give at least one byte, as 20MB')
  with exits(refused=RUN_ERRORS + (CollectionError, OSError, ValueError)):
    names = args.allowed_host or []
    hosts = allowed_hosts(args.host, names)
    duplicates = read_duplicates(args.duplicates) if args.duplicates else []
    snapshot = open_snapshot(args.collection, args.version)
    index = None
    if args.index:
      index = NeighbourIndex(args.index)
      if index.model != snapshot.model:
        raise ValueError(f'--index {args.index} holds {index.model} embeddings, the collection '
                         f'{snapshot.model}: build the index from this collection')
    sock = listening_socket(args.port, args.host)
  try:
    embedder, embedder_problem = load_embedder(embedding_run(snapshot))
  except NoRunsError as exc:
    embedder, embedder_problem = None, str(exc)
  if embedder is None:
    print(f'warning: new images cannot be embedded ({embedder_problem}); images of the '
          f'collection can still be searched', file=sys.stderr)
  browser = Browser(snapshot, index, duplicates, embedder, embedder_problem, args.k)
  app = create_app(browser, hosts, args.max_upload)
  print(f'browse {len(browser.catalogue)} images of {browser.model} at '
        f'{page_url(sock, args.host, names)} (Ctrl-C stops)', flush=True)
  server(app).run(sockets=[sock])
