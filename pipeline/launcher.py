"""Checks everything it can before any work, claims the output, submits the pipeline, and (unless
told not to wait) reads back the run_summary.json that the job itself writes.

`run(argv)` returns the summary, or raises a typed error for each way a launch ends without one;
the `embed` verb (commands/embed.py) turns those into one line and the exit code.
"""

import datetime
import errno
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions,
                                                  PipelineOptions, SetupOptions, StandardOptions,
                                                  TestOptions, WorkerOptions)
from apache_beam.runners.runner import PipelineState

import collection
import storage
from collection.table import check_model
from models.description import ModelDescription, describe_model
from pipeline.beam_flags import OptionsError, check_known_flags
from pipeline.dataflow_jobs import record_job
from pipeline.options import (EmbeddingOptions, expand_output, one_model_per_gpu, shard_inputs,
                              validate)
from pipeline.output_dir import (OutputExistsError, check_output_is_new,
                                 claim_output, stale_temp_files)
from pipeline.runners import default_runner, runner_name
from pipeline.versions import (LaunchOptions, current_versions, format_versions,
                               version_mismatch)
from run_format import (CLAIM_FILE, FAILED, FAILURES_PREFIX, FAILURES_SUFFIX,
                        FINISHED, SUMMARY_FILE, RunLaunch,
                        RunSummary, shard_glob, utc_now)
from transforms import heartbeat
from transforms.incremental import NightState
from transforms.provenance import Provenance, project_version, recipe
from transforms.read import (check_inputs_match, check_manifests_exist,
                             normalize_input)

PROJECT_SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'setup.py')
RESOURCE_HINT_NAMES = {'beam:resources:accelerator:v1': 'accelerator',
                       'beam:resources:min_ram_bytes:v1': 'min_ram_bytes'}
# How much of a failed job's error its one line keeps.
MAX_ERROR_CHARS = 300


class PipelineFailedError(RuntimeError):
  """The job ended without finishing; its output holds no run_summary.json."""


class InterruptedRun(RuntimeError):
  """Ctrl-C or SIGTERM: says in one line what was left where."""


class OutOfSpaceRun(RuntimeError):
  """The output's disk (or quota, or file size limit) is full: said in one line, as Ctrl-C."""


# What a write to a full disk, an exhausted quota or a file size limit raises.
OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
OUT_OF_SPACE_TEXTS = tuple(os.strerror(code) for code in OUT_OF_SPACE_ERRNOS)


def out_of_space(exc: BaseException) -> Optional[str]:
  """The OS's words when `exc` (or what it wraps: Beam passes a worker's error on as text in a
  RuntimeError) is a write to a full disk; None otherwise."""
  while exc is not None:
    if isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS:
      return os.strerror(exc.errno)
    found = next((text for text in OUT_OF_SPACE_TEXTS if text in str(exc)), None)
    if found:
      return found
    exc = exc.__cause__ or exc.__context__
  return None


class TooManyFailuresError(RuntimeError):
  """The run finished and wrote its summary, but more than --max_failed_fraction of its matched
  images failed: almost always a wrong model or input, or storage it cannot read."""

  def __init__(self, message: str, summary: Dict):
    super().__init__(message)
    self.summary = summary


class NoCredentialsError(ValueError):
  """gs:// paths and no Google credentials: fail at once instead of after minutes of retries."""


def _prepare_remote_workers(options: PipelineOptions) -> None:
  """Remote workers need this project's packages: ship setup.py unless told otherwise."""
  runner = (options.view_as(StandardOptions).runner or '').lower()
  setup = options.view_as(SetupOptions)
  if 'dataflow' in runner and not (setup.setup_file or setup.requirements_file or
                                   options.view_as(WorkerOptions).sdk_container_image):
    setup.setup_file = PROJECT_SETUP_FILE
    logging.info('--setup_file %s: workers install the project from it', PROJECT_SETUP_FILE)


