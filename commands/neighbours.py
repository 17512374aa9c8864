"""`pnasnet-embeddings neighbours`: the k images nearest a query image, exactly over runs or
through an index, its candidates re-ranked exactly (embeddings/neighbours.py).

    pnasnet-embeddings neighbours --runs RUN_DIR_OR_GLOB... --query IMAGE_OR_URI [--k 8] \
        [--sheet neighbours.png] [--model MODEL_ID]
    pnasnet-embeddings neighbours --index INDEX_DIR --query IMAGE_OR_URI [--k 8] [--rerank 100] \
        [--nprobe N]
"""

import argparse
from typing import List, Optional, Sequence

from commands.common import FILESYSTEM_EPILOG, add_runs_flags, exits, parse, verb_parser
from embeddings import sheet
from embeddings.neighbour_index import IndexDirectoryError, NeighbourIndex
from embeddings.neighbours import (RERANK, QueryError, draw, find_query, find_query_in_index,
                                   format_table, search)
from embeddings.similarity import Neighbour
from storage.run_dirs import RUN_ERRORS, find_runs, select_model


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('neighbours', __doc__.split('\n\n')[0], FILESYSTEM_EPILOG)
  add_runs_flags(parser, required=False)
  parser.add_argument('--index', help='an index directory (pnasnet-embeddings index build) to '
                      'search instead of --runs')
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
  if args.index is None and args.runs is None:
    parser.error('give --runs or --index')
  if args.index is not None and args.runs is not None:
    parser.error('give --runs or --index, not both')
  sheet_problem = sheet.output_problem('--sheet', args.sheet)
  if sheet_problem:
    parser.error(sheet_problem)
  with exits(refused=RUN_ERRORS + (QueryError, IndexDirectoryError)):
    if args.index:
      index = NeighbourIndex(args.index)
      index.check_model(args.model)
      query = find_query_in_index(index, args.query)
      neighbours = index.search(query.vector, args.k, rerank=max(args.rerank, 0),
                                nprobe=args.nprobe, exclude_uris=[[query.uri]])[0]
      exact = index.exact_scores(args.k, max(args.rerank, 0))
    else:
      runs = select_model(find_runs(args.runs), args.model)
      query = find_query(runs, args.query)
      neighbours = search(runs, query, args.k)
      exact = True
  print(format_table(query, neighbours, exact))
  if args.sheet:
    sheet.save_png(draw(query, neighbours), args.sheet)
    print(f'contact sheet: {args.sheet}')
  return neighbours
