"""Checks everything it can before any work, claims the output, submits the pipeline, and (unless
told not to wait) reads back the run_summary.json that the job itself writes."""

import argparse
import datetime
import json
import logging
import os
import signal
import sys
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions,
                                                  PipelineOptions, SetupOptions, StandardOptions,
                                                  TestOptions, WorkerOptions)
from apache_beam.runners.runner import PipelineState

from models.description import ModelDescription, describe_model
from models.handles import ModelLoadError
from embeddings.runs import find_runs
from pipeline.build import build_pipeline
from pipeline.options import (EmbeddingOptions, OptionsError, all_flags_parser,
                              check_known_flags, expand_output, validate)
from pipeline.output_dir import (OutputExistsError, OutputNotWritableError, check_output_is_new,
                                 claim_output, stale_temp_files)
from run_format import (CLAIM_FILE, FAILURES_PREFIX, FAILURES_SUFFIX, SUMMARY_FILE, TEMP_FOLDERS,
                        IncompatibleRunError, RunLaunch, RunSummary, shard_glob, utc_now)
from transforms import quiet_logs
from transforms.provenance import Provenance, project_version, recipe
from transforms.read import (NoInputError, check_inputs_match, check_manifests_exist,
                             normalize_input)

PROJECT_SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'setup.py')
RESOURCE_HINT_NAMES = {'beam:resources:accelerator:v1': 'accelerator',
                       'beam:resources:min_ram_bytes:v1': 'min_ram_bytes'}
# Beam's chatter that reads like a problem on every run (see docs/running.md, "Log messages").
QUIET_LOGGERS = ('apache_beam.io.iobase',)


class PipelineFailedError(RuntimeError):
  """The job ended without finishing; its output holds no run_summary.json."""


class InterruptedRun(RuntimeError):
  """Ctrl-C or SIGTERM: says in one line what was left where."""


class NothingEmbeddedError(RuntimeError):
  """Files were matched but none was embedded: almost always a wrong model or input."""


def _prepare_remote_workers(options: PipelineOptions) -> None:
  """Remote workers need this project's packages: ship setup.py unless told otherwise."""
  runner = (options.view_as(StandardOptions).runner or '').lower()
  setup = options.view_as(SetupOptions)
  if 'dataflow' in runner and not (setup.setup_file or setup.requirements_file or
                                   options.view_as(WorkerOptions).sdk_container_image):
    setup.setup_file = PROJECT_SETUP_FILE
    logging.info('--setup_file %s: workers install the project from it', PROJECT_SETUP_FILE)


def finished_run_indexes(run_globs: List[str], output: str) -> List[str]:
  """Index globs of the finished runs among `run_globs` but `output` itself; none is fine (the
  first of nightly runs)."""
  runs = find_runs(run_globs, missing_ok=True) if run_globs else []
  indexes = sorted(run.index_glob for run in runs if run.path != output.rstrip('/'))
  logging.info('--incremental_from: %d finished runs', len(indexes))
  return indexes


def launch_record(embedding: EmbeddingOptions, options: PipelineOptions,
                  model_description: ModelDescription, provenance: Provenance, started_at: str, runs: List[str]) -> RunLaunch:
  """What the claim and run_summary.json say of the run beside the counts."""
  return RunLaunch(
      model=provenance.model, model_handle=embedding.model, checkpoint=embedding.checkpoint,
      seed=embedding.seed if not embedding.checkpoint else None,
      weights=provenance.weights, compute_dtype=embedding.compute_dtype,
      center_crop_fraction=embedding.center_crop_fraction,
      jpeg_draft=embedding.jpeg_draft, jit_compile=embedding.jit_compile,
      recipe=provenance.recipe, pipeline_version=provenance.version,
      embedding_size=model_description.feature_size,
      image_size=[model_description.height, model_description.width],
      input=list(embedding.input or []), input_manifest=list(embedding.input_manifest or []),
      incremental_from=runs, output=embedding.output, output_format=embedding.output_format,
      runner=options.view_as(StandardOptions).runner or 'DirectRunner', started_at=started_at)


