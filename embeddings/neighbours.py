"""The k images nearest a query by cosine similarity: exactly, streaming one snapshot of a
collection, or through an index (`pnasnet-embeddings index build`), its candidates re-ranked
exactly (`pnasnet-embeddings neighbours`).

The query is an image file or URI. Its vector is the stored one of the same URI with the same
bytes, else of any image with the same bytes (or, for a URI that cannot be read any more, the one
stored for that URI); otherwise the image is embedded first with the collection's model, as a run
that committed to it recorded (TensorFlow's import and the network's build: tens of seconds for
PNASNet-5 Large, where a stored vector costs none; docs/using-embeddings.md). A query that cannot
be decoded is refused before the collection is read. Exact search streams the embedding column
with the rows' ids, and takes the metadata of the k best by row id; memory: one block plus k
rows. From Python, `search_vectors(collection, queries, k)` answers a batch of query vectors in
one pass.
"""

import hashlib
import os
from typing import Collection, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow.compute as pc

import storage
from collection import Collection as Snapshot
from collection.table import ROW_ID
from embeddings import sheet
from embeddings.runs import embedding_run, metadata_of, vectors_by_row_id
from embeddings.shards import embedding_block
from embeddings.similarity import BLOCK_ROWS, Block, Neighbour, nearest_many
from run_format import EMBEDDING, METADATA_COLUMNS, RUN_COLUMN
from storage.members import read_image_bytes
from storage.run_dirs import NoRunsError, Run

SHEET_COLUMNS = 6
RERANK = 100
# Pillow's default limit, and the pipeline's default --max_image_pixels (transforms/decode.py,
# which imports TensorFlow: a query found by its bytes or URI never does).
MAX_QUERY_PIXELS = 89_478_485


class QueryError(ValueError):
  """The query is neither in the collection (or index) nor readable, or cannot be decoded."""


class Query(NamedTuple):
  uri: str
  vector: np.ndarray
  data: Optional[bytes]  # the query's bytes, when readable
  source: str  # where the vector came from, for the table and the sheet
  embedded_uri: Optional[str]  # the row the vector was taken from, if any


def _readable(uri: str) -> Optional[bytes]:
  try:
    return read_image_bytes(uri)
  except Exception:  # pylint: disable=broad-except; unreadable means look it up by URI
    return None


def check_image(source: str, data: Optional[bytes]) -> None:
  """Readable bytes that cannot be decoded into an image are refused before any run is read or
  model built: not an image, over MAX_QUERY_PIXELS, or truncated or corrupt (Pillow decodes them
  in full to see). `source` names them in the refusal as the user gave them: `--query PATH` on
  the command line, `the upload NAME` on the browse page."""
  if data is None:
    return
  import io
  import warnings
  from PIL import Image
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # the limit is ours to tell
      with Image.open(io.BytesIO(data)) as image:
        pixels = image.width * image.height
        if pixels > MAX_QUERY_PIXELS:
          raise Image.DecompressionBombError(
              f'{image.width}x{image.height} = {pixels} pixels, over the limit of '
              f'{MAX_QUERY_PIXELS}; query with a smaller copy')
        image.load()
  except Image.UnidentifiedImageError as exc:
    raise QueryError(f'{source}: not an image that can be read ({len(data)} bytes, '
                     f'starting {data[:16]!r})') from exc
  except Exception as exc:  # pylint: disable=broad-except; Pillow raises many kinds
    raise QueryError(f'{source}: an image that cannot be decoded '
                     f'({type(exc).__name__}: {exc})') from exc


def stored_vector(snapshot: Snapshot, row_id: int) -> np.ndarray:
  """The float32 vector of the row with this id."""
  return vectors_by_row_id(snapshot, [row_id])[0]


def row_of_sha256(snapshot: Snapshot, sha256: str) -> Optional[dict]:
  """A row (uri, `_rowid`) of these bytes, or None, through the index on `sha256`."""
  table = snapshot.dataset.to_table(columns=['uri'], filter=pc.field('sha256') == sha256,
                                    with_row_id=True, limit=1)
  return table.to_pylist()[0] if table.num_rows else None


def find_query(snapshot: Snapshot, query: str) -> Query:
  """The query's vector: stored (this URI with the same bytes, else any image with the same
  bytes, else this URI when it cannot be read), or embedded now."""
  uri = query if storage.is_remote(query) else os.path.abspath(query)
  data = _readable(uri)
  check_image(f'--query {query}', data)
  sha256 = hashlib.sha256(data).hexdigest() if data is not None else None
  rows = snapshot.lookup([uri], ['sha256']).to_pylist()
  found = rows[0] if rows and (sha256 is None or rows[0]['sha256'] == sha256) else None
  if found is None and sha256 is not None:
    found = row_of_sha256(snapshot, sha256)
  if found is not None:
    source = 'embedded' if found['uri'] == uri else f'same bytes as {found["uri"]}'
    return Query(uri, stored_vector(snapshot, found[ROW_ID]), data, source, found['uri'])
  if data is None:
    raise QueryError(f'--query {query}: not in {snapshot.uri} version {snapshot.version}, and '
                     'cannot be read to embed it')
  try:
    run = embedding_run(snapshot)
  except NoRunsError as exc:
    raise QueryError(f'--query {query}: not in the collection, and cannot be embedded: {exc}') \
        from exc
  return embed_now(query, uri, data, run)


