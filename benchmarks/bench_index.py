"""Figures for the neighbour index over a synthetic collection (benchmarks/synthetic_collection.py),
side by side with plain FAISS on the same vectors and queries in the same run: build time and
peak memory, bytes a vector, single-threaded query latency p50/p99 (FAISS alone, and the whole
search: re-rank vectors and result rows read from the collection by row id), recall@10 against
exact search with and without re-rank, and for a PQ plan the curve of nprobe against recall and
latency; `add` time (the changes since the version the index covers) and its health figures.

    python -m benchmarks.synthetic_collection --collection /work/bench-data/col-100k \
        --count 100000 --embedding_dtype float16 [--churn_nights 10]              # once
    python -m benchmarks.bench_index --collection /work/bench-data/col-100k [--version 3] \
        --index /work/bench-data/index-100k [--memory_budget 4GB] [--add] [--queries 100] \
        [--plain_refine flat|fp16|none]

Recall: each query is a stored vector of the collection, and its own URI is left out of the
exact truth and of the index's results alike (the exact top 10 of the other vectors), so an
exhaustive index scores 1.000. Plain FAISS: the same index_factory string (`PCAR` first when the
plan has a PCA), trained on a random sample of the same size with FAISS's defaults (but no
polysemous training: it serves comparing codes with each other, which neither index does), every
vector added in memory (streamed batch by batch: at 1M the float32 vectors alone would be 17 GB),
searched at the same depths; "with re-rank": FAISS's IndexRefine over 100 candidates, its vectors float32
(`--plain_refine flat`, RefineFlat) or float16 (`fp16`, what fits at 1M). An index directory that
exists is reused (build it with /usr/bin/time -v for its build figures); --add brings a copy of
it up to the collection's latest version (build it with --version of an earlier one).
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
  """(ids, URIs, float32 vectors as the collection stores them) of `count` rows at random."""
  from embeddings.neighbour_index import embedding_rows
  covered = index.collection
  every = np.concatenate([b.column('_rowid').to_numpy() for b in covered.batches(
      [], with_row_id=True)]).astype(np.int64)
  picked = np.sort(np.random.default_rng(QUERY_SEED).choice(every, min(count, len(every)),
                                                             replace=False))
  uris = covered.take(picked.tolist(), ['uri']).column('uri').to_pylist()
  return picked, uris, embedding_rows(covered, picked)


def _batches(covered):
  """(URIs, unit float32 vectors) of the collection, batch by batch."""
  from jobs.collection_reads import vectors
  from embeddings.similarity import unit_rows
  for batch in covered.batches(['uri', 'embedding'], batch_rows=20_000):
    yield batch.column('uri').to_pylist(), unit_rows(vectors(batch))


def _exact(covered, queries: np.ndarray, own) -> tuple:
  """(top K URIs per query, the query's own URI left out; seconds): exact search streamed over
  the collection, each query's best K + 1 kept."""
  started = time.perf_counter()
  units = _unit_rows_of(queries)
  best_scores = np.full((len(units), 0), -np.inf, np.float32)
  best_uris = np.zeros((len(units), 0), object)
  for uris, vectors in _batches(covered):
    scores = np.concatenate([best_scores, units @ vectors.T], axis=1)
    names = np.concatenate([best_uris, np.broadcast_to(np.array(uris, object),
                                                       (len(units), len(uris)))], axis=1)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :K + 1]
    best_scores = np.take_along_axis(scores, order, 1)
    best_uris = np.take_along_axis(names, order, 1)
  found = [[u for u in row if u != o][:K] for row, o in zip(best_uris.tolist(), own)]
  return found, time.perf_counter() - started


def _plain_vectors(covered, sample_size: int) -> tuple:
  """(URIs, a random sample of unit vectors to train on, a function yielding the unit vectors
  batch by batch): two streamed passes, never every float32 vector at once."""
  uris = []
  for batch in covered.batches(['uri'], batch_rows=100_000):  # pass 1: the URIs, for the sample
    uris += batch.column('uri').to_pylist()
  chosen = np.sort(np.random.default_rng(0).permutation(len(uris))[:sample_size])
  sample, start = [], 0
  for names, vectors in _batches(covered):
    mine = chosen[(chosen >= start) & (chosen < start + len(names))] - start
    sample.append(vectors[mine])
    start += len(names)
  return uris, np.concatenate(sample), lambda: (vectors for _, vectors in _batches(covered))