def describe_job(result, options: PipelineOptions) -> Dict:
  """What a Dataflow dry run would have submitted: the options that matter and every step with
  the resource hints of its environment (where right fitting reads them)."""
  proto = result.job.proto_pipeline
  environments = proto.components.environments
  steps = []
  for transform in proto.components.transforms.values():
    if transform.subtransforms or not transform.environment_id:
      continue
    hints = environments[transform.environment_id].resource_hints
    steps.append({'name': transform.unique_name, 'resource_hints': {
        RESOURCE_HINT_NAMES.get(urn, urn): value.decode() for urn, value in hints.items()}})
  cloud = options.view_as(GoogleCloudOptions)
  worker = options.view_as(WorkerOptions)
  setup = options.view_as(SetupOptions)
  return {
      'runner': options.view_as(StandardOptions).runner,
      'options': {
          'project': cloud.project, 'region': cloud.region, 'job_name': cloud.job_name,
          'temp_location': cloud.temp_location, 'num_workers': worker.num_workers,
          'max_num_workers': worker.max_num_workers, 'machine_type': worker.machine_type,
          'sdk_container_image': worker.sdk_container_image, 'setup_file': setup.setup_file,
          'requirements_file': setup.requirements_file,
          'dataflow_service_options': cloud.dataflow_service_options,
      },
      'steps': sorted(steps, key=lambda step: step['name']),
  }


def _print_dry_run(description: Dict, job_file: Optional[str]) -> None:
  print(f'dry run: nothing submitted. Options:\n{json.dumps(description["options"], indent=2)}')
  hinted = [s for s in description['steps'] if s['resource_hints']]
  print(f'{len(description["steps"])} steps; with resource hints:')
  for step in hinted:
    print(f'  {step["name"]}: {step["resource_hints"]}')
  if job_file:
    with FileSystems.create(job_file, mime_type='application/json') as f:
      f.write(json.dumps(description, indent=2).encode())
    print(f'job description written to {job_file}')


def read_summary(output: str) -> RunSummary:
  path = FileSystems.join(output, SUMMARY_FILE)
  with FileSystems.open(path) as f:
    return RunSummary.from_json(f.read(), path)


def _check_something_embedded(summary: RunSummary) -> None:
  attempted = summary.matched - summary.skipped
  if attempted > 0 and summary.embedded == 0:
    examples = '; '.join(f'{f["uri"]}: {f["stage"]} {f["error"]}: {f["message"][:200]}'
                         for f in summary.example_failures[:3])
    raise NothingEmbeddedError(f'{attempted} files were tried and none was embedded (failed by '
                               f'stage: {summary.failed_by_stage}). For example: {examples}. '
                               f'All reasons are in {summary.output}/'
                               f'{shard_glob(FAILURES_PREFIX, FAILURES_SUFFIX)}')


