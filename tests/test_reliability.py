"""Determinism of the embeddings across runs and runners; a launcher killed mid-run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import collection
from pipeline.launcher import run
from run_format import SUMMARY_FILE

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_PROCESSING = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']


def _embeddings_by_uri(output: str) -> dict:
  """uri -> the embedding's float32 bytes, exactly as written."""
  found = {}
  for path in tf.io.gfile.glob(os.path.join(output, 'embeddings-*.tfrecord')):
    for record in tf.data.TFRecordDataset(path):
      feature = tf.train.Example.FromString(record.numpy()).features.feature
      uri = feature['image/uri'].bytes_list.value[0].decode()
      assert uri not in found
      found[uri] = np.asarray(feature['embedding'].float_list.value, np.float32).tobytes()
  return found


def test_embeddings_are_byte_identical_across_runs_runners_and_batch_sizes(image_folder,
                                                                         tmp_path):
  """Same inputs and model: the same bytes per URI, however Beam batches and distributes them.

  Batches differ between runners (BatchElements adapts, workers split the input), so this also
  shows that an image's features do not depend on the other images in its batch.
  """
  runs = {
      'in_memory': [],
      'multi_processing': MULTI_PROCESSING,
      'one_image_batches': ['--max_batch_size=1'],
  }
  results = {}
  for name, extra in runs.items():
    output = str(tmp_path / name)
    run([f'--input={image_folder}/*', f'--output={output}', '--model=builtin:pnasnet_tiny',
         '--max_batch_size=4'] + extra)
    results[name] = _embeddings_by_uri(output)
  reference = results.pop('in_memory')
  assert len(reference) == 6  # the sample photos; the three broken files are dead-lettered
  for name, embeddings in results.items():
    assert embeddings.keys() == reference.keys(), name
    differing = [uri for uri in reference if embeddings[uri] != reference[uri]]
    assert not differing, f'{name}: {differing}'


def _wait_for_temp_files(output: str, process: subprocess.Popen, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if os.path.isdir(output) and any('temp' in name for name in os.listdir(output)):
      return True
    time.sleep(0.01)
  return False


def test_launcher_killed_mid_run_leaves_no_summary(image_folder, tmp_path):
  """SIGKILL once the sinks' temporary files exist: no run_summary.json, so no finished run; a
  rerun against the same --collection completes the set, no image embedded twice: the killed
  night committed nothing."""
  coll = f'--collection={tmp_path}/collection'
  done = run([f'--input={image_folder}/*.png', f'--output={tmp_path}/runs/first',
              '--model=builtin:pnasnet_tiny', coll])
  output = str(tmp_path / 'runs' / 'killed')
  process = subprocess.Popen(
      [sys.executable, 'run_pipeline.py', f'--input={image_folder}/*', f'--output={output}',
       '--model=builtin:pnasnet_tiny', '--max_batch_size=1', coll],
      cwd=PROJECT, env=dict(os.environ, PYTHONPATH=PROJECT), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    started = _wait_for_temp_files(output, process, timeout=120)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()  # a no-op once it is dead
    process.wait(timeout=30)
  if not started:
    pytest.fail(f'no temporary output appeared before the run ended ({process.returncode})')
  assert process.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(output, SUMMARY_FILE))

  rerun = run([f'--input={image_folder}/*', f'--output={tmp_path}/runs/rerun',
               '--model=builtin:pnasnet_tiny', coll])
  assert rerun['skipped'] == done['embedded'] == 4  # the killed run counts for nothing
  finished = [_embeddings_by_uri(str(tmp_path / 'runs' / name)) for name in ('first', 'rerun')]
  assert not set(finished[0]) & set(finished[1])
  assert len(finished[0]) + len(finished[1]) == done['embedded'] + rerun['embedded']
  nights = [entry.run for entry in collection.history(str(tmp_path / 'collection'))
            if entry.kind == 'night']
  assert nights == [done['output'], rerun['output']]
