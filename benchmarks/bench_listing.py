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


def child_pipeline(scheme: str, workers: int, options: list, out: str) -> None:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from transforms.read import MatchFiles
  argv = ['--direct_running_mode=multi_processing', f'--direct_num_workers={workers}'] + options
  with beam.Pipeline(options=PipelineOptions(argv)) as pipeline:
    matched = pipeline | MatchFiles([f'{scheme}://synthetic/**.jpg'])
    _ = (matched['refs']
         | beam.combiners.Count.Globally()
         | beam.io.WriteToText(out))


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
  parser.add_argument('what', choices=['memory', 'workers', 'child'])
  parser.add_argument('rest', nargs='*')
  parser.add_argument('--objects', type=int, nargs='+', default=[100_000])
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--scheme', choices=['gs', 's3'], default='gs')
  parser.add_argument('--beam_match', action='store_true')
  args = parser.parse_args()
  if args.what == 'child':
    scheme, options, kind = args.rest[0], json.loads(args.rest[1]), args.rest[2]
    if kind == 'list':
      child_list(scheme, args.rest[3], options)
    else:
      child_pipeline(scheme, int(args.rest[3]), options, args.rest[4])
    return
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


if __name__ == '__main__':
  main()
