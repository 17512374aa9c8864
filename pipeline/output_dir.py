"""The output directory: checked writable, and claimed atomically before any work starts.

A claim is a small object created only if it does not exist yet (`ifGenerationMatch=0` on GCS,
`If-None-Match: *` on S3, `O_EXCL` on a local disk), so of two runs started at once on the same
`--output` exactly one proceeds. A claim without `run_summary.json` beside it is an unfinished
(interrupted or failed) run: reported, and cleaned only with `--clean_unfinished`, which deletes
only what such a run writes: names of exactly the run's shard pattern (RUN_FILE_NAME) and Beam's
own temporary folders (TEMP_FOLDER_NAME). A user's `index-01.jpg` beside them stays. A run that
is still alive by the readers' rule (storage.run_dirs.Unfinished.alive: its local launcher runs,
or its job's heartbeat is recent) is never cleaned: it is still writing there; nor is one whose
heartbeat has stopped but whose Dataflow job, by Dataflow's word, has not ended, or whose state
Dataflow cannot tell (pipeline.dataflow_jobs).
"""

import json
import os
import socket
from typing import List, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, S3Options

import storage
from pipeline.dataflow_jobs import ENDED_STATES, DataflowJob, JobStateUnknown, job_state
from run_format import (CLAIM_FILE, CLAIM_STALE_SECONDS, RUN_FILES, SUMMARY_FILE,
                        TEMP_FOLDER_NAME, TEMP_FOLDERS, run_file_name)
from storage.run_dirs import Unfinished


class OutputExistsError(ValueError):
  """Writing over an earlier or concurrent run would mix its shards with this run's."""


class OutputNotWritableError(ValueError):
  """--output cannot be written: a missing bucket, a file in the way, no permission."""


class _AlreadyClaimed(Exception):
  pass


def _join(output: str, name: str) -> str:
  return FileSystems.join(output.rstrip('/'), name)


def _existing(output: str, names) -> List[str]:
  patterns = [_join(output, name) for name in names]
  return [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]


def _run_files(output: str, output_format: str = None) -> List[str]:
  """The files at the top of `output` named as a run names them (of `output_format`'s
  suffixes when known), among whatever else the directory holds."""
  names = run_file_name(output_format)
  return [path for path in _existing(output, RUN_FILES)
          if names.fullmatch(path.rstrip('/').rsplit('/', 1)[-1])]


class TempLeftovers(NamedTuple):
  """What an interrupted run's sinks left: Beam writes shards under beam-temp-<prefix>-<uuid>
  first (local folders, which FileSystems.delete removes whole; objects under the prefix
  elsewhere)."""
  folders: List[str]
  files: int  # partial files in them
  deletable: List[str]  # the local folders, or every object under the prefixes

  def __str__(self) -> str:
    return (f'{len(self.folders)} {TEMP_FOLDERS} folder{"s" * (len(self.folders) != 1)} '
            f'holding {self.files} partial file{"s" * (self.files != 1)}')


def stale_temp_files(output: str) -> TempLeftovers:
  if not storage.is_remote(output):
    local = storage.local_path(output)
    folders = sorted(entry.path for entry in os.scandir(local) if entry.is_dir() and
                     TEMP_FOLDER_NAME.fullmatch(entry.name)) if os.path.isdir(local) else []
    files = sum(len(names) for folder in folders for _, _, names in os.walk(folder))
    return TempLeftovers(folders, files, folders)
  try:
    objects = _existing(output, [TEMP_FOLDERS + '/**'])
  except Exception:  # pylint: disable=broad-except; an unreadable output has nothing to report
    return TempLeftovers([], 0, [])
  top = len(output.rstrip('/')) + 1
  objects = [path for path in objects if TEMP_FOLDER_NAME.fullmatch(path[top:].split('/')[0])]
  folders = sorted({path[:top] + path[top:].split('/')[0] for path in objects})
  return TempLeftovers(folders, len(objects), objects)


def _split(uri: str, scheme: str):
  bucket, _, key = uri[len(scheme):].partition('/')
  return bucket, key