def embed_now(query: str, uri: str, data: bytes, run: Run) -> Query:
  """The query embedded with the run's model (the network is built once a process)."""
  from embeddings.query import UndecodableImage, embed_image
  try:
    vector = embed_image(data, run)
  except UndecodableImage as exc:
    raise QueryError(f'--query {query}: an image that cannot be decoded ({exc})') from exc
  return Query(uri, vector, data, f'embedded now with {run.model}', None)


def vector_blocks(snapshot: Snapshot, block_rows: int = BLOCK_ROWS) -> Iterator[Block]:
  """The snapshot's vectors with their row ids, a block at a time (no metadata)."""
  for batch in snapshot.batches([EMBEDDING], block_rows, with_row_id=True):
    yield Block(batch.column(ROW_ID).to_numpy().astype(np.int64),
                embedding_block(batch.column(EMBEDDING), snapshot.uri))


def search_vectors(snapshot: Snapshot, queries: np.ndarray, k: int,
                   exclude_uris: Sequence[Collection[str]] = ()) -> List[List[Neighbour]]:
  """The k exact nearest neighbours of each row of `queries` [queries, dimension] in one
  snapshot of a collection (collection.open_collection), in one pass over its vectors;
  `exclude_uris`: per query, URIs left out of its answer."""
  queries = np.atleast_2d(np.asarray(queries, np.float32))
  if queries.shape[1] != snapshot.feature_size:
    raise ValueError(f'queries of {queries.shape[1]} values, but {snapshot.model} embeddings '
                     f'have {snapshot.feature_size}')
  return nearest_many(vector_blocks(snapshot), queries, k, exclude_uris, lambda ids: metadata_of(
      snapshot.take(ids.tolist(), METADATA_COLUMNS + [RUN_COLUMN])))


def search(snapshot: Snapshot, query: Query, k: int) -> List[Neighbour]:
  return search_vectors(snapshot, query.vector, k, [{query.uri}])[0]


def find_query_in_index(index, query: str) -> Query:
  """As find_query, looking the bytes (else the URI) up in the collection the index covers."""
  uri = query if storage.is_remote(query) else os.path.abspath(query)
  data = _readable(uri)
  check_image(f'--query {query}', data)
  column, value = ('sha256', hashlib.sha256(data).hexdigest()) if data is not None else (
      'uri', uri)
  row = index.find_row(column, value)
  if row is not None:
    vector = index.stored_vectors(np.array([row['id']]))[0]
    source = 'embedded' if row['uri'] == uri else f'same bytes as {row["uri"]}'
    return Query(uri, vector, data, source, row['uri'])
  if data is None:
    raise QueryError(f'--query {query}: not in the index, and cannot be read to embed it')
  return embed_now(query, uri, data, embedding_run(index.collection))


APPROXIMATE = ('~cosine: approximate, from the index\'s PQ codes in its PCA space (they run '
               'high); --rerank N (N > k) gives those of the stored vectors')


def format_table(query: Query, neighbours: Sequence[Neighbour], exact: bool = True) -> str:
  """`exact`: whether the scores are exact cosines; else the column says they are not."""
  label = 'cosine' if exact else '~cosine'
  lines = [f'query: {query.uri} ({query.source})', f'{"rank":>4}  {label:>7}  '
           f'{"pixels":>11}  uri']
  for n in neighbours:
    pixels = f'{n.metadata["width"]}x{n.metadata["height"]}'
    same = '  (same bytes)' if query.data is not None and n.metadata['sha256'] == hashlib.sha256(
        query.data).hexdigest() else ''
    lines.append(f'{n.rank:>4}  {n.score:7.4f}  {pixels:>11}  {n.uri}{same}')
  if not exact:
    lines.append(APPROXIMATE)
  return '\n'.join(lines)


def draw(query: Query, neighbours: Sequence[Neighbour]):
  """The query (framed) then its neighbours, with rank, cosine and file name."""
  if query.embedded_uri is None:
    origin = sheet.Label('embedded now')
  elif query.embedded_uri == query.uri:
    origin = sheet.Label('embedded in the run')
  else:
    origin = sheet.Label('same bytes as ', storage.basename(query.embedded_uri))
  query_tile = sheet.Tile(sheet.thumbnail(query.data) if query.data is not None
                          else sheet.thumbnail_of(query.uri),
                          ['query', sheet.short_name(query.uri), origin], highlight=True)
  tiles = [query_tile] + [
      sheet.Tile(sheet.thumbnail_of(n.uri),
                 [f'#{n.rank}   cosine {n.score:.4f}', sheet.short_name(n.uri),
                  f'{n.metadata["width"]}x{n.metadata["height"]}'])
      for n in neighbours]
  return sheet.draw_sheet([tiles], sheet.balanced_columns(len(tiles), SHEET_COLUMNS))
