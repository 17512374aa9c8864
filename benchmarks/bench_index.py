"""Figures for the neighbour index over a synthetic collection (benchmarks/synthetic_collection.py),
side by side with plain FAISS on the same vectors in the same run: build time and peak memory,
bytes a vector, single-threaded query latency p50/p99, recall@10 against exact search with and
without re-rank; `add` time and its health figures.

    python -m benchmarks.synthetic_collection --output /work/bench-data/synthetic-100k \
        --count 100000                                                           # once
    python -m benchmarks.bench_index --runs /work/bench-data/synthetic-100k \
        --index /work/bench-data/index-100k [--memory_budget 4GB] [--add_run DIR] [--queries 100]

Recall: each query is a stored vector of the collection, and its own URI is left out of the
exact truth and of the index's results alike (the exact top 10 of the other vectors), so an
exhaustive index scores 1.000. Plain FAISS: the same index_factory string (a PCA with random
rotation first when the plan has one), trained on a sample of the same size, every vector added
in memory, searched with the same depth; "with re-rank": FAISS's IndexRefineFlat over float32
vectors, 100 candidates. An index directory that exists is reused (its build figures are those
of the earlier run); --add_run is added to a copy of it.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

QUERY_SEED = 1
K = 10
RERANK = 100


def _peak_rss_gb_of_children() -> float:
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def _recall(found, truth) -> float:
  return float(np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth)]))


def _percentiles(seconds) -> str:
  return (f'p50 {np.percentile(seconds, 50) * 1e3:.2f} ms, '
          f'p99 {np.percentile(seconds, 99) * 1e3:.2f} ms')


def _timed(search, queries) -> list:
  latencies = []
  for query in queries:
    started = time.perf_counter()
    search(query[np.newaxis])
    latencies.append(time.perf_counter() - started)
  return latencies


def _queries(index, count: int) -> tuple:
  """(ids, URIs, float32 vectors as the runs store them) of `count` rows picked at random."""
  from embeddings.faiss_util import read_rows
  rng = np.random.default_rng(QUERY_SEED)
  picked = np.sort(rng.choice(index.count, min(count, index.count), replace=False))
  table = index.ids.take(picked)
  vectors = np.stack([read_rows(shard, [row])[0] for shard, row in zip(
      table.column('shard').to_pylist(), table.column('row').to_pylist())])
  return table.column('id').to_numpy(), table.column('uri').to_pylist(), vectors


def _exact(runs, queries: np.ndarray, own) -> tuple:
  """(top K URIs per query, the query's own URI left out; seconds): exact streamed search."""
  import embeddings
  from embeddings.neighbours import search_vectors
  selected = embeddings.select_model(embeddings.find_runs(runs))
  started = time.perf_counter()
  found = search_vectors(selected, queries, K, [{o} for o in own])
  return [[n.uri for n in row] for row in found], time.perf_counter() - started


def _plain_faiss(runs, index, queries: np.ndarray, own, truth) -> None:
  """The same plan in plain FAISS, every vector in memory, on the same queries."""
  import faiss
  import embeddings
  from embeddings.neighbour_index import HNSW_EF_SEARCH
  from embeddings.similarity import unit_rows
  plan = index.description['plan']
  factory = (f'PCAR{plan["pca_dimension"]},' if plan['pca_dimension'] else '') + plan['factory']
  started = time.perf_counter()
  uris, parts = [], []
  for shard in embeddings.iter_shards(runs):
    uris += shard.uris
    parts.append(unit_rows(shard.vectors))
  vectors = np.concatenate(parts)
  del parts
  plain = faiss.index_factory(vectors.shape[1], factory)
  if not plain.is_trained:
    sample = np.random.default_rng(0).permutation(len(vectors))[:max(plan['train_sample'],
                                                                     20_000)]
    plain.train(vectors[np.sort(sample)])
  plain.add(vectors)
  built = time.perf_counter() - started
  if plan['kind'] == 'hnsw':
    faiss.downcast_index(plain).hnsw.efSearch = plan['nprobe'] or HNSW_EF_SEARCH
  else:
    faiss.extract_index_ivf(plain).nprobe = plan['nprobe']
  size = faiss.serialize_index(plain).nbytes
  own_of = {u: n for n, u in enumerate(uris)}
  units = unit_rows(queries)

  def found_uris(result_ids, query_number):
    return [uris[i] for i in result_ids if i >= 0 and i != own_of[own[query_number]]][:K]

  plain_found = [found_uris(row, n) for n, row in enumerate(plain.search(units, K + 1)[1])]
  if plan['kind'] == 'ivf_pq':
    refined = faiss.IndexRefineFlat(plain, faiss.swig_ptr(vectors))
    refined.k_factor = RERANK / K
    how = f'IndexRefineFlat over {RERANK} candidates'
    deeper = lambda q, k: refined.search(q, k)  # pylint: disable=unnecessary-lambda-assignment
  else:  # exact distances already: re-ranking is searching deeper
    how = f'{RERANK} candidates searched'
    deeper = lambda q, k: tuple(part[:, :k] for part in plain.search(q, RERANK))  # pylint: disable=unnecessary-lambda-assignment
  refined_found = [found_uris(row, n) for n, row in enumerate(deeper(units, K + 1)[1])]
  faiss.omp_set_num_threads(1)
  latencies = _timed(lambda q: plain.search(q, K), units)
  refine_latencies = _timed(lambda q: deeper(q, K), units)
  print(f'plain FAISS {factory}: build (read, train, add) {built:.1f} s; '
        f'{size / len(vectors):.1f} bytes a vector serialized; query {_percentiles(latencies)}; '
        f'with {how} {_percentiles(refine_latencies)}; '
        f'recall@10 {_recall(plain_found, truth):.3f} without re-rank, '
        f'{_recall(refined_found, truth):.3f} with')


def _build(args) -> None:
  started = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'embeddings.index', 'build', '--runs', *args.runs,
                  '--output', args.index, '--memory_budget', args.memory_budget], check=True)
  print(f'build: {time.perf_counter() - started:.1f} s, peak RSS '
        f'{_peak_rss_gb_of_children():.2f} GB')


