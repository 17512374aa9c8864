"""Figures for the neighbour index over a synthetic collection (benchmarks/synthetic_collection.py):
build time and peak memory, bytes per vector, single-threaded query latency p50/p99, recall@10
against exact search with and without the exact re-rank, `add` time and recall after; and exact
streamed search seconds per million vectors.

    python -m benchmarks.synthetic_collection --output /work/bench-data/synthetic-1m-float32 \
        --count 1000000 --near_duplicates 2000 --exact_duplicates 500            # once
    python -m benchmarks.bench_index --runs /work/bench-data/synthetic-1m-float32 \
        --index /work/bench-data/index-1m [--add_run DIR] [--queries 100]

An index directory that exists is reused (its build figures are those of its index.json and the
build log); --add_run is added to a copy of it.
"""

import argparse
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

QUERY_SEED = 1


def _peak_rss_gb_of_children() -> float:
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def _exact(runs, queries: np.ndarray, k: int) -> tuple:
  """(top k + 1 URIs per query, seconds): the exact streamed search, all queries in one pass."""
  import embeddings
  from embeddings.neighbours import search_vectors
  selected = embeddings.select_model(embeddings.find_runs(runs))
  started = time.perf_counter()
  found = search_vectors(selected, queries, k + 1)
  return [[n.uri for n in row] for row in found], time.perf_counter() - started


def _recall(found, exact, own, k: int = 10) -> float:
  hits = []
  for f, e, o in zip(found, exact, own):
    truth = [u for u in e if u != o][:k]
    hits.append(len(set(f[:k]) & set(truth)) / k)
  return float(np.mean(hits))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', nargs='+', required=True)
  parser.add_argument('--index', required=True)
  parser.add_argument('--memory_budget', default='4GB')
  parser.add_argument('--add_run', help='a run to add, e.g. --first_row 1000000 --count 50000')
  parser.add_argument('--queries', type=int, default=100)
  parser.add_argument('--nprobe', type=int, help="lists searched (default: the index's)")
  args = parser.parse_args(argv)
  import os
  if not os.path.exists(os.path.join(args.index, 'index.json')):
    started = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'embeddings.index', 'build', '--runs', *args.runs,
                    '--output', args.index, '--memory_budget', args.memory_budget], check=True)
    print(f'build: {time.perf_counter() - started:.1f} s, peak RSS '
          f'{_peak_rss_gb_of_children():.2f} GB')
  import faiss
  from embeddings.neighbour_index import FAISS_FILE, NeighbourIndex
  faiss.omp_set_num_threads(1)
  index = NeighbourIndex(args.index)
  index.nprobe = args.nprobe or index.nprobe
  size = os.path.getsize(os.path.join(args.index, FAISS_FILE))
  print(f'{index.count} vectors, plan {index.description["plan"]}; index.faiss '
        f'{size / index.count:.1f} bytes a vector; ids.parquet '
        f'{os.path.getsize(os.path.join(args.index, "ids.parquet")) / index.count:.1f} bytes a '
        f'vector')
  rng = np.random.default_rng(QUERY_SEED)
  picked = np.sort(rng.choice(index.count, args.queries, replace=False))
  ids = index.ids.column('id').to_numpy()[picked]
  own = index.ids.column('uri').take(picked).to_pylist()
  queries = index.stored_vectors(ids)
  latencies = []
  for query in queries:
    started = time.perf_counter()
    index.search_ids(query[np.newaxis], 10)
    latencies.append(time.perf_counter() - started)
  print(f'query latency, 1 thread, k=10, nprobe {index.nprobe}: p50 '
        f'{np.percentile(latencies, 50) * 1e3:.2f} ms, p99 {np.percentile(latencies, 99) * 1e3:.2f} ms')
  exact, seconds = _exact(args.runs, queries, 10)
  print(f'exact streamed search of {args.queries} queries: {seconds:.1f} s '
        f'({seconds / index.count * 1e6:.1f} s per million vectors)')
  plain = index.search(queries, 10)
  print(f'recall@10 without re-rank: {_recall([[n.uri for n in r] for r in plain], exact, own):.3f}')
  started = time.perf_counter()
  reranked = index.search(queries, 10, rerank=100, exclude_uris=[[o] for o in own])
  print(f'recall@10 with re-rank of 100: '
        f'{_recall([[n.uri for n in r] for r in reranked], exact, own):.3f} '
        f'({time.perf_counter() - started:.1f} s for the batch)')
  if args.add_run:
    copy = args.index.rstrip('/') + '-added'
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.index, copy)
    started = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'embeddings.index', 'add', '--index', copy, '--runs',
                    args.add_run], check=True)
    print(f'add: {time.perf_counter() - started:.1f} s')


if __name__ == '__main__':
  main()
