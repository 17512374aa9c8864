"""The output directory: checked writable, and claimed atomically before any work starts.

A claim is a small object created only if it does not exist yet (`ifGenerationMatch=0` on GCS,
`If-None-Match: *` on S3, `O_EXCL` on a local disk), so of two runs started at once on the same
`--output` exactly one proceeds. A claim without `run_summary.json` beside it is an unfinished
(interrupted or failed) run: reported, and cleaned only with `--clean_unfinished`.
"""

import glob
import json
import os
import socket
from typing import List

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, S3Options

from run_format import CLAIM_FILE, RUN_FILES, SUMMARY_FILE, TEMP_FOLDERS


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


def stale_temp_files(output: str) -> List[str]:
  """What an interrupted run's sinks left: Beam writes shards under beam-temp-* first (local
  folders as such, which FileSystems.delete removes whole; objects under the prefix elsewhere)."""
  if '://' not in output:
    return sorted(glob.glob(os.path.join(glob.escape(output), TEMP_FOLDERS)))
  try:
    return _existing(output, [TEMP_FOLDERS + '/**'])
  except Exception:  # pylint: disable=broad-except; an unreadable output has nothing to report
    return []


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
  except (NotADirectoryError, PermissionError) as exc:
    raise OutputNotWritableError(f'--output {folder} cannot be written: {exc}') from exc
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
  elif '://' not in path:
    _claim_local(path, body)
  else:  # another FileSystem: no atomic create, so check-then-write
    if FileSystems.exists(path):
      raise _AlreadyClaimed()
    with FileSystems.create(path) as f:
      f.write(body)


def _delete_unfinished(output: str) -> None:
  leftovers = _existing(output, [name for name in RUN_FILES if name != SUMMARY_FILE])
  leftovers += stale_temp_files(output)
  if leftovers:
    FileSystems.delete(leftovers)


def _claim_holder(output: str) -> str:
  try:
    with FileSystems.open(_join(output, CLAIM_FILE)) as f:
      claim = json.loads(f.read())
    return f' (started {claim.get("started_at")} on {claim.get("host")}, pid {claim.get("pid")})'
  except Exception:  # pylint: disable=broad-except; the holder is only a hint
    return ''


def _refuse_existing(output: str, found: List[str]) -> None:
  if any(path.endswith(SUMMARY_FILE) for path in found):
    raise OutputExistsError(f'--output {output} already holds a finished run; choose a new '
                            '--output directory (e.g. with {date} in it)')
  if any(path.endswith(CLAIM_FILE) for path in found):
    temp = stale_temp_files(output)
    raise OutputExistsError(
        f'--output {output} is claimed by a run that has not finished{_claim_holder(output)}: '
        'it is still running, or was interrupted' +
        (f' and left {len(temp)} partial files in {TEMP_FOLDERS}' if temp else '') +
        '. Choose a new --output, or, if that run is dead, rerun with --clean_unfinished to '
        'delete what it left (an unfinished run)')
  if found:
    raise OutputExistsError(f'--output {output} already holds run files ({found[0]} and '
                            f'{len(found) - 1} more); choose a new --output directory')


def check_output_is_new(output: str) -> None:
  """Refuses an output that holds a run; reads only (a dry run claims nothing)."""
  try:
    found = _existing(output, RUN_FILES)
  except Exception as exc:  # pylint: disable=broad-except; a missing bucket, no permission
    reason = 'its bucket does not exist' if 'NotFound' in str(exc) or 'NoSuchBucket' in str(
        exc) else str(exc)[:300]
    raise OutputNotWritableError(f'--output {output} cannot be read: {reason}') from exc
  _refuse_existing(output, found)


def claim_output(output: str, run_description: dict, options: PipelineOptions,
                 clean_unfinished: bool = False) -> None:
  """Claims `output` for this run, or raises OutputExistsError / OutputNotWritableError.

  The claim comes first, so of two runs only one gets past it, and a missing bucket or a file in
  the way is reported by the store itself.
  """
  if '://' not in output and os.path.isfile(output):
    raise OutputNotWritableError(f'--output {output} is a file, not a directory')
  body = json.dumps(dict(run_description, host=socket.gethostname(), pid=os.getpid())).encode()
  claim = _join(output, CLAIM_FILE)
  try:
    _create_claim(claim, body, options)
  except _AlreadyClaimed:
    found = _existing(output, RUN_FILES)
    if not clean_unfinished or any(path.endswith(SUMMARY_FILE) for path in found):
      _refuse_existing(output, found)
    _delete_unfinished(output)
    try:
      _create_claim(claim, body, options)
    except _AlreadyClaimed as exc:
      raise OutputExistsError(f'--output {output} was claimed by another run just now; choose '
                              'a new --output') from exc
  found = [path for path in _existing(output, RUN_FILES) if not path.endswith(CLAIM_FILE)]
  if found:  # files no claimed run wrote: put there by hand, or a run older than 0.2.0
    FileSystems.delete([claim])
    _refuse_existing(output, found)