def _sizes(index, directory: str) -> str:
  from embeddings import neighbour_index

  def per_vector(name):
    path = os.path.join(directory, name)
    return os.path.getsize(path) / index.count if os.path.exists(path) else 0.0

  searched = per_vector(neighbour_index.FAISS_FILE) + per_vector(neighbour_index.IVFDATA_FILE)
  return (f'index.faiss + index.ivfdata {searched:.1f} bytes a vector; refine store '
          f'{per_vector(neighbour_index.VECTORS_FILE):.1f}; ids.parquet '
          f'{per_vector(neighbour_index.IDS_FILE):.1f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', nargs='+', required=True)
  parser.add_argument('--index', required=True)
  parser.add_argument('--memory_budget', default='4GB')
  parser.add_argument('--add_run', help='a run to add, e.g. --first_row 100000 --count 5000')
  parser.add_argument('--queries', type=int, default=100)
  parser.add_argument('--nprobe', type=int, help="lists searched (default: the index's)")
  parser.add_argument('--no_plain', action='store_true', help='skip plain FAISS')
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(args.index, 'index.json')):
    _build(args)
  import faiss
  from embeddings.neighbour_index import NeighbourIndex
  index = NeighbourIndex(args.index)
  index.nprobe = args.nprobe or index.nprobe
  print(f'{index.count} vectors, plan {index.description["plan"]}; {_sizes(index, args.index)}')
  _, own, queries = _queries(index, args.queries)
  exclude = [[o] for o in own]
  truth, seconds = _exact(args.runs, queries, own)
  print(f'exact streamed search of {len(queries)} queries: {seconds:.1f} s')
  plain = index.search(queries, K, exclude_uris=exclude)
  reranked = index.search(queries, K, rerank=RERANK, exclude_uris=exclude)
  faiss.omp_set_num_threads(1)
  latencies = _timed(lambda q: index.search_ids(q, K), queries)
  whole = _timed(lambda q: index.search(q, K, rerank=RERANK), queries)
  print(f'this index, 1 thread, k={K}, depth {index.nprobe}: FAISS search '
        f'{_percentiles(latencies)}; the whole search with re-rank of {RERANK} (URIs, '
        f'metadata) {_percentiles(whole)}; recall@10 '
        f'{_recall([[n.uri for n in r] for r in plain], truth):.3f} without re-rank '
        f'({"exact" if index.exact_scores(K, 0) else "approximate"} scores), '
        f'{_recall([[n.uri for n in r] for r in reranked], truth):.3f} with')
  faiss.omp_set_num_threads(os.cpu_count() or 1)
  if not args.no_plain:
    _plain_faiss(args.runs, index, queries, own, truth)
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
