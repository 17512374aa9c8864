"""Latency of the browse page's queries (embeddings/browse.py), through its real server on loopback.

Writes a synthetic run (benchmarks/synthetic_collection.py, labelled with the untrained large
network's model id so that new images can be embedded) and imports it as a collection, starts the page's server in this
process on a free port, then times, from the client's side (requests): start-up (collection
opened, model loaded), queries by URI (stored vector read plus exact search), queries by image (an upload
of a sample photo the collection does not hold: one embedding plus exact search), and the same
two through the FAISS index (`--index`, built first with the plan `choose_plan` gives at this
count, named in its figures); then the same work without the page (search alone, embedding
alone). Prints p50 and p90 of each, and the peak RSS after start-up (model and snapshot), after
the exact queries and at the end (the index built in this process).

    python -m benchmarks.bench_browse [--count 10000] [--uri_queries 20] [--image_queries 6] \
        [--index] [--scratch /tmp]
"""

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import requests

from benchmarks.synthetic_collection import uri_of, write_synthetic_run
from embeddings import browse
from embeddings.runs import embedding_run, open_snapshot
from jobs.collection_import import run_import

SAMPLE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'sample_images')
MODEL_ID = 'builtin:pnasnet_large@untrained-seed0'  # what the summary's options load


def _timed(call) -> float:
  start = time.perf_counter()
  answer = call()
  if hasattr(answer, 'raise_for_status'):
    answer.raise_for_status()
  return time.perf_counter() - start


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _rss_mb() -> float:
  """This process's resident memory now (Linux)."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6


def _figures(name: str, seconds) -> str:
  seconds = np.asarray(seconds) * 1000
  return (f'{name}: p50 {np.percentile(seconds, 50):.0f} ms, p90 {np.percentile(seconds, 90):.0f}'
          f' ms over {len(seconds)} queries')


def _sample_photos():
  return [os.path.join(SAMPLE_IMAGES, n) for n in sorted(os.listdir(SAMPLE_IMAGES))
          if not n.endswith('.md')]


def measure(browser, label: str, uris, photos) -> None:
  """The page's p50 and p90, and the same query's work without the page (stored vector and
  search; embedding alone) right after each, under the same load, to show what the page adds."""
  server = browse.BackgroundServer(browser)
  url = server.url
  images = []
  for path in photos:
    with open(path, 'rb') as f:
      images.append((os.path.basename(path), f.read()))
  page_uri, alone_uri, page_image, alone_embed = [], [], [], []
  try:
    requests.get(f'{url}/search', params={'uri': uris[0]}, timeout=600)  # warm the page cache
    for uri in uris:
      page_uri.append(_timed(lambda: requests.get(f'{url}/search', params={'uri': uri},
                                                  timeout=600)))
      alone_uri.append(_timed(lambda: browser.search_uri(uri)))
    for image in images:
      page_image.append(_timed(lambda: requests.post(f'{url}/search', files={'image': image},
                                                     timeout=600)))
      alone_embed.append(_timed(lambda: browser.embedder.embed(image[1])))
  finally:
    server.stop()
  print(_figures(f'{label}: query by URI, page', page_uri))
  print(_figures(f'{label}: query by URI, Browser.search_uri alone', alone_uri))
  print(_figures(f'{label}: query by image (a photo not in the collection), page', page_image))
  print(_figures(f'{label}: one embedding alone (ImageEmbedder.embed)', alone_embed))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--count', type=int, default=10_000)
  parser.add_argument('--uri_queries', type=int, default=20)
  parser.add_argument('--image_queries', type=int, default=6)
  parser.add_argument('--index', action='store_true', help='also through a FAISS index')
  parser.add_argument('--scratch', default=tempfile.gettempdir())
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench_browse_', dir=args.scratch)
  try:
    start = time.perf_counter()
    run = write_synthetic_run(os.path.join(scratch, 'run'), args.count, model_id=MODEL_ID)
    print(f'{args.count} synthetic vectors written in {time.perf_counter() - start:.1f} s')
    uri = os.path.join(scratch, 'collection')
    run_import(uri, [run.directory])
    snapshot = open_snapshot(uri)
    start = time.perf_counter()
    embedder = browse.ImageEmbedder(embedding_run(snapshot))
    print(f'start-up: model {MODEL_ID} loaded in {time.perf_counter() - start:.1f} s')
    start, before = time.perf_counter(), _rss_mb()
    browser = browse.Browser(snapshot, None, (), embedder)
    print(f'start-up: collection of {len(browser.catalogue)} images opened in '
          f'{time.perf_counter() - start:.2f} s, RSS +{_rss_mb() - before:.0f} MB; peak RSS so '
          f'far {_peak_rss_gb():.2f} GB')
    rng = np.random.default_rng(0)
    uris = [uri_of(int(r)) for r in rng.choice(args.count, args.uri_queries, replace=False)]
    photos = (_sample_photos() * args.image_queries)[:args.image_queries]
    measure(browser, 'exact', uris, photos)
    print(f'peak RSS after the exact queries {_peak_rss_gb():.2f} GB')
    if args.index:
      from commands import index as index_command
      from embeddings.neighbour_index import NeighbourIndex
      directory = os.path.join(scratch, 'index')
      start = time.perf_counter()
      index_command.main(['build', '--collection', uri, '--output', directory])
      print(f'index built in {time.perf_counter() - start:.1f} s')
      index = NeighbourIndex(directory)
      label = (f'index ({index.kind}, {index.plan["factory"]}, '
               f'{"efSearch" if index.kind == "hnsw" else "nprobe"} {index.nprobe})')
      measure(browse.Browser(snapshot, index, (), embedder), label, uris, photos)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f'peak RSS {_peak_rss_gb():.2f} GB')


if __name__ == '__main__':
  main()
