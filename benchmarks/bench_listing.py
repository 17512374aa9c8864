"""Listing a synthetic bucket: peak memory, list requests, wall time on 1 vs N workers.

The bucket is tests/synthetic_bucket.py's loopback server (GCS JSON API or S3 ListObjectsV2):
OBJECTS generated names under PREFIXES first-level prefixes, pages of 1,000, nothing stored.

  python benchmarks/bench_listing.py memory --objects 100000 1000000
      peak RSS of a process that lists `gs://synthetic/**.jpg` with transforms/listing.py
      (every page, counting the files), and the list requests it made; with --beam_match also
      of Beam's FileSystems.match on the same bucket, for comparison.
  python benchmarks/bench_listing.py workers --objects 1000000 --workers 1 4
      wall time of the MatchFiles stage alone (plan, reshuffle, list each prefix, one per URI)
      on the DirectRunner in multi_processing mode with --direct_num_workers N.

  python benchmarks/bench_listing.py flat --objects 1000000 --workers 1 4 --latency 0.03
      a flat prefix (one folder, no sub-folders) of OBJECTS names, each list page answered after
      LATENCY seconds, as a real bucket does: the MatchFiles stage on N workers, the pieces it
      cut the prefix into, its list requests, wall time and peak RSS. With --pool, the listing
      alone (no Beam): the pieces of each round listed by a pool of N processes, round after
      round, as the MatchFiles stages do; this shows the listing's own parallelism where Beam's
      local runner (every element through its shuffles) dominates.
  python benchmarks/bench_listing.py inventory --objects 1000000
      a Storage Insights CSV of OBJECTS rows (1% of them changed since the collection's rows of
      OBJECTS rows): MatchFiles, the join with the collection and the read of what changed, one
      worker; requests to the bucket before the first image is read, and wall time. With --plain, the
      same with a plain manifest of the URIs (each looked up: one request a row).

Prints one line of figures per run.
"""

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gcs_emulator import _ADC  # noqa: E402
from tests.synthetic_bucket import SyntheticBuckets, SyntheticNames  # noqa: E402

PREFIXES = 1000


def _environment(server, scheme: str) -> dict:
  folder = tempfile.mkdtemp(prefix='bench-listing-')
  adc = os.path.join(folder, 'adc.json')
  with open(adc, 'w') as f:
    json.dump(_ADC, f)
  return dict(os.environ, STORAGE_EMULATOR_HOST=server.url, GOOGLE_APPLICATION_CREDENTIALS=adc,
              GOOGLE_CLOUD_PROJECT='bench', PYTHONPATH=os.getcwd())


def _s3_options(server) -> list:
  return [f'--s3_endpoint_url={server.url}', '--s3_access_key_id=bench',
          '--s3_secret_access_key=bench', '--s3_region_name=us-east-1']


