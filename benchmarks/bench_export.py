"""What `pnasnet-embeddings export` costs: rows/s and peak memory of a full export of a synthetic
collection to pgvector (a real PostgreSQL with pgvector, pgserver, on 127.0.0.1) and to Milvus
Lite (in the exporting process), then a nightly re-export after a second night embedded 5% new
rows: rows written and time, against the full export.

    python -m benchmarks.bench_export [--count 100000] [--new_fraction 0.05] [--work DIR]
        [--targets pgvector milvus-lite]
    python -m benchmarks.bench_export --plan_only RUNS_GLOB

Each export runs as its own process (`pnasnet-embeddings export`, DirectRunner, one worker),
so its peak RSS is its own (Milvus Lite runs inside it; PostgreSQL's server does not count).

`--plan_only`: the launcher's own peak RSS while it plans a first export of RUNS_GLOB (into an
empty Vertex folder, nothing written), with the job on Beam's local job service and an external
worker pool, processes of their own as Dataflow's service and workers are: what grows with the
collection in the launcher, and nothing else.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.synthetic_collection import write_synthetic_run
from tests.export_servers import postgres_with_pgvector


def _export(runs: str, to: str) -> dict:
  """One export as a child process: wall seconds, its own peak RSS, its summary line."""
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    child = subprocess.Popen([sys.executable, '-m', 'commands', 'export', '--runs', runs,
                              '--to', to], stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    if child.returncode:
      raise SystemExit(f'export failed ({child.returncode}): {err.read()[-2000:]}')
    return {'seconds': seconds, 'peak_rss_gb': usage.ru_maxrss / 1e6,  # ru_maxrss: KB
            'line': out.read().strip().splitlines()[-1]}


def _plan_here(runs_glob: str, beam_flags) -> None:
  """The plan alone, in this process (the launcher), its counts printed."""
  from apache_beam.options.pipeline_options import PipelineOptions
  from jobs import export
  from storage.run_dirs import find_runs
  runs = find_runs(runs_glob)
  with tempfile.TemporaryDirectory() as folder:
    target = export.open_target(f'vertex:{folder}/vertex')
    print(export.plan(runs, target, folder, PipelineOptions(beam_flags)))


def _plan_only(runs_glob: str) -> None:
  from tests.export_servers import free_port
  job_port, pool_port = free_port(), free_port()
  services = [subprocess.Popen([sys.executable, '-m', module, flag, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for module, flag, port in (
                  ('apache_beam.runners.portability.local_job_service_main', '--port', job_port),
                  ('apache_beam.runners.worker.worker_pool_main', '--service_port', pool_port))]
  try:
    time.sleep(10)  # both listening
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, '-m', 'benchmarks.bench_export', '--plan_here',
                              runs_glob, '--runner', 'PortableRunner', '--job_endpoint',
                              f'localhost:{job_port}', '--environment_type', 'EXTERNAL',
                              '--environment_config', f'localhost:{pool_port}',
                              '--job_server_timeout', '36000'],
                             stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
      raise SystemExit('the plan failed')
    print(f'plan of {runs_glob}: {time.perf_counter() - start:.1f} s, the launcher\'s peak RSS '
          f'{usage.ru_maxrss / 1e3:.0f} MB\n  {child.stdout.read().strip()}')
  finally:
    for service in services:
      service.terminate()
      service.wait()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--count', type=int, default=100_000)
  parser.add_argument('--new_fraction', type=float, default=0.05)
  parser.add_argument('--work', help='folder for the runs and Milvus Lite (default: a temp dir)')
  parser.add_argument('--targets', nargs='+', choices=('pgvector', 'milvus-lite'),
                      default=['pgvector', 'milvus-lite'])
  parser.add_argument('--plan_only', metavar='RUNS_GLOB',
                      help='measure the launcher of a plan of these runs alone (see above)')
  parser.add_argument('--plan_here', help=argparse.SUPPRESS)
  args, beam_flags = parser.parse_known_args(argv)
  if args.plan_here:
    return _plan_here(args.plan_here, beam_flags)
  if args.plan_only:
    return _plan_only(args.plan_only)
  work = args.work or tempfile.mkdtemp(prefix='bench-export-')
  night1, night2 = os.path.join(work, 'runs', 'night1'), os.path.join(work, 'runs', 'night2')
  start = time.perf_counter()
  write_synthetic_run(night1, args.count, finished_at='2026-12-01T02:00:00.000+00:00')
  new = int(args.count * args.new_fraction)
  print(f'collection: {args.count} synthetic 4320-d vectors in {time.perf_counter() - start:.0f} s'
        f' ({work})', flush=True)
  runs = os.path.join(work, 'runs', 'night*')
  with postgres_with_pgvector() as url:
    targets = {'pgvector': f'{url}?table=photos',
               'milvus-lite': f'milvus-lite:{os.path.join(work, "photos.db")}?collection=photos'}
    targets = {name: targets[name] for name in args.targets}
    for name, to in targets.items():
      full = _export(night1, to)
      print(f'{name} full export: {args.count} rows in {full["seconds"]:.1f} s = '
            f'{args.count / full["seconds"]:.0f} rows/s, peak RSS {full["peak_rss_gb"]:.2f} GB'
            f'\n  {full["line"]}', flush=True)
    write_synthetic_run(night2, new, first_row=args.count,
                        finished_at='2026-12-02T02:00:00.000+00:00')
    for name, to in targets.items():
      again = _export(runs, to)
      print(f'{name} re-export after a night of {new} new rows: {again["seconds"]:.1f} s, peak '
            f'RSS {again["peak_rss_gb"]:.2f} GB\n  {again["line"]}', flush=True)
      nothing = _export(runs, to)
      print(f'{name} rerun with nothing new: {nothing["seconds"]:.1f} s\n  {nothing["line"]}',
            flush=True)


if __name__ == '__main__':
  main()