def check_google_credentials(paths: List[Optional[str]], dataflow: bool = False) -> None:
  """Without credentials Beam's GCS client (and Dataflow's runner, even for a dry run) retries
  finding them, then goes on anonymously and retries every request: offline, minutes pass before
  anything fails. Look once, now."""
  gcs = [path for path in paths if path and path.startswith('gs://')]
  if not (gcs or dataflow) or os.environ.get('STORAGE_EMULATOR_HOST'):
    return
  import google.auth
  from google.auth.exceptions import DefaultCredentialsError
  try:
    google.auth.default()
  except DefaultCredentialsError as exc:
    raise NoCredentialsError(
        f'{"--runner DataflowRunner" if dataflow else gcs[0]}: no Google Cloud credentials '
        'found. Provide them with `gcloud auth '
        'application-default login` (your account), or GOOGLE_APPLICATION_CREDENTIALS=KEY.json '
        '(a service account key), or run where a service account is attached (Compute Engine, '
        'Cloud Composer, Cloud Run); public buckets need them too') from exc


def check_dataflow_paths(embedding: EmbeddingOptions, options: PipelineOptions) -> None:
  """Dataflow's workers cannot read the launcher's disk, and its runner takes a local
  --temp_location for a bucket's name (it warns, then looks for a default bucket with retries).
  A local --model or --checkpoint may be baked into the worker image (docs/dataflow.md)."""
  if not _is_dataflow(options):
    return
  cloud = options.view_as(GoogleCloudOptions)
  local = [f'--{flag} {path}' for flag, path in (('temp_location', cloud.temp_location),
                                                  ('staging_location', cloud.staging_location))
           if path and not path.startswith('gs://')]
  for flag in ('input', 'input_manifest', 'output', 'collection'):
    paths = getattr(embedding, flag) or []
    local += [f'--{flag} {path}' for path in ([paths] if isinstance(paths, str) else paths)
              if not storage.is_remote(path)]
  if local:
    raise OptionsError(
        f'--runner {runner_name(options)} runs on Google\'s workers, which cannot read this '
        f'machine\'s disk: {", ".join(local)} must be in a bucket (gs://BUCKET/...). '
        'Without --runner the run is local')


def open_night(embedding: EmbeddingOptions, model_description: ModelDescription,
               model_id: str, create: bool) -> Optional[NightState]:
  """--collection at launch: the collection (the first night creates it, unless `create` is off:
  a dry run writes nothing), refused when it holds another model's vectors; the version this
  night reads, and its fragments, one per worker to read. None without --collection."""
  if not embedding.collection:
    return None
  uri = embedding.collection.rstrip('/')
  if not storage.is_remote(uri):
    uri = normalize_input(uri)
  embedding.collection = uri
  try:
    try:
      found = collection.open_collection(uri)
    except collection.CollectionNotFoundError:
      if not create:
        return NightState(uri, 0, [], collection.storage_options(uri))
      found = collection.create(uri, model_id, model_description.feature_size,
                                embedding.embedding_dtype)
      logging.info('--collection %s: created (the first night)', uri)
    check_model(found, model_id, model_description.feature_size, embedding.embedding_dtype)
  except collection.CollectionError as exc:
    raise OptionsError(f'--collection {exc}') from exc
  except OSError as exc:  # a bucket that does not exist, no credentials, no network
    raise OptionsError(f'--collection {uri} cannot be opened: {exc}') from exc
  logging.info('--collection %s: version %d, %d rows', uri, found.version, found.num_rows)
  return NightState(uri, found.version, found.fragment_ids(), found.storage_options)


