"""`pnasnet-embeddings neighbours`: the k images nearest a query image, exactly over a collection
or through an index, its candidates re-ranked exactly (embeddings/neighbours.py).

    pnasnet-embeddings neighbours --collection URI [--version N] --query IMAGE_OR_URI [--k 8] \
        [--sheet neighbours.png]
    pnasnet-embeddings neighbours --index INDEX_DIR --query IMAGE_OR_URI [--k 8] [--rerank 100] \
        [--nprobe N]
"""

import argparse
from typing import List, Optional, Sequence

from collection import CollectionError
from commands.common import FILESYSTEM_EPILOG, exits, parse, verb_parser
from embeddings import sheet
from embeddings.neighbour_index import IndexDirectoryError, NeighbourIndex
from embeddings.neighbours import (RERANK, QueryError, draw, find_query, find_query_in_index,
                                   format_table, search)
from embeddings.similarity import Neighbour
from embeddings.runs import open_snapshot
from storage.run_dirs import RUN_ERRORS


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('neighbours', __doc__.split('\n\n')[0], FILESYSTEM_EPILOG)
  parser.add_argument('--collection', help='the collection to search (a local folder, gs://, '
                      's3://): what `embed --collection` commits to')
  parser.add_argument('--version', type=int, help='search this version of the collection '
                      '(`collection history` lists them); default: the latest')
  parser.add_argument('--index', help='an index directory (pnasnet-embeddings index build) to '
                      'search instead of --collection')
  parser.add_argument('--model', help='with --index: the model id the index must hold')
  parser.add_argument('--rerank', type=int, default=RERANK,
                      help='with --index: candidates re-ranked from the index\'s refine store of '
                      'float16 vectors (0: the index\'s own scores, approximate for a PQ index)')
  parser.add_argument('--nprobe', type=int,
                      help='with --index: IVF lists searched, or HNSW\'s efSearch (default: the '
                      'index\'s, in its index.json plan); more is slower and finds more')
  parser.add_argument('--query', required=True, help='an image file or URI, embedded or not')
  parser.add_argument('--k', type=int, default=8, help='how many neighbours')
  parser.add_argument('--sheet', help='write a contact sheet PNG here')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Neighbour]:
  parser = build_parser()
  args, _ = parse(parser, argv)
  if args.k < 1:
    parser.error('--k must be at least 1')
  if args.nprobe is not None and (args.nprobe < 1 or args.index is None):
    parser.error('--nprobe: a number of at least 1, with --index')
  if (args.index is None) == (args.collection is None):
    parser.error('give --collection or --index (one of them)')
  if args.version is not None and args.collection is None:
    parser.error('--version: a version of --collection')
  if args.model is not None and args.index is None:
    parser.error('--model: with --index (a collection holds one model)')
  sheet_problem = sheet.output_problem('--sheet', args.sheet)
  if sheet_problem:
    parser.error(sheet_problem)
  with exits(refused=RUN_ERRORS + (CollectionError, QueryError, IndexDirectoryError)):
    if args.index:
      index = NeighbourIndex(args.index)
      index.check_model(args.model)
      query = find_query_in_index(index, args.query)
      neighbours = index.search(query.vector, args.k, rerank=max(args.rerank, 0),
                                nprobe=args.nprobe, exclude_uris=[[query.uri]])[0]
      exact = index.exact_scores(args.k, max(args.rerank, 0))
    else:
      snapshot = open_snapshot(args.collection, args.version)
      query = find_query(snapshot, args.query)
      neighbours = search(snapshot, query, args.k)
      exact = True
  print(format_table(query, neighbours, exact))
  if args.sheet:
    sheet.save_png(draw(query, neighbours), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return neighbours
