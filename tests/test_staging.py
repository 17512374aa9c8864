"""Staging a remote model directory: untrusted object names, many processes at once."""

import multiprocessing
import os
import uuid

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from models import staging as model_staging
from models.handles import ModelLoadError
from models.staging import resolve_model_dir

PROCESSES = 6


def _upload_directory(gcs_server, local_dir: str, uri: str) -> dict:
  """Uploads every file under local_dir; returns {relative path: bytes}."""
  files = {}
  for root, _, names in os.walk(local_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), 'rb') as f:
        files[relative] = f.read()
      gcs_server.upload(f'{uri}/{relative}', files[relative])
  return files


def _local_files(directory: str) -> dict:
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        files[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return files


@pytest.fixture
def bucket(gcs_server):
  name = f'staging-{uuid.uuid4().hex[:12]}'
  gcs_server.create_bucket(name)
  return name


@pytest.mark.parametrize('hostile_name', ['../../escaped.txt', 'variables/../../../escaped.txt',
                                          '/tmp/escaped.txt'],
                         ids=['dot_dot', 'nested_dot_dot', 'absolute'])
def test_object_names_cannot_write_outside_the_staging_directory(
    s3_server, tf2_saved_model, tmp_path, monkeypatch, hostile_name):
  """On the local S3 server: it keeps such names as given, as S3 and GCS do (the local GCS
  server refuses `..` and collapses `//`)."""
  staging = tmp_path / 'a' / 'b' / 'c' / 'staging'
  monkeypatch.setattr(model_staging, 'STAGING_DIR', str(staging))
  FileSystems.set_options(PipelineOptions(s3_server.options))
  bucket = f'staging-{uuid.uuid4().hex[:12]}'
  s3_server.create_bucket(bucket)
  model = f's3://{bucket}/x/y/model'
  for relative, data in _local_files(tf2_saved_model).items():
    s3_server.upload(f'{model}/{relative}', data)
  s3_server.upload(f'{model}/{hostile_name}', b'written outside')  # `model//tmp/x` is `/tmp/x`
  assert f'{model}/{hostile_name}' in s3_server.list(f's3://{bucket}/x/')

  with pytest.raises(ModelLoadError, match='outside'):
    resolve_model_dir(model)
  assert not list(tmp_path.rglob('escaped.txt'))
  assert not os.path.exists('/tmp/escaped.txt')
  assert not staging.exists() or not os.listdir(staging)  # the refused copy is removed


def _stage_in_process(staging_dir, model, barrier, results):
  model_staging.STAGING_DIR = staging_dir
  barrier.wait(timeout=60)
  try:
    results.put(resolve_model_dir(model))
  except BaseException as exc:  # pylint: disable=broad-except  # reported to the test
    results.put(f'error: {exc!r}')


def test_many_processes_staging_one_model_get_one_complete_copy(
    gcs_server, bucket, tf2_saved_model, tmp_path):
  """As the worker processes of a VM do at start-up: one directory, complete, no leftovers."""
  staging = str(tmp_path / 'staging')
  model = f'gs://{bucket}/model'
  uploaded = _upload_directory(gcs_server, tf2_saved_model, model)
  # Fork: the children inherit the GCS server's environment and skip re-importing TensorFlow;
  # they only copy files.
  context = multiprocessing.get_context('fork')
  barrier = context.Barrier(PROCESSES)
  results = context.Queue()
  processes = [context.Process(target=_stage_in_process, args=(staging, model, barrier, results))
               for _ in range(PROCESSES)]
  for process in processes:
    process.start()
  staged = [results.get(timeout=120) for _ in processes]
  for process in processes:
    process.join(timeout=30)
  assert all(process.exitcode == 0 for process in processes)
  assert len(set(staged)) == 1 and not staged[0].startswith('error'), staged
  assert os.listdir(staging) == [os.path.basename(staged[0])]  # no partial copies left
  assert _local_files(staged[0]) == uploaded