def launch_record(embedding: EmbeddingOptions, options: PipelineOptions,
                  model_description: ModelDescription, provenance: Provenance, started_at: str,
                  night: Optional[NightState]) -> RunLaunch:
  """What the claim and run_summary.json say of the run beside the counts."""
  return RunLaunch(
      model=provenance.model, model_handle=embedding.model, checkpoint=embedding.checkpoint,
      seed=embedding.seed if not embedding.checkpoint else None,
      weights=provenance.weights, compute_dtype=embedding.compute_dtype,
      center_crop_fraction=embedding.center_crop_fraction,
      jpeg_draft=embedding.jpeg_draft, jit_compile=embedding.jit_compile,
      embedding_dtype=embedding.embedding_dtype, recipe=provenance.recipe, pipeline_version=provenance.version,
      embedding_size=model_description.feature_size,
      image_size=[model_description.height, model_description.width],
      input=list(embedding.input or []), input_manifest=list(embedding.input_manifest or []),
      exclude=list(embedding.exclude or []),
      collection=night.uri if night else None,
      collection_read_version=night.read_version if night else None,
      output=embedding.output, output_format=embedding.output_format,
      max_failed_fraction=embedding.max_failed_fraction,
      runner=runner_name(options), started_at=started_at)


def describe_job(proto, options: PipelineOptions) -> Dict:
  """What a dry run would have run: the options that matter and every step with the resource
  hints of its environment (where Dataflow's right fitting reads them)."""
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
      'dry_run': True, 'runner': runner_name(options),
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
  """A screenful: the options, and the steps grouped by their resource hints; the whole
  description (every step) only into the job file."""
  print(f'dry run ({description["runner"]}): nothing submitted, nothing written. Options:\n'
        f'{json.dumps(description["options"], indent=2)}')
  by_hints: Dict[str, List[str]] = {}
  for step in description['steps']:
    if step['resource_hints']:
      by_hints.setdefault(json.dumps(step['resource_hints']), []).append(step['name'])
  print(f'{len(description["steps"])} steps; with resource hints:' if by_hints else
        f'{len(description["steps"])} steps, none with resource hints')
  for hints, names in by_hints.items():
    tops = sorted({name.split('/')[0] for name in names})
    print(f'  {len(names)} steps of {", ".join(tops)}: {hints}')
  if job_file:
    with FileSystems.create(job_file, mime_type='application/json') as f:
      f.write(json.dumps(description, indent=2).encode())
    print(f'whole description (every step) written to {job_file}')
  else:
    print('the whole description (every step): add --dataflow_job_file FILE.json')


def read_summary(output: str) -> RunSummary:
  path = FileSystems.join(output, SUMMARY_FILE)
  with FileSystems.open(path) as f:
    return RunSummary.from_json(f.read(), path)


def _plural(count: int, noun: str) -> str:
  return f'{count} {noun}{"s" * (count != 1)}'


def check_outcome(summary: RunSummary) -> Dict:
  """The summary, once its failures are said; PipelineFailedError if its commit was refused,
  TooManyFailuresError if too many images failed."""
  if summary.outcome == FAILED:
    raise PipelineFailedError(f'{summary.outcome_message}; {summary.output} holds this night\'s '
                              f'files, {SUMMARY_FILE} says outcome "{FAILED}"')
  if not summary.failed:
    return summary.to_dict()
  examples = '; '.join(f'{f["uri"]}: {f["stage"]} {f["error"]}: {f["message"][:200]}'
                       for f in summary.example_failures[:3])
  counted = f'{summary.failed} of {_plural(summary.matched, "matched image")} failed'
  detail = (f'(by stage: {summary.failed_by_stage}). For example: {examples}. All reasons are '
            f'in {summary.output}/{shard_glob(FAILURES_PREFIX, FAILURES_SUFFIX)}')
  if summary.outcome == FINISHED:
    logging.warning('%s %s', counted, detail)
    return summary.to_dict()
  raise TooManyFailuresError(
      counted + (', and none was embedded' if not summary.embedded else '') +
      f': more than --max_failed_fraction {summary.max_failed_fraction} allows {detail}; '
      f'{SUMMARY_FILE} says outcome "{summary.outcome}"', summary.to_dict())


