"""Duplicates by clustering against exact all pairs: pairs found, run time, peak memory.

    python -m benchmarks.bench_duplicates --collection URI [--threshold 0.97] [--all_pairs] \
        [--max_visits 3] [--planted RUN_DIR/planted_pairs.json]

URI is a collection, e.g. `pnasnet-embeddings collection import` of a run of `python -m
benchmarks.synthetic_collection --output DIR --count 100000 --near_duplicates 2000
--exact_duplicates 500` (whose planted_pairs.json --planted names). Prints the clustering's wall time,
its plan (clusters, ranges), visits per vector and the process's peak RSS; with --all_pairs also
the all-pairs time and the share of the pairs all pairs finds (cosine >= threshold, or same bytes)
whose two images the clustering put in one group, and of the planted pairs (planted_pairs.json).
All pairs holds the vectors twice (float32 and unit rows): 3.5 GB at 100k 4320-d vectors.

It also prints what `duplicates --method auto` estimates for both (embeddings/duplicates.py
ALL_PAIRS_SECONDS, CLUSTERS_SECONDS, fitted to this script's times at several sizes) and which
it would take, to check the estimates against the times measured here.
"""

import argparse
import json
import resource
import time

import embeddings
from commands.common import parse_size
from embeddings import duplicate_groups, duplicates
from embeddings.runs import open_snapshot
from embeddings.similarity import unit_rows
from jobs import cluster_dedup


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--collection', required=True)
  parser.add_argument('--planted', help='the planted_pairs.json of the synthetic run')
  parser.add_argument('--threshold', type=float, default=0.97)
  parser.add_argument('--all_pairs', action='store_true', help='also run all pairs and compare')
  parser.add_argument('--max_visits', type=int, default=cluster_dedup.MAX_VISITS)
  args = parser.parse_args(argv)
  snapshot = open_snapshot(args.collection)
  rows, dimension = snapshot.num_rows, snapshot.feature_size
  run_plan = cluster_dedup.plan(rows, dimension, args.threshold, max_visits=args.max_visits)
  print(f'{rows} vectors, {dimension}-d, threshold {args.threshold}: '
        f'{run_plan.clusters} clusters trained on {run_plan.sample_rows} rows, '
        f'{run_plan.ranges} ranges, at most {run_plan.max_visits} visits a vector')
  print(f'estimated (duplicates --method auto): all pairs '
        f'{duplicates.estimated_seconds("all_pairs", rows, dimension):.1f} s, clusters '
        f'{duplicates.estimated_seconds("clusters", rows, dimension):.1f} s; auto takes '
        f'{duplicates.choose_method("auto", rows, dimension, parse_size("4GB"))} '
        f'(all pairs faster below {duplicates.all_pairs_faster_below(dimension)} images)')
  start = time.perf_counter()
  groups, stats = cluster_dedup.find_groups(snapshot, args.threshold, max_visits=args.max_visits)
  seconds = time.perf_counter() - start
  print(f'clusters: {seconds:.1f} s, {len(groups)} groups, '
        f'{sum(len(g.members) - 1 for g in groups)} images to drop, '
        f'{stats.visits / max(stats.rows, 1):.2f} visits a vector, {stats.capped} vectors with '
        f'more cells within reach than they visit; peak RSS {_peak_rss_gb():.2f} GB')
  if not args.all_pairs:
    return
  start = time.perf_counter()
  collection = embeddings.load(snapshot.uri, snapshot.version)
  units = unit_rows(collection.vectors)
  collection = collection._replace(vectors=None)  # keep the unit rows only
  pairs = set(duplicate_groups.similar_pairs(units, args.threshold))
  pairs.update(duplicate_groups.byte_copy_pairs(collection.metadata.column('sha256').to_pylist()))
  seconds = time.perf_counter() - start
  group_of = {m.uri: number for number, g in enumerate(groups) for m in g.members}
  uris = collection.uris
  found = sum(1 for i, j in pairs if group_of.get(uris[i], -1) == group_of.get(uris[j], -2))
  print(f'all pairs: {seconds:.1f} s, {len(pairs)} pairs; found by clustering: {found} '
        f'({found / max(len(pairs), 1):.4f}); peak RSS {_peak_rss_gb():.2f} GB')
  if args.planted:
    planted = json.load(open(args.planted))
    hit = sum(1 for p in planted
              if group_of.get(p['original'], -1) == group_of.get(p['duplicate'], -2))
    print(f'planted pairs found by clustering: {hit} of {len(planted)}')


if __name__ == '__main__':
  main()
