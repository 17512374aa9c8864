"""Nightly state that stays right (issues 23, 35): the collection is the state, so two nights at
once cannot both commit, a retried commit step does not commit twice, deleting run directories
changes nothing a night skips, and a read-only output is refused in one line."""

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pytest

import collection
from collection.table import schema
from commands.embed import main
from pipeline.launcher import read_summary, run
from run_format import CLAIM_FILE
from tests.fault_proxy import STALL, FaultProxy, FaultRule
from transforms.incremental import NightState
from transforms.summary import commit

TINY = '--model=builtin:pnasnet_tiny'
PHOTOS = ('astronaut.png', 'camera.png', 'chelsea.png')
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def photos(image_folder, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in PHOTOS:
    shutil.copy(image_folder / name, folder / name)
  return folder


def test_two_nights_at_once_the_later_fails_naming_the_other_and_commits_nothing(
    s3_server, image_folder, photos, tmp_path, capsys):
  """Night A (photos on S3, each read stalled 5 s by the proxy) and night B (local photos) read
  the same version of one collection; B commits first, so A's commit is refused: outcome
  `failed`, exit 1, its run directory written, the collection as B left it."""
  bucket = f'two-nights-{uuid.uuid4().hex[:8]}'
  s3_server.create_bucket(bucket)
  for name in ('coffee.png', 'rocket.jpg', 'hubble_deep_field.jpg'):  # 15 s of stalled reads
    s3_server.upload(f's3://{bucket}/a/{name}', (image_folder / name).read_bytes())
  coll, runs = f'{tmp_path}/collection', tmp_path / 'runs'
  later_night = []

  def night_b(flags):
    while not os.path.exists(runs / 'a' / CLAIM_FILE):  # A has read the collection's version
      time.sleep(0.2)
    later_night.append(run([f'--input={photos}', TINY, f'--output={runs}/b',
                            f'--collection={coll}'] + flags))

  with FaultProxy(s3_server.endpoint, rules=[FaultRule(f'^{bucket}/a/', STALL, kinds=['read'])],
                  stall_seconds=5) as proxy:
    # The same S3 flags for both: Beam's FileSystems options are one per process.
    flags = [o.replace(s3_server.endpoint, proxy.url) for o in s3_server.options]
    thread = threading.Thread(target=night_b, args=(flags,))
    thread.start()
    try:
      with pytest.raises(SystemExit) as exit_info:
        main([f'--input=s3://{bucket}/a', TINY, f'--output={runs}/a', f'--collection={coll}']
             + flags)
    finally:
      thread.join(timeout=300)
  [b] = later_night
  assert exit_info.value.code == 1
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert f'{runs}/b committed version {b["collection_version"]}' in error, error
  a = read_summary(f'{runs}/a')
  assert (a.outcome, a.collection_version, a.embedded) == ('failed', None, 3)
  assert a.collection_read_version == b['collection_read_version']
  after = collection.open_collection(coll)
  assert after.version == b['collection_version'] and after.num_rows == 3
  assert collection.history(coll)[-1].run == f'{runs}/b'


def test_a_retried_commit_step_finds_its_own_commit(tmp_path):
  """The job's last step may run again after its commit landed (a worker lost after the commit,
  before the summary): it takes the version it committed instead of refusing itself."""
  uri = str(tmp_path / 'collection')
  created = collection.create(uri, 'm', 2, 'float32')
  table = pa.Table.from_pylist([{'uri': '/x.png', 'embedding': [1.0, 0.0]}],
                               schema=schema('m', 2, 'float32'))
  state = NightState(uri, created.version, [], {})
  fragments = collection.write_fragment(uri, table, {})
  first = commit(state, str(tmp_path / 'run'), fragments, [])
  assert commit(state, str(tmp_path / 'run'), fragments, []) == first
  assert collection.open_collection(uri).num_rows == 1
  with pytest.raises(collection.ConcurrentNightError, match=f'{tmp_path}/run committed'):
    commit(state, str(tmp_path / 'other'), fragments, [])
  assert commit(state, str(tmp_path / 'nothing'), [], []) is None


def test_deleting_every_run_directory_changes_nothing_a_night_skips(photos, tmp_path):
  coll = f'{tmp_path}/collection'
  first = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1', f'--collection={coll}'])
  shutil.rmtree(tmp_path / 'runs')
  second = run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/2', f'--collection={coll}'])
  assert (second['embedded'], second['skipped'], second['collection_version']) == (0, 3, None)
  found = collection.open_collection(coll)
  assert found.version == first['collection_version'] and found.num_rows == 3


def test_a_read_only_output_is_refused_in_one_line(image_folder, tmp_path):
  """Issue 26, item 3: --output on a read-only file system (a read-only bind mount, in a user and
  mount namespace of its own) exits 2 with one line, no traceback."""
  readonly = tmp_path / 'readonly'
  readonly.mkdir()
  command = (f'mount --bind -o ro {readonly} {readonly} && exec {sys.executable} run_pipeline.py '
             f'--input={image_folder}/camera.png {TINY} --output={readonly}/out')
  result = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                           command], cwd=PROJECT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --output {readonly}/out cannot be written: Read-only file '
                         'system'), last
  assert not os.path.exists(readonly / 'out')