def _finished_earlier(embedding: EmbeddingOptions, model_id: str) -> Optional[RunSummary]:
  """--skip_if_finished: the summary of a finished run of the same inputs and model at --output,
  so that a rerun of a loop over chunks passes the chunks done."""
  if not FileSystems.exists(FileSystems.join(embedding.output, SUMMARY_FILE)):
    return None
  summary = read_summary(embedding.output)
  this = (list(embedding.input or []), list(embedding.input_manifest or []), model_id)
  if (summary.input, summary.input_manifest, summary.model) != this:
    raise OutputExistsError(
        f'--output {embedding.output} holds a finished run of other inputs or another model '
        f'({summary.model}: {" ".join(summary.input + summary.input_manifest)}); '
        '--skip_if_finished passes over a finished run of the same command only')
  logging.warning('--skip_if_finished: %s already holds this run, finished %s: nothing to do',
                  embedding.output, summary.finished_at)
  return summary


def run(argv: Optional[List[str]] = None) -> Dict:
  """Returns the run summary, the job's id when not waiting, or the dry run's description."""
  argv = list(sys.argv[1:] if argv is None else argv)
  check_known_flags(argv)
  options = PipelineOptions(argv)
  embedding = options.view_as(EmbeddingOptions)
  validate(embedding, options)
  check_dataflow_paths(embedding, options)
  one_model_per_gpu(embedding, options)
  launch_versions = options.view_as(LaunchOptions)
  launch_versions.launch_versions = (launch_versions.launch_versions or
                                     format_versions(current_versions()))
  started_at = utc_now()
  embedding.output = expand_output(embedding.output,
                                   datetime.datetime.fromisoformat(started_at)).rstrip('/')
  if not storage.is_remote(embedding.output):
    embedding.output = normalize_input(embedding.output)
  FileSystems.set_options(options)  # the checks below read storage with the run's credentials
  collection.set_store_options(argv)  # and the collection, with the same S3 flags
  embedding.input = [normalize_input(p) for p in embedding.input or []]
  embedding.input_manifest = [normalize_input(p) for p in embedding.input_manifest or []]
  check_google_credentials(_storage_paths(embedding, options), _is_dataflow(options))
  model_description = describe_model(embedding.model, embedding.checkpoint, embedding.seed,
                                     embedding.compute_dtype)
  provenance = Provenance(
      model_description.model_id, model_description.weights,
      recipe(embedding.compute_dtype, embedding.center_crop_fraction, embedding.jpeg_draft,
             embedding.jit_compile, embedding.embedding_dtype),
      project_version())
  if embedding.skip_if_finished:
    finished = _finished_earlier(embedding, provenance.model)
    if finished:
      return check_outcome(finished)
  check_inputs_match(embedding.input, embedding.exclude or (), embedding.output,
                     embedding.include_all_files, shard_inputs(embedding).suffixes)
  check_manifests_exist(embedding.input_manifest)
  dry_run = options.view_as(TestOptions).dry_run
  night = open_night(embedding, model_description, provenance.model, create=not dry_run)
  launch = launch_record(embedding, options, model_description, provenance, started_at, night)
  if dry_run:
    check_output_is_new(embedding.output, options, embedding.clean_unfinished,
                        embedding.ended_job)
  else:
    deleted = claim_output(embedding.output, launch.to_dict(), options,
                           embedding.clean_unfinished, embedding.ended_job)
    if deleted:
      logging.warning('--clean_unfinished: deleted what the unfinished run in %s had written: '
                      '%s', embedding.output, ', '.join(deleted))
  _prepare_remote_workers(options)
  logging.info('embedding %s with %s (%dx%d -> %d) into %s', embedding.input or
               embedding.input_manifest, model_description.model_id, model_description.height,
               model_description.width, model_description.feature_size, embedding.output)

  try:
    return _run_pipeline(options, embedding, model_description, provenance, launch, night)
  except KeyboardInterrupt as exc:
    raise InterruptedRun(_interrupted(embedding.output)) from exc


def _storage_paths(embedding: EmbeddingOptions, options: PipelineOptions) -> List[Optional[str]]:
  cloud = options.view_as(GoogleCloudOptions)
  return ([embedding.output, embedding.model, embedding.checkpoint, cloud.temp_location,
           cloud.staging_location] + list(embedding.input or []) +
          list(embedding.input_manifest or []) + [embedding.collection])


