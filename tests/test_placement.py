"""Model copies on separate devices: copy i on device i mod G, shown with logical CPU devices."""

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from models.gpus import COUNTER_PREFIX, claim_load_index

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TensorFlow splits the CPU into three logical devices before it initialises, as it would find
# three GPUs; then four copies are loaded the way the handler loads them, each run once with
# device placement logged, between markers.
PLACEMENT_SCRIPT = r'''
import json, sys
import numpy as np
import tensorflow as tf
tf.debugging.set_log_device_placement(True)  # read when the context starts: set it first
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0], [tf.config.LogicalDeviceConfiguration()] * 3)
from models.gpus import device_for_load
from models.loading import load_embedding_model

handle, token = sys.argv[1], sys.argv[2]
images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
reference = load_embedding_model(handle).embed(images)
report = []
for copy in range(4):
  device = device_for_load(token, 'CPU')
  model = load_embedding_model(handle, device=device)
  print(f'@@ copy {copy} start', file=sys.stderr, flush=True)
  features = model.embed(images)
  print(f'@@ copy {copy} end', file=sys.stderr, flush=True)
  variables = getattr(model._owner, 'variables', ())  # a loaded SavedModel does not list them
  report.append({'device': device, 'variables': sorted({v.device for v in variables}),
                 'identical': bool(np.array_equal(features, reference))})
print(json.dumps(report))
'''


@pytest.fixture
def run_token():
  token = uuid.uuid4().hex
  yield token
  os.remove(os.path.join(tempfile.gettempdir(), COUNTER_PREFIX + token))


def _claim(token, count, queue):
  queue.put([claim_load_index(token) for _ in range(count)])


def test_load_indices_are_distinct_across_processes(run_token):
  """Copies may be loaded by different processes of a machine: each still gets its own index."""
  token = run_token
  spawn = multiprocessing.get_context('spawn')
  queue = spawn.Queue()
  claimers = [spawn.Process(target=_claim, args=(token, 5, queue)) for _ in range(3)]
  for claimer in claimers:
    claimer.start()
  claimed = [index for _ in claimers for index in queue.get(timeout=60)]
  for claimer in claimers:
    claimer.join()
  assert sorted(claimed) == list(range(15))


def _placed_ops(stderr: str, copy: int) -> list:
  """The devices TensorFlow logged between a copy's markers, for the ops it ran and placed."""
  section = stderr.split(f'@@ copy {copy} start')[1].split(f'@@ copy {copy} end')[0]
  return [line.rsplit(' ', 1)[1].strip() for line in section.splitlines()
          if '): /job:' in line or ' in device /job:' in line]


def _check_placement(handle: str, token: str, expected_variables: bool):
  child = subprocess.run([sys.executable, '-c', PLACEMENT_SCRIPT, handle, token],
                         capture_output=True, text=True, cwd=PROJECT, timeout=300,
                         # The placement log is INFO: shown whatever an earlier test set.
                         env=dict(os.environ, PYTHONPATH=PROJECT, TF_CPP_MIN_LOG_LEVEL='0'))
  assert child.returncode == 0, child.stderr[-3000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  assert len(report) == 4
  for copy, placed in enumerate(report):
    device = f'/device:CPU:{copy % 3}'
    assert placed['device'] == device
    if expected_variables:
      assert placed['variables'] == ['/job:localhost/replica:0/task:0' + device]
    ops = _placed_ops(child.stderr, copy)
    assert ops and set(ops) == {'/job:localhost/replica:0/task:0' + device}, ops
    assert placed['identical']


def test_builtin_copies_run_round_robin_on_the_devices(run_token):
  _check_placement('builtin:pnasnet_tiny', run_token, expected_variables=True)


def test_saved_model_copies_run_round_robin_on_the_devices(tf2_saved_model, run_token):
  _check_placement(tf2_saved_model, run_token, expected_variables=False)