def child_list(scheme: str, how: str, options: list) -> None:
  """In a fresh process: list everything, keep nothing, print count and peak RSS."""
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options.pipeline_options import PipelineOptions
  FileSystems.set_options(PipelineOptions(options))
  started = time.time()
  if how == 'streamed':
    from transforms.read import match_input
    count = sum(1 for _ in match_input(f'{scheme}://synthetic/**.jpg'))
  else:
    count = len(FileSystems.match([f'{scheme}://synthetic/**.jpg'])[0].metadata_list)
  print(json.dumps({'files': count, 'seconds': round(time.time() - started, 1),
                    'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         / 1024)}))


def child_pipeline(scheme: str, workers: int, options: list, out: str,
                   pattern: str = '**.jpg') -> None:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from transforms.read import MatchFiles
  argv = ['--direct_running_mode=multi_processing', f'--direct_num_workers={workers}'] + options
  with beam.Pipeline(options=PipelineOptions(argv)) as pipeline:
    matched = pipeline | MatchFiles([f'{scheme}://synthetic/{pattern}'])
    _ = (matched['refs']
         | beam.combiners.Count.Globally()
         | beam.io.WriteToText(out))
  print(json.dumps(_peak_rss()))


def _piece_files(listing) -> tuple:
  from transforms.listing import list_piece
  files, pieces = 0, []
  for listed in list_piece(listing):
    files += len(listed.refs)
    pieces.extend(listed.pieces)
  return files, pieces


def child_pool(scheme: str, workers: int, options: list, pattern: str) -> None:
  """The listing alone, its pieces spread over a pool of processes round by round."""
  import multiprocessing
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options.pipeline_options import PipelineOptions
  from transforms.listing import plan_listing
  FileSystems.set_options(PipelineOptions(options))
  started, files, pieces = time.time(), 0, 0
  pending = [plan_listing(f'{scheme}://synthetic/{pattern}')]
  with multiprocessing.get_context('fork').Pool(workers) as pool:
    while pending:
      pieces += len(pending)
      results = pool.map(_piece_files, pending, chunksize=1)
      files += sum(count for count, _ in results)
      pending = [piece for _, cut in results for piece in cut]
  print(json.dumps(dict(_peak_rss(), files=files, pieces_listed=pieces,
                        listing_seconds=round(time.time() - started, 1))))


def _peak_rss() -> dict:
  """This process's peak RSS, and the largest of its finished children's (the SDK workers)."""
  return {'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          'worker_peak_rss_mb': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                                      / 1024)}


_RECIPE = 'bench-recipe'


def _write_inventory(objects: int, folder: str, plain: bool) -> tuple:
  """A Storage Insights CSV (or a plain manifest) of the synthetic bucket, and a collection
  holding every object, 1% of them with another crc32c (changed since)."""
  import datetime
  import pyarrow as pa
  import collection
  from collection.table import schema
  from tests.synthetic_bucket import SIZE, UPDATED, _crc32c
  names = SyntheticNames(objects, 1)
  manifest = os.path.join(folder, 'manifest.txt' if plain else 'inventory.csv')
  updated = UPDATED.isoformat().replace('+00:00', 'Z')
  with open(manifest, 'w') as f:
    if not plain:
      f.write('bucket,name,size,crc32c,updated\n')
    for index in range(objects):
      f.write(f'gs://synthetic/{names[index]}\n' if plain else
              f'synthetic,{names[index]},{SIZE},{_crc32c(index)},{updated}\n')
  uris = [f'gs://synthetic/{names[i]}' for i in range(objects)]
  content = [f'crc32c:{_crc32c(i)}' if i % 100 else 'crc32c:changed' for i in range(objects)]
  table_schema = schema('bench-model', 1, 'float32')
  columns = {'uri': uris, 'size_bytes': [SIZE] * objects,
             'last_modified': [UPDATED.astimezone(datetime.timezone.utc)] * objects,
             'content_id': content, 'model': ['bench-model'] * objects,
             'recipe': [_RECIPE] * objects,
             'embedding': pa.FixedSizeListArray.from_arrays(pa.array([0.0] * objects,
                                                                     pa.float32()), 1)}
  rows = pa.table({name: columns.get(name, pa.nulls(objects, table_schema.field(name).type))
                   for name in table_schema.names}, schema=table_schema)
  uri = os.path.join(folder, 'collection')
  created = collection.create(uri, 'bench-model', 1, 'float32')
  collection.commit_night(uri, collection.NightChanges(
      'bench', created.version, collection.write_fragment(uri, rows, {}), []))
  return manifest, uri


def child_inventory(manifest: str, collection_uri: str, out: str) -> None:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  import collection
  from transforms.failures import FAILURES_TAG
  from transforms.incremental import Coverage, NightState, SkipHeld
  from transforms.provenance import Provenance
  from transforms.read import SKIPPED_BY_NAME_TAG, MatchFiles, ReadImages
  provenance = Provenance('bench-model', 'bench-weights', _RECIPE, '0')
  found = collection.open_collection(collection_uri)
  night = NightState(collection_uri, found.version, found.fragment_ids(), {})
  with beam.Pipeline(options=PipelineOptions([])) as pipeline:
    matched = pipeline | MatchFiles([], [manifest], deduplicate=False)
    split = ({'refs': matched['refs'], 'failures': matched[FAILURES_TAG],
              'not_listed': matched[SKIPPED_BY_NAME_TAG]}
             | SkipHeld(night, provenance, Coverage([], [], False)))
    read = split.new | ReadImages()
    _ = ((read.images | 'Read' >> beam.combiners.Count.Globally()
          | 'ReadCount' >> beam.Map(lambda n: f'read {n}')),
         (split.skipped | 'Skipped' >> beam.combiners.Count.Globally()
          | 'SkippedCount' >> beam.Map(lambda n: f'skipped {n}'))) \
        | beam.Flatten() | beam.io.WriteToText(out)
  print(json.dumps(_peak_rss()))


def _run_child(server, scheme: str, args: list) -> str:
  options = _s3_options(server) if scheme == 's3' else []
  command = [sys.executable, os.path.abspath(__file__), 'child', scheme, json.dumps(options)]
  done = subprocess.run(command + args, env=_environment(server, scheme), capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(done.stderr[-3000:])
  return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ''


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('what', choices=['memory', 'workers', 'flat', 'inventory', 'child'])
  parser.add_argument('rest', nargs='*')
  parser.add_argument('--objects', type=int, nargs='+', default=[100_000])
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--scheme', choices=['gs', 's3'], default='gs')
  parser.add_argument('--beam_match', action='store_true')
  parser.add_argument('--latency', type=float, default=0.03)
  parser.add_argument('--plain', action='store_true')
  parser.add_argument('--pool', action='store_true')
  args = parser.parse_args()
  if args.what == 'child':
    scheme, options, kind = args.rest[0], json.loads(args.rest[1]), args.rest[2]
    if kind == 'list':
      child_list(scheme, args.rest[3], options)
    elif kind == 'inventory':
      child_inventory(*args.rest[3:6])
    elif kind == 'pool':
      child_pool(scheme, int(args.rest[3]), options, args.rest[4])
    else:
      child_pipeline(scheme, int(args.rest[3]), options, *args.rest[4:6])
    return
  if args.what == 'flat':
    return _flat(args)
  if args.what == 'inventory':
    return _inventory(args)
  for objects in args.objects:
    with SyntheticBuckets({'synthetic': SyntheticNames(objects, PREFIXES)}) as server:
      if args.what == 'memory':
        for how in ['streamed'] + (['beam_match'] if args.beam_match else []):
          server.listings.clear()
          figures = json.loads(_run_child(server, args.scheme, ['list', how]))
          figures.update(how=how, scheme=args.scheme, objects=objects,
                         list_requests=len(server.listings),
                         distinct_list_requests=len(set(server.listings)))
          print(json.dumps(figures), flush=True)
      else:
        for workers in args.workers:
          server.listings.clear()
          out = tempfile.mktemp(prefix='bench-listing-count-')
          started = time.time()
          _run_child(server, args.scheme, ['pipeline', str(workers), out])
          seconds = time.time() - started
          files = 0
          for shard in glob.glob(out + '*'):  # the count, in one of the shards
            with open(shard) as f:
              files += sum(int(line) for line in f if line.strip())
            os.remove(shard)
          print(json.dumps({'scheme': args.scheme, 'objects': objects, 'workers': workers,
                            'files': files, 'seconds': round(seconds, 1),
                            'list_requests': len(server.listings)}), flush=True)


def _count(out: str) -> dict:
  counted = {}
  for shard in glob.glob(out + '*'):
    with open(shard) as f:
      for line in f:
        if line.strip():
          kind, _, number = line.strip().rpartition(' ')
          counted[kind or 'files'] = counted.get(kind or 'files', 0) + int(number)
    os.remove(shard)
  return counted


def _flat(args) -> None:
  for objects in args.objects:
    for workers in args.workers:
      with SyntheticBuckets({'synthetic': SyntheticNames(objects, 1)},
                            list_latency=args.latency) as server:
        out = tempfile.mktemp(prefix='bench-listing-count-')
        started = time.time()
        how = ['pool', str(workers), 'p0000/'] if args.pool else \
            ['pipeline', str(workers), out, 'p0000/']
        figures = json.loads(_run_child(server, args.scheme, how))
        seconds = time.time() - started
        pieces = {(prefix, start) for _, prefix, _, token, start in server.listings if not token}
        print(json.dumps(dict(figures, scheme=args.scheme, objects=objects, workers=workers,
                              how='pool' if args.pool else 'MatchFiles',
                              latency_s=args.latency, seconds=round(seconds, 1),
                              pieces=len(pieces), list_requests=len(server.listings),
                              **_count(out))), flush=True)


def _inventory(args) -> None:
  for objects in args.objects:
    folder = tempfile.mkdtemp(prefix='bench-inventory-')
    started = time.time()
    manifest, held = _write_inventory(objects, folder, args.plain)
    written = time.time() - started
    with SyntheticBuckets({'synthetic': SyntheticNames(objects, 1)}) as server:
      out = os.path.join(folder, 'counts')
      started = time.time()
      command = [sys.executable, os.path.abspath(__file__), 'child', 'gs', '[]', 'inventory',
                 manifest, held, out]
      done = subprocess.run(command, env=_environment(server, 'gs'), capture_output=True,
                            text=True, check=False)
      if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
      seconds = time.time() - started
      figures = json.loads(done.stdout.strip().splitlines()[-1])
      print(json.dumps(dict(figures, objects=objects, manifest='plain' if args.plain else
                            'inventory csv', seconds=round(seconds, 1),
                            files_written_s=round(written, 1),
                            metadata_requests=sum(server.metadata_requests.values()),
                            downloads=sum(server.downloads.values()),
                            list_requests=len(server.listings), **_count(out))), flush=True)


if __name__ == '__main__':
  main()