def _plain_faiss(covered, index, queries: np.ndarray, own, truth, refine: str,
                 depths) -> None:
  """The same plan in plain FAISS, every vector in memory, on the same queries."""
  import faiss
  plan = index.description['plan']
  factory = (f'PCAR{plan["pca_dimension"]},' if plan['pca_dimension'] else '') + plan['factory']
  started = time.perf_counter()
  plain = faiss.index_factory(index.dimension, factory)
  uris, sample, shards = _plain_vectors(covered, max(plan['train_sample'], 20_000))
  if not plain.is_trained:
    if plan['kind'] == 'ivf_pq':
      faiss.downcast_index(faiss.extract_index_ivf(plain)).do_polysemous_training = False
    plain.train(sample)
  del sample
  refined = None
  if plan['kind'] == 'ivf_pq' and refine != 'none':
    stored = (faiss.IndexFlatL2(index.dimension) if refine == 'flat' else
              faiss.IndexScalarQuantizer(index.dimension, faiss.ScalarQuantizer.QT_fp16))
    refined = faiss.IndexRefine(plain, stored)
    refined.k_factor = RERANK / K
  for vectors in shards():
    (refined or plain).add(vectors)
  built = time.perf_counter() - started
  size = faiss.serialize_index(plain).nbytes
  own_of = {u: n for n, u in enumerate(uris)}
  units = _unit_rows_of(queries)

  def recall_of(search) -> float:
    found = search(units, K + 1)[1]
    return _recall([[uris[i] for i in row if i >= 0 and i != own_of[own[n]]][:K]
                    for n, row in enumerate(found)], truth)

  def set_depth(depth):
    if plan['kind'] == 'hnsw':
      faiss.downcast_index(plain).hnsw.efSearch = depth
    else:
      faiss.extract_index_ivf(plain).nprobe = depth
      if '_HNSW' in plan['factory']:  # as this index's search_parameters: efSearch 2 x nprobe
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(plain).quantizer)
        quantizer.hnsw.efSearch = max(2 * depth, 16)

  refine_how = {'flat': 'IndexRefine over float32', 'fp16': 'IndexRefine over float16'}.get(
      refine)
  print(f'plain FAISS {factory}: build (read, train, add) {built:.1f} s; '
        f'{size / len(uris):.1f} bytes a vector serialized'
        + (f' (+{refined.refine_index.sa_code_size()} for the refine vectors, held in memory)'
           if refined is not None else ''))
  for depth in depths:
    set_depth(depth)
    without = recall_of(plain.search)
    with_refine = recall_of(refined.search) if refined is not None else None
    faiss.omp_set_num_threads(1)
    latencies = _timed(lambda q: plain.search(q, K), units)
    line = (f'  plain FAISS, depth {depth}: recall@10 {without:.3f} without re-rank; query '
            f'{_percentiles(latencies)}')
    if refined is not None:
      line += (f'; with {refine_how} of {RERANK} candidates: recall@10 {with_refine:.3f}, '
               f'query {_percentiles(_timed(lambda q: refined.search(q, K), units))}')
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    print(line)


def _unit_rows_of(queries: np.ndarray) -> np.ndarray:
  from embeddings.similarity import unit_rows
  return np.ascontiguousarray(unit_rows(np.asarray(queries, np.float32)))


def _build(args) -> None:
  started = time.perf_counter()
  version = ['--version', str(args.version)] if args.version else []
  subprocess.run([sys.executable, '-m', 'commands', 'index', 'build', '--collection',
                  args.collection, *version, '--output', args.index, '--memory_budget',
                  args.memory_budget], check=True)
  print(f'build: {time.perf_counter() - started:.1f} s, peak RSS '
        f'{_peak_rss_gb_of_children():.2f} GB')


def _sizes(index, directory: str) -> str:
  from embeddings import neighbour_index

  def per_vector(name):
    path = os.path.join(directory, name)
    return os.path.getsize(path) / index.count if os.path.exists(path) else 0.0

  searched = per_vector(neighbour_index.FAISS_FILE) + per_vector(neighbour_index.IVFDATA_FILE)
  return (f'index.faiss + index.ivfdata {searched:.1f} bytes a vector (rows, URIs and re-rank '
          f'vectors: the collection\'s)')