def _is_dataflow(options: PipelineOptions) -> bool:
  return 'dataflow' in (options.view_as(StandardOptions).runner or '').lower()


def _run_pipeline(options, embedding, model_description, provenance, launch, night) -> Dict:
  from pipeline.build import build_pipeline  # TensorFlow: not for --help nor refused options
  dry_run = options.view_as(TestOptions).dry_run
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  build_pipeline(pipeline, embedding, model_description, provenance, launch, night)
  if dry_run:  # Dataflow's runner builds the job and stops; any other would run it: never call it
    proto = (pipeline.run().job.proto_pipeline if _is_dataflow(options) else
             pipeline.to_runner_api())
    description = describe_job(proto, options)
    _print_dry_run(description, options.view_as(DebugOptions).dataflow_job_file)
    return description
  try:
    result = pipeline.run()
    job_id = result.job_id() if hasattr(result, 'job_id') else None
    if _is_dataflow(options):
      record_job(embedding.output, job_id, options)
    if embedding.no_wait:
      return {'submitted': True, 'job_id': job_id, 'output': embedding.output,
              'summary': FileSystems.join(embedding.output, SUMMARY_FILE)}
    with heartbeat.beating(embedding.output):  # the workers beat too, as long as they work
      state = result.wait_until_finish()
  except Exception as exc:  # pylint: disable=broad-except; however a job fails, one line says it
    raise _job_failure(exc, embedding.output) from exc
  if state != PipelineState.DONE:
    raise PipelineFailedError(f'the job ended in state {state}: {_unfinished(embedding.output)}')
  return check_outcome(read_summary(embedding.output))


def _job_failure(exc: Exception, output: str) -> RuntimeError:
  """The typed error a job's failure ends in: one line of what went wrong, what it left where,
  and what to do."""
  if str(exc).startswith('KeyboardInterrupt'):  # how Beam's runners pass Ctrl-C on
    return InterruptedRun(_interrupted(output))
  mismatch = version_mismatch(exc)
  if mismatch:
    return PipelineFailedError(f'{mismatch}; {_unfinished(output)}')
  full = out_of_space(exc)
  if full:
    return OutOfSpaceRun(f'no room left to write ({full}): '
                         f'{_unfinished(output, "free some space, then ")}')
  return PipelineFailedError(f'the job failed: {one_line_error(exc)}; {_unfinished(output)}')


def one_line_error(exc: BaseException) -> str:
  """A job's error as one line: the last exception named in its text (Beam passes a worker's
  error on as the text of a RuntimeError, Dataflow with its traceback) and its message, without
  stack frames (indented lines, TensorFlow's "Detected at node ..." header), shortened, and the
  step it stopped in."""
  text = str(exc)
  step = re.search(r"\[while running '([^']+)'\]", text)
  text = re.sub(r"\s*\[while running '[^']+'\]", '', text)
  named = list(re.finditer(r'^[\w.]+(?:Error|Exception|Exit): ', text, re.M))
  text = text[named[-1].start():] if named else f'{type(exc).__name__}: {text}'
  kept = [line for line in text.splitlines() if line.strip() and not line[0].isspace() and
          not line.endswith('(most recent call last):') and line != '<stack traces unavailable>']
  text = re.sub(r'^(?:\w+\.)+', '', ' '.join(kept))  # the error's name, not its module's
  if len(text) > MAX_ERROR_CHARS:
    text = text[:MAX_ERROR_CHARS - 3] + '...'
  return text + (f' (in step {step[1]})' if step else '')


def _unfinished(output: str, first: str = '') -> str:
  """What was left where, and what to do (after `first`, e.g. "free some space, then ")."""
  temp = stale_temp_files(output)
  left = CLAIM_FILE + (f' and {temp}' if temp.folders else '')
  return (f'{output} holds an unfinished run ({left}, no {SUMMARY_FILE}); {first}rerun with a '
          'new --output, or the same one with --clean_unfinished')


def _interrupted(output: str) -> str:
  return f'interrupted: {_unfinished(output)}'
