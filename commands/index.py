"""`pnasnet-embeddings index build|add`: an approximate-neighbour index over a collection (FAISS),
built and brought up to the collection's later versions by a Beam job (jobs/index_build.py);
read by embeddings/neighbour_index.py.

    pnasnet-embeddings index build --collection URI [--version N] --output INDEX_DIR \
        [--memory_budget 4GB] [--recall_target 0.95] [Beam flags]
    pnasnet-embeddings index add --index INDEX_DIR [--version N] [--recall_drop 0.05]
"""

import argparse
import math
import os
from typing import Optional, Sequence

import collection
import storage
from commands.common import add_collection_flags, exits, parse, parse_size, sub_verb, verb_parser
from embeddings.neighbour_index import (DEFAULT_RECALL_TARGET, INDEX_FILE, TUNING_RERANK,
                                        IndexDirectoryError, read_description)

DEFAULT_MEMORY_BUDGET = '4GB'
DEFAULT_RECALL_DROP = 0.05


def build_parser() -> argparse.ArgumentParser:
  parser = verb_parser('index', __doc__.split('\n\n')[0])
  verbs = parser.add_subparsers(dest='command', required=True)
  build = sub_verb(parser, verbs, 'build', 'a new index over a version of the collection')
  add_collection_flags(build)
  build.add_argument('--output', required=True, help='the index directory to create (local)')
  build.add_argument('--memory_budget', type=parse_size, default=DEFAULT_MEMORY_BUDGET,
                     help='memory the index may take when searched')
  build.add_argument('--recall_target', type=float, default=DEFAULT_RECALL_TARGET,
                     help=f'a PQ plan searches the fewest lists (a power of two) giving this '
                     f'recall@10 on the probes with {TUNING_RERANK} candidates re-ranked; '
                     f'--nprobe overrides it at query time')
  build.add_argument('--seed', type=int, default=0, help='samples and training')
  add = sub_verb(parser, verbs, 'add', 'bring an index up to a later version of its collection '
                 '(the changes since the version it covers), without retraining')
  add.add_argument('--index', required=True, help='an index directory')
  add.add_argument('--version', type=int,
                   help='the collection\'s version to bring it to; default: the latest')
  add.add_argument('--recall_drop', type=float, default=DEFAULT_RECALL_DROP,
                   help='say to rebuild when recall@10 on the build\'s probes falls more than '
                   'this below the build\'s; it also says so when probes drawn from the added '
                   'rows lie far from the trained lists, or the lists grow uneven')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = build_parser()
  args, beam_flags = parse(parser, argv)
  from jobs import index_build, index_plan  # Beam: once the flags are checked
  refusals = (collection.CollectionError, IndexDirectoryError, index_plan.BudgetTooSmallError)
  if args.command == 'build':
    if not 0 < args.recall_target <= 1:
      parser.error('build --recall_target must be above 0 and at most 1')
    with exits(refused=refusals):
      if storage.is_remote(args.output):
        raise IndexDirectoryError(f'--output {args.output}: the index directory must be local')
      if os.path.exists(os.path.join(args.output, INDEX_FILE)):
        raise IndexDirectoryError(f'--output {args.output} already holds an index: use `add`, '
                                  'or another directory')
      source = collection.open_collection(args.collection, args.version)
      description = index_build.build_index(source, args.output, args.memory_budget, args.seed,
                                            beam_flags, args.recall_target)
  else:
    if not 0 <= args.recall_drop <= 1:
      parser.error('add --recall_drop must be between 0 and 1')
    with exits(refused=refusals):
      description = read_description(args.index)
      source = collection.open_collection(description['collection'], args.version)
      added = index_build.add_changes(args.index, description, source, args.recall_drop,
                                      beam_flags)
    if added is None:
      print(f'{args.index}: nothing new; the index covers version {description["version"]} of '
            f'{description["collection"]}')
      return description
    description = added
  print(summary_line(description))
  return description


def summary_line(description: dict) -> str:
  plan = description['plan']
  build = description['build']
  imbalance = (f', list imbalance {description["list_imbalance"]:.2f}'
               if description.get('list_imbalance') else '')
  text = (f'{description["directory"]}: {description["count"]} vectors of '
          f'{description["model"]}, version {description["version"]} of '
          f'{description["collection"]}; {plan["kind"]} ({plan["factory"]}), '
          f'{plan["bytes_per_vector"]} bytes a vector in memory; '
          f'{_recall(description["probes"], description["probe_recall_at_10"])}{imbalance}')
  if description.get('nprobe_curve'):
    point = next(p for p in description['nprobe_curve'] if p['nprobe'] == plan['nprobe'])
    text += (f'; nprobe {plan["nprobe"]} of {plan["lists"]} lists: recall@10 '
             f'{point["reranked_recall_at_10"]:.3f} with re-rank of {TUNING_RERANK} (target '
             f'{description["recall_target"]})')
  last = description.get('last_add')
  if last:
    if not math.isnan(build['probe_recall_at_10']):
      text += f' (at build {build["probe_recall_at_10"]:.3f})'
    text += (f'\nadded {last["added"]} vector(s) inserted since version {last["since"]}, '
             f'removed {last["removed"]} deleted since (changed, gone or failed files); '
             + _recall(last['added_probes'], last['added_probe_recall_at_10'], ' of the added rows',
                       ' (among their vectors alone: lower the smaller their share of the index)'))
    if last.get('added_probe_quantization_error') is not None:
      text += (f', their quantization error {last["added_probe_quantization_error"]:.3f} '
               f'(the build\'s probes\' {build["probe_quantization_error"]:.3f})')
    if last['rebuild']:
      text += (f'\n{"; ".join(last["rebuild"])}: rebuild the index '
               f'(pnasnet-embeddings index build)')
  return text


def _recall(probes: int, recall: float, of: str = '', note: str = '') -> str:
  """Without probes there is no recall to show: fewer than 10 vectors hold none back."""
  if not probes:
    return f'recall@10{of} not measured (too few vectors to hold probes back)'
  return f'recall@10 on {probes} probe vectors{of}{note}: {recall:.3f}'