def _claim_local(path: str, body: bytes) -> None:
  folder = os.path.dirname(path)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise OutputNotWritableError(f'--output {folder} is a file, not a directory; name a '
                                 'directory (it is created if needed)')
  try:
    os.makedirs(folder, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError as exc:
    raise _AlreadyClaimed() from exc
  except OSError as exc:  # not a directory, no permission, a read-only or full file system
    raise OutputNotWritableError(f'--output {folder} cannot be written: {exc.strerror or exc}'
                                 f' ({type(exc).__name__}); name a directory you may write '
                                 'to') from exc
  with os.fdopen(descriptor, 'wb') as f:
    f.write(body)


def _claim_gcs(uri: str, body: bytes) -> None:
  from google.api_core import exceptions
  from google.cloud import storage
  bucket, key = _split(uri, 'gs://')
  try:
    storage.Client().bucket(bucket).blob(key).upload_from_string(
        body, content_type='application/json', if_generation_match=0)
  except exceptions.PreconditionFailed as exc:
    raise _AlreadyClaimed() from exc
  except exceptions.NotFound as exc:
    raise OutputNotWritableError(f'--output {uri.rsplit("/", 1)[0]}: bucket gs://{bucket} does '
                                 'not exist; create it (gcloud storage buckets create) or fix '
                                 'the name') from exc
  except exceptions.GoogleAPICallError as exc:
    raise OutputNotWritableError(f'--output {uri.rsplit("/", 1)[0]} cannot be written: '
                                 f'{exc.message}') from exc


def _claim_s3(uri: str, body: bytes, options: PipelineOptions) -> None:
  import boto3
  from botocore.exceptions import ClientError
  s3 = options.view_as(S3Options)
  client = boto3.client(
      's3', endpoint_url=s3.s3_endpoint_url, region_name=s3.s3_region_name,
      aws_access_key_id=s3.s3_access_key_id, aws_secret_access_key=s3.s3_secret_access_key,
      aws_session_token=s3.s3_session_token, verify=s3.s3_verify, use_ssl=not s3.s3_disable_ssl)
  bucket, key = _split(uri, 's3://')
  try:
    client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch='*')
  except ClientError as exc:
    code = exc.response.get('Error', {}).get('Code', '')
    if code in ('PreconditionFailed', 'ConditionalRequestConflict', '412'):
      raise _AlreadyClaimed() from exc
    if code == 'NoSuchBucket':
      raise OutputNotWritableError(f'--output: bucket s3://{bucket} does not exist; create it '
                                   'or fix the name') from exc
    raise OutputNotWritableError(f'--output {uri.rsplit("/", 1)[0]} cannot be written: '
                                 f'{exc}') from exc


def _create_claim(path: str, body: bytes, options: PipelineOptions) -> None:
  if path.startswith('gs://'):
    _claim_gcs(path, body)
  elif path.startswith('s3://'):
    _claim_s3(path, body, options)
  elif not storage.is_remote(path):
    _claim_local(storage.local_path(path), body)
  else:  # another FileSystem: no atomic create, so check-then-write
    if FileSystems.exists(path):
      raise _AlreadyClaimed()
    with FileSystems.create(path) as f:
      f.write(body)


def _read_claim(output: str) -> dict:
  try:
    with FileSystems.open(_join(output, CLAIM_FILE)) as f:
      return json.loads(f.read())
  except Exception:  # pylint: disable=broad-except; a claim is only read for hints
    return {}


def _delete_unfinished(output: str, claimed: dict) -> List[str]:
  """Deletes what the unfinished run wrote (its claim last) and returns it: its shards, of the
  suffixes of its claim's output format (`claimed`: the claim's content), and Beam's temporary
  folders; nothing else."""
  claim = _join(output, CLAIM_FILE)
  files = [p for p in _run_files(output, claimed.get('output_format')) if p != claim]
  if files:
    FileSystems.delete(files)
  folders = delete_temp_folders(output)
  FileSystems.delete([claim])
  return files + folders + [claim]


def delete_temp_folders(run_directory: str) -> List[str]:
  """Deletes the beam-temp-* folders of exactly the name Beam's sinks give them (a dead run's
  partial shards, up to the size of its embeddings) and nothing else; returns them."""
  temp = stale_temp_files(run_directory)
  if temp.deletable:
    FileSystems.delete(temp.deletable)
  return [folder + '/' for folder in temp.folders]


def _refuse_existing(output: str, found: List[str], options: PipelineOptions,
                     cleaning: bool = False, ended_job: Optional[str] = None) -> None:
  if any(path.endswith(SUMMARY_FILE) for path in found):
    raise OutputExistsError(f'--output {output} already holds a finished run; choose a new '
                            '--output directory (e.g. with {datetime} in it: {date} names one '
                            'directory a day)')
  if any(path.endswith(CLAIM_FILE) for path in found):
    _refuse_unfinished(output, _read_claim(output), options, cleaning, ended_job)
  elif found:
    raise OutputExistsError(f'--output {output} already holds run files ({found[0]} and '
                            f'{len(found) - 1} more); choose a new --output directory')


