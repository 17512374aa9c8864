"""Inference failures: infrastructure errors raise, so the runner retries the bundle (Dataflow: four
times, then the job fails); only data errors are dead-lettered, and only for the images that
cause them."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
import tensorflow as tf
from PIL import Image

from models.shared_batches import embed_batch
from pipeline.launcher import run
from pipeline.output_dir import OutputExistsError
from tests.shared_callers import images, shared
from transforms.embed import ImageEmbeddingModelHandler

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
SHARED_SERVER = '''
import sys, time
from tests.shared_callers import shared
shared(sys.argv[1])
print('serving', flush=True)
time.sleep(600)
'''


def _save(path, forward) -> str:
  """A SavedModel with an image feature-vector signature: [B, 64, 64, 3] -> 'default' [B, 3]."""

  class Module(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    def serve(self, images):
      return {'default': forward(images)}

  module = Module()
  tf.saved_model.save(module, str(path), signatures={'serving_default': module.serve})
  return str(path)


def _impossible_allocation(images):
  """Asks for petabytes: TensorFlow raises ResourceExhaustedError, as a GPU out of memory does."""
  huge = tf.zeros(tf.stack([tf.shape(images)[0] * (1 << 20), 1 << 20, 1 << 10]))
  return tf.reduce_mean(images, [1, 2]) + tf.reduce_sum(huge[:1, :1, :1])


def _out_of_memory_from_3_images(images):
  """ResourceExhaustedError for batches of 3 images or more, as a GPU with room for 2 (on a CPU
  a batch comes with one more row, models/loading.py: room for 3 rows)."""
  extra = tf.maximum(tf.shape(images)[0] - 3, 0)
  huge = tf.zeros(tf.stack([extra * (1 << 20), 1 << 20, 1 << 10]))
  return tf.reduce_mean(images, [1, 2]) + tf.reduce_sum(huge[:1, :1, :1])


def _refuses_white_images(images):
  """Fails (InvalidArgumentError) for any batch holding an almost white image."""
  brightness = tf.reduce_mean(images, [1, 2, 3])
  check = tf.debugging.assert_less(brightness, 0.95, message='too bright')
  with tf.control_dependencies([check]):
    return tf.reduce_mean(images, [1, 2])


def _failures(output) -> list:
  lines = []
  for path in glob.glob(os.path.join(output, 'failures-*.jsonl')):
    with open(path) as f:
      lines += [json.loads(line) for line in f if line.strip()]
  return lines


def _run_out_of_memory(flags) -> subprocess.CompletedProcess:
  """The pipeline in a process of its own whose TensorFlow runs without oneDNN: oneDNN's CPU
  allocator, like a GPU's, waits 10 s for memory to be freed before it reports out of memory;
  the plain one reports it at once, with the same error."""
  return subprocess.run(
      [sys.executable, os.path.join(PROJECT, 'run_pipeline.py')] + flags,
      cwd=PROJECT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=PROJECT, TF_ENABLE_ONEDNN_OPTS='0'))


def test_out_of_memory_fails_the_run_and_dead_letters_nothing(image_folder, tmp_path):
  """The failed job ends in one line, last (TensorFlow's own C++ log lines aside), with the error,
  the unfinished output and what to do; a rerun into that output is told its run is dead."""
  model = _save(tmp_path / 'oom_model', _impossible_allocation)
  output = tmp_path / 'run'
  argv = [f'--input={image_folder}/*', f'--output={output}', f'--model={model}',
          '--max_batch_size=4']
  result = _run_out_of_memory(argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  python_lines = [line for line in result.stderr.splitlines()
                  if line.strip() and not re.match(r'[IWEF]\d{4} |\s', line)]
  last = python_lines[-1]
  assert last.startswith('error: the job failed: ResourceExhaustedError: '), last
  assert 'OOM when allocating' in last and 'in step DecodeAndEmbed/' in last
  assert f'{output} holds an unfinished run' in last and '--clean_unfinished' in last
  assert not (output / 'run_summary.json').exists()  # nothing claims the run finished
  assert '"embedded"' not in result.stdout
  assert not [f for f in _failures(output) if f['stage'] == 'inference']
  with pytest.raises(OutputExistsError) as rerun:
    run(argv)
  assert 'is dead' in str(rerun.value) and 'no longer running on this host' in str(rerun.value)
  assert 'Rerun with --clean_unfinished' in str(rerun.value)


def test_batches_out_of_memory_are_halved_until_they_fit(image_folder, tmp_path):
  model = _save(tmp_path / 'small_gpu_model', _out_of_memory_from_3_images)
  output = tmp_path / 'run'
  result = _run_out_of_memory([f'--input={image_folder}/*.png', f'--output={output}',
                               f'--model={model}', '--min_batch_size=4', '--max_batch_size=4'])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((output / 'run_summary.json').read_text())
  assert summary['embedded'] == 4 and summary['failed'] == 0
  said = [line for line in result.stderr.splitlines() if 'out of memory for a batch of 4' in line]
  assert said and 'batches of 2 and 2' in said[0]
  assert 'out of memory for a batch of 2' not in result.stderr  # halves that fit run once


def test_a_model_failing_for_some_images_dead_letters_only_those(image_folder, tmp_path):
  model = _save(tmp_path / 'picky_model', _refuses_white_images)
  Image.new('RGB', (120, 90), (255, 255, 255)).save(image_folder / 'white.png')
  output = str(tmp_path / 'run')
  summary = run([f'--input={image_folder}/*.png', f'--input={image_folder}/*.jpg',
                 f'--output={output}', f'--model={model}', '--min_batch_size=8',
                 '--max_batch_size=8'])
  inference = [f for f in _failures(output) if f['stage'] == 'inference']
  assert [(os.path.basename(f['uri']), f['error']) for f in inference] == [
      ('white.png', 'InvalidArgumentError')]
  assert 'too bright' in inference[0]['message']
  assert summary['embedded'] == 6 and summary['failed_by_stage']['inference'] == 1


def test_handler_raises_infrastructure_errors_and_returns_data_errors():
  handler = ImageEmbeddingModelHandler('builtin:pnasnet_tiny')

  class Failing:

    def __init__(self, error):
      self.error = error

    def embed(self, batch):
      raise self.error

  with pytest.raises(tf.errors.ResourceExhaustedError):
    handler.run_inference(images(0, 2, SIZE), Failing(
        tf.errors.ResourceExhaustedError(None, None, 'OOM when allocating tensor')))
  with pytest.raises(tf.errors.InternalError):
    handler.run_inference(images(0, 2, SIZE), Failing(
        tf.errors.InternalError(None, None, 'CUDA error: an illegal memory access')))
  with pytest.raises(ConnectionResetError):
    handler.run_inference(images(0, 2, SIZE), Failing(ConnectionResetError()))
  results = handler.run_inference(images(0, 2, SIZE), Failing(
      tf.errors.InvalidArgumentError(None, None, 'bad pixels')))
  assert [r.inference.error for r in results] == ['InvalidArgumentError'] * 2


def test_a_lost_shared_model_raises_and_the_retried_bundle_acquires_a_new_one():
  """The model's process dies (killed, as an out-of-memory kill would): the call raises instead
  of dead-lettering; the retried bundle's set-up acquires the model again, which starts a new
  server (in this process here) since the old address answers no more."""
  tag = f'lost_{uuid.uuid4().hex}'
  server = subprocess.Popen([sys.executable, '-c', SHARED_SERVER, tag], cwd=PROJECT, text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=PROJECT))
  try:
    assert server.stdout.readline().strip() == 'serving'
    handler = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', large_model=True)
    proxy = shared(tag)
    assert len(handler.run_inference(images(1, 2, 8), proxy)) == 2
  finally:
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=60)
  with pytest.raises((ConnectionError, EOFError)):
    handler.run_inference(images(2, 2, 8), proxy)
  again = shared(tag)  # what RunInference's set-up does in the retried bundle
  assert embed_batch(again, images(3, 2, 8)).shape == (2, 4)