def _depths(index, chosen: int) -> list:
  """Search depths for the curve: powers of two around the index's (IVF lists, or efSearch)."""
  plan = index.description['plan']
  if plan['kind'] == 'hnsw':
    return [16, 32, 64, 128, 256]
  if plan['kind'] == 'exhaustive':
    return [1]
  return [2 ** n for n in range(int(np.log2(plan['lists'])) + 1)
          if 2 ** n <= max(4 * chosen, 64)]


def _index_at(index, depth: int, queries, exclude, truth) -> str:
  import faiss
  plain = index.search(queries, K, nprobe=depth, exclude_uris=exclude)
  reranked = index.search(queries, K, rerank=RERANK, nprobe=depth, exclude_uris=exclude)
  faiss.omp_set_num_threads(1)
  latencies = _timed(lambda q: index.search_ids(q, K, depth), queries)
  whole = _timed(lambda q: index.search(q, K, rerank=RERANK, nprobe=depth), queries)
  faiss.omp_set_num_threads(os.cpu_count() or 1)
  return (f'  this index, depth {depth}{" (its own)" if depth == index.nprobe else ""}: '
          f'recall@10 {_recall([[n.uri for n in r] for r in plain], truth):.3f} without re-rank '
          f'({"exact" if index.exact_scores(K, 0) else "approximate"} scores), '
          f'{_recall([[n.uri for n in r] for r in reranked], truth):.3f} with re-rank of '
          f'{RERANK}; FAISS search {_percentiles(latencies)}; the whole search with re-rank '
          f'(URIs, metadata) {_percentiles(whole)}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', required=True)
  parser.add_argument('--version', type=int, help='the version to build the index over')
  parser.add_argument('--index', required=True)
  parser.add_argument('--memory_budget', default='4GB')
  parser.add_argument('--add', action='store_true',
                      help='bring a copy of the index up to the collection\'s latest version')
  parser.add_argument('--queries', type=int, default=100)
  parser.add_argument('--nprobe', type=int, help="lists searched (default: the index's)")
  parser.add_argument('--no_plain', action='store_true', help='skip plain FAISS')
  parser.add_argument('--plain_refine', choices=('flat', 'fp16', 'none'), default='flat',
                      help="plain FAISS's re-rank vectors: float32, float16, none")
  args = parser.parse_args(argv)
  print(f'load average at start {os.getloadavg()[0]:.1f}')
  if not os.path.exists(os.path.join(args.index, 'index.json')):
    _build(args)
  from embeddings.neighbour_index import NeighbourIndex
  started = time.perf_counter()
  index = NeighbourIndex(args.index)
  opened = time.perf_counter() - started
  index.nprobe = args.nprobe or index.nprobe
  print(f'{index.count} vectors, plan {index.description["plan"]}; {_sizes(index, args.index)}; '
        f'opened in {opened * 1e3:.0f} ms')
  for point in index.description.get('nprobe_curve') or ():
    print(f'  at build, nprobe {point["nprobe"]}: probes\' recall@10 {point["recall_at_10"]:.3f} '
          f'without re-rank, {point["reranked_recall_at_10"]:.3f} with; {point["ms"]:.2f} ms a '
          f'probe')
  _, own, queries = _queries(index, args.queries)
  exclude = [[o] for o in own]
  truth, seconds = _exact(index.collection, queries, own)
  print(f'exact streamed search of {len(queries)} queries: {seconds:.1f} s')
  depths = _depths(index, index.nprobe)
  print(f'{len(queries)} queries, 1 thread, k={K}, their own URI left out of truth and results:')
  for depth in depths:
    print(_index_at(index, depth, queries, exclude, truth), flush=True)
  if not args.no_plain:
    _plain_faiss(index.collection, index, queries, own, truth, args.plain_refine, depths)
  if args.add:
    copy = args.index.rstrip('/') + '-added'
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.index, copy)
    started = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'commands', 'index', 'add', '--index', copy],
                   check=True)
    print(f'add: {time.perf_counter() - started:.1f} s')
  print(f'load average at end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
