"""The k images nearest a query by cosine similarity, exactly, streaming the runs' shards.

    python -m embeddings.neighbours --runs RUN_DIR_OR_GLOB... --query IMAGE_OR_URI [--k 8] \
        [--sheet neighbours.png] [--model MODEL_ID]

The query is an image file or URI. Its vector is the stored one of any embedded image with the
same bytes (or, for a URI that cannot be read any more, the one stored for that URI); otherwise
the image is embedded first with the runs' model. Memory: one shard plus k rows.
"""

import hashlib
import os
import sys
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from embeddings import sheet, storage
from embeddings.runs import (RUN_ERRORS, Run, command_parser, find_runs, iter_run_shards,
                             parse_command, select_model)
from embeddings.shards import read_shard
from embeddings.similarity import Neighbour, nearest

SHEET_COLUMNS = 6


class QueryError(ValueError):
  """The query is neither embedded in the runs nor readable."""


class Query(NamedTuple):
  uri: str
  vector: np.ndarray
  data: Optional[bytes]  # the query's bytes, when readable
  source: str  # where the vector came from, for the table and the sheet
  embedded_uri: Optional[str]  # the row the vector was taken from, if any


def _readable(uri: str) -> Optional[bytes]:
  try:
    return storage.read_bytes(uri)
  except Exception:  # pylint: disable=broad-except; unreadable means look it up by URI
    return None


def find_query(runs: Sequence[Run], query: str) -> Query:
  """The query's vector: stored (same bytes, else same URI), or embedded now."""
  uri = query if storage.is_remote(query) else os.path.abspath(query)
  data = _readable(uri)
  sha256 = hashlib.sha256(data).hexdigest() if data is not None else None
  for shard in iter_run_shards(runs, columns=['uri', 'sha256', 'model']):
    if sha256 is not None:
      hits = [i for i, s in enumerate(shard.metadata.column('sha256').to_pylist()) if s == sha256]
    else:
      hits = [i for i, u in enumerate(shard.uris) if u == uri]
    if hits:
      found_uri = shard.uris[hits[0]]
      full = read_shard(shard.path, shard.metadata.column('run')[0].as_py())
      vector = full.vectors[full.uris.index(found_uri)]
      source = 'embedded' if found_uri == uri else f'same bytes as {found_uri}'
      return Query(uri, vector, data, source, found_uri)
  if data is None:
    raise QueryError(f'--query {query}: not embedded in the runs, and cannot be read to embed it')
  from embeddings.query import embed_image
  return Query(uri, embed_image(data, runs[0]), data, f'embedded now with {runs[0].model}', None)


def search(runs: Sequence[Run], query: Query, k: int) -> List[Neighbour]:
  return nearest(iter_run_shards(runs), query.vector, k, exclude_uris={query.uri})


def format_table(query: Query, neighbours: Sequence[Neighbour]) -> str:
  lines = [f'query: {query.uri} ({query.source})', f'{"rank":>4}  {"cosine":>7}  '
           f'{"pixels":>11}  uri']
  for n in neighbours:
    pixels = f'{n.metadata["width"]}x{n.metadata["height"]}'
    same = '  (same bytes)' if query.data is not None and n.metadata['sha256'] == hashlib.sha256(
        query.data).hexdigest() else ''
    lines.append(f'{n.rank:>4}  {n.score:7.4f}  {pixels:>11}  {n.uri}{same}')
  return '\n'.join(lines)


def draw(query: Query, neighbours: Sequence[Neighbour]):
  """The query (framed) then its neighbours, with rank, cosine and file name."""
  if query.embedded_uri is None:
    origin = 'embedded now'
  elif query.embedded_uri == query.uri:
    origin = 'embedded in the run'
  else:
    origin = f'same bytes as {storage.basename(query.embedded_uri)}'
  query_tile = sheet.Tile(sheet.thumbnail(query.data) if query.data is not None
                          else sheet.thumbnail_of(query.uri),
                          ['query', storage.basename(query.uri), origin], highlight=True)
  tiles = [query_tile] + [
      sheet.Tile(sheet.thumbnail_of(n.uri),
                 [f'#{n.rank}   cosine {n.score:.4f}', storage.basename(n.uri),
                  f'{n.metadata["width"]}x{n.metadata["height"]}'])
      for n in neighbours]
  return sheet.draw_sheet([tiles], sheet.balanced_columns(len(tiles), SHEET_COLUMNS))


def main(argv: Optional[Sequence[str]] = None) -> List[Neighbour]:
  parser = command_parser('python -m embeddings.neighbours', __doc__.split('\n\n')[0])
  parser.add_argument('--query', required=True,
                      help='an image file or URI, embedded or not')
  parser.add_argument('--k', type=int, default=8, help='how many neighbours (default 8)')
  parser.add_argument('--sheet', help='write a contact sheet PNG here')
  args = parse_command(parser, argv)
  if args.k < 1:
    parser.error('--k must be at least 1')
  try:
    runs = select_model(find_runs(args.runs), args.model)
    query = find_query(runs, args.query)
  except RUN_ERRORS + (QueryError,) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  neighbours = search(runs, query, args.k)
  print(format_table(query, neighbours))
  if args.sheet:
    sheet.save_png(draw(query, neighbours), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return neighbours


if __name__ == '__main__':
  main()