def run(argv: Optional[List[str]] = None) -> Dict:
  """Returns the run summary, the job's id when not waiting, or the dry run's description."""
  argv = list(sys.argv[1:] if argv is None else argv)
  check_known_flags(argv)
  options = PipelineOptions(argv)
  embedding = options.view_as(EmbeddingOptions)
  validate(embedding, options)
  started_at = utc_now()
  embedding.output = expand_output(embedding.output,
                                   datetime.datetime.fromisoformat(started_at)).rstrip('/')
  if '://' not in embedding.output:
    embedding.output = normalize_input(embedding.output)
  FileSystems.set_options(options)  # the checks below read storage with the run's credentials
  embedding.input = [normalize_input(p) for p in embedding.input or []]
  embedding.input_manifest = [normalize_input(p) for p in embedding.input_manifest or []]
  model_description = describe_model(embedding.model, embedding.checkpoint, embedding.seed,
                                     embedding.compute_dtype)
  provenance = Provenance(
      model_description.model_id, model_description.weights,
      recipe(embedding.compute_dtype, embedding.center_crop_fraction, embedding.jpeg_draft,
             embedding.jit_compile),
      project_version())
  check_inputs_match(embedding.input)
  check_manifests_exist(embedding.input_manifest)
  indexes = finished_run_indexes(embedding.incremental_from or [], embedding.output)
  launch = launch_record(embedding, options, model_description, provenance, started_at, indexes)
  dry_run = options.view_as(TestOptions).dry_run
  if dry_run:
    check_output_is_new(embedding.output)
  else:
    claim_output(embedding.output, launch.to_dict(), options, embedding.clean_unfinished)
  _prepare_remote_workers(options)
  logging.info('embedding %s with %s (%dx%d -> %d) into %s', embedding.input or
               embedding.input_manifest, model_description.model_id, model_description.height,
               model_description.width, model_description.feature_size, embedding.output)

  try:
    return _run_pipeline(options, embedding, model_description, provenance, launch, indexes)
  except KeyboardInterrupt as exc:
    raise InterruptedRun(_interrupted(embedding.output)) from exc
  except RuntimeError as exc:
    if str(exc).startswith('KeyboardInterrupt'):  # how Beam's runners pass Ctrl-C on
      raise InterruptedRun(_interrupted(embedding.output)) from exc
    raise


def _run_pipeline(options, embedding, model_description, provenance, launch, indexes) -> Dict:
  dry_run = options.view_as(TestOptions).dry_run
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, embedding, model_description, provenance, launch, indexes)
  result = pipeline.run()
  if dry_run and hasattr(result, 'job'):
    description = describe_job(result, options)
    _print_dry_run(description, options.view_as(DebugOptions).dataflow_job_file)
    return description
  if embedding.no_wait:
    job_id = result.job_id() if hasattr(result, 'job_id') else None
    return {'submitted': True, 'job_id': job_id, 'output': embedding.output,
            'summary': FileSystems.join(embedding.output, SUMMARY_FILE)}
  state = result.wait_until_finish()
  if state != PipelineState.DONE:
    raise PipelineFailedError(f'the job ended in state {state}; {embedding.output} holds no '
                              f'{SUMMARY_FILE} and counts as unfinished')
  summary = read_summary(embedding.output)
  _check_something_embedded(summary)
  return summary.to_dict()


def print_help(show_beam_options: bool) -> None:
  """This project's flags; Beam's many options only with --help_beam."""
  if show_beam_options:
    parser = all_flags_parser()
  else:
    parser = argparse.ArgumentParser(prog='run_pipeline.py', add_help=False, description=(
        'Embeds images with PNASNet-5. Beam\'s own options (--runner, --project, --region, '
        '--temp_location, ...) pass through: python run_pipeline.py --help_beam lists them.'))
    EmbeddingOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  parser.print_help()


def _interrupted(output: str) -> str:
  temp = stale_temp_files(output)
  left = CLAIM_FILE + (f' and {len(temp)} partial files in {TEMP_FOLDERS}' if temp else '')
  return (f'interrupted: {output} holds an unfinished run ({left}, no {SUMMARY_FILE}); rerun '
          'with a new --output, or the same one with --clean_unfinished')


def _terminate(signum, frame):
  raise KeyboardInterrupt()


def main(argv: Optional[List[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv or '--help_beam' in argv:
    print_help('--help_beam' in argv)
    return
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  quiet_logs.install()
  signal.signal(signal.SIGTERM, _terminate)
  try:
    summary = run(argv)
  except (OptionsError, NoInputError, ModelLoadError, OutputExistsError,
          OutputNotWritableError, IncompatibleRunError) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  except (PipelineFailedError, NothingEmbeddedError) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(1)
  except InterruptedRun as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:
    print('error: interrupted before any work started', file=sys.stderr)
    sys.exit(130)
  print(json.dumps(summary, indent=2))