def _refuse_unfinished(output: str, claimed: dict, options: PipelineOptions, cleaning: bool,
                       ended_job: Optional[str]) -> None:
  """An unfinished run: a live one is still writing there, so it is never cleaned; a dead one's
  files go only when asked (`cleaning`, --clean_unfinished), by the readers' rule of liveness
  and, for a Dataflow job, only once Dataflow says the job has ended (or `ended_job`, given by
  hand, names it)."""
  unfinished = Unfinished(output, claimed)
  dead_because = unfinished.dead_because()
  temp = stale_temp_files(output)
  left = f'; it left {temp}' if temp.folders else ''
  job = DataflowJob.from_claim(claimed)
  if dead_because and job is not None and job.id != ended_job:
    dead_because = _dataflow_verdict(output, unfinished, job, options, left)
  if dead_because and cleaning:
    return
  if not claimed:
    raise OutputExistsError(
        f'--output {output} holds a run that has not finished, whose {CLAIM_FILE} cannot be '
        f'read: still running, or dead{left}. Choose a new --output, or, if that run is dead, '
        'rerun with --clean_unfinished to delete what it left')
  if dead_because:
    raise OutputExistsError(
        f'--output holds a run that has not finished and is dead, {unfinished.describe()}: '
        f'{dead_because}{left}. Rerun with --clean_unfinished to delete what it left, or choose '
        'a new --output')
  raise OutputExistsError(
      f'--output holds a run that has not finished and is still going, {unfinished.describe()}'
      f'{left}' + ('; its files are not deleted' if cleaning else '') +
      '. Wait for it to finish, stop it, or choose a new --output (a run on a local runner is '
      'dead once its launcher exits, any other once its claim has not been rewritten for '
      f'{CLAIM_STALE_SECONDS // 60} min and, on Dataflow, its job has ended)')


def _dataflow_verdict(output: str, unfinished: Unfinished, job: DataflowJob,
                      options: PipelineOptions, left: str) -> str:
  """Why a run whose heartbeat stopped is dead, once Dataflow says its job has ended; refuses
  while the job runs or while its state cannot be told."""
  try:
    state = job_state(job, options)
  except JobStateUnknown as exc:
    raise OutputExistsError(
        f'--output holds a run that has not finished, {unfinished.describe()}, whose heartbeat '
        f'has stopped, but Dataflow could not be asked whether its {job} still runs: {exc}. '
        f'Its files are not deleted{left}. Check the job (`{job.gcloud("describe")}`); once it '
        f'has ended, rerun with --clean_unfinished --ended_job={job.id} to delete what it left '
        'without asking, or choose a new --output') from exc
  if state not in ENDED_STATES:
    raise OutputExistsError(
        f'--output holds a run that has not finished whose {job} is still {state} (its '
        f'heartbeat has stopped: {unfinished.describe()}). Its files are not deleted{left}. Wait '
        f'for the job to end, or cancel it (`{job.gcloud("cancel")}`) and rerun, or choose a new '
        '--output')
  return f'its {job} ended {state}'


def check_output_is_new(output: str, options: PipelineOptions, clean_unfinished: bool = False,
                        ended_job: Optional[str] = None) -> None:
  """Refuses an output that holds a run (a dead unfinished one unless `clean_unfinished`); reads
  only (a dry run claims nothing)."""
  try:
    found = _run_files(output)
  except Exception as exc:  # pylint: disable=broad-except; a missing bucket, no permission
    reason = 'its bucket does not exist' if 'NotFound' in str(exc) or 'NoSuchBucket' in str(
        exc) else str(exc)[:300]
    raise OutputNotWritableError(f'--output {output} cannot be read: {reason}') from exc
  _refuse_existing(output, found, options, clean_unfinished, ended_job)


def claim_output(output: str, run_description: dict, options: PipelineOptions,
                 clean_unfinished: bool = False, ended_job: Optional[str] = None) -> List[str]:
  """Claims `output` for this run, or raises OutputExistsError / OutputNotWritableError; returns
  what `clean_unfinished` deleted of an unfinished run there (`ended_job`: the Dataflow job of
  that run, known to have ended: Dataflow is not asked).

  The claim comes first, so of two runs only one gets past it, and a missing bucket or a file in
  the way is reported by the store itself.
  """
  if not storage.is_remote(output) and os.path.isfile(storage.local_path(output)):
    raise OutputNotWritableError(f'--output {output} is a file, not a directory')
  body = json.dumps(dict(run_description, host=socket.gethostname(), pid=os.getpid())).encode()
  claim = _join(output, CLAIM_FILE)
  deleted = []
  try:
    _create_claim(claim, body, options)
  except _AlreadyClaimed:
    _refuse_existing(output, _run_files(output), options, clean_unfinished, ended_job)
    deleted = _delete_unfinished(output, _read_claim(output))
    try:
      _create_claim(claim, body, options)
    except _AlreadyClaimed as exc:
      raise OutputExistsError(f'--output {output} was claimed by another run just now; choose '
                              'a new --output') from exc
  found = [path for path in _run_files(output) if not path.endswith(CLAIM_FILE)]
  if found:  # run files no claimed run wrote: copied there, or a run older than 0.2.0
    FileSystems.delete([claim])
    _refuse_existing(output, found, options)
  return deleted
