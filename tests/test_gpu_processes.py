"""On a GPU VM only the model's process may initialise the GPU: what each process imports."""

import json
import os
import subprocess
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU step's reading and decoding, as an SDK process that holds no model runs them.
READ_AND_DECODE = '''
import json, os, sys
import apache_beam as beam
from models.gpus import devices_initialised
from transforms.decode import DecodeImages
from transforms.read import FileRef, ReadImages
folder = sys.argv[1]
refs = [FileRef(os.path.join(folder, n), os.path.getsize(os.path.join(folder, n)), 0)
        for n in sorted(os.listdir(folder))]
pipeline = beam.Pipeline()
read = pipeline | beam.Create(refs) | ReadImages()
_ = read.images | DecodeImages(331, 331)
result = pipeline.run()
result.wait_until_finish()
counts = {c.key.metric.name: c.committed for c in result.metrics().query()['counters']
          if c.key.metric.namespace == 'decode'}
print(json.dumps({'counts': counts, 'devices_initialised': devices_initialised()}))
'''


def _python(code, *args, env=None):
  result = subprocess.run([sys.executable, '-c', code, *args], cwd=PROJECT, capture_output=True,
                          text=True, timeout=300, env=dict(env or os.environ, PYTHONPATH=PROJECT))
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_reading_and_decoding_in_a_fresh_process_never_initialise_a_device(image_folder):
  """What the design guarantees: the GPU step's processes that hold no model decode every JPEG
  (and every other format) without a TensorFlow op, so TensorFlow never initialises its devices
  there and no CUDA context is created (TensorFlow may be imported: importing initialises
  nothing)."""
  report = _python(READ_AND_DECODE, str(image_folder))
  assert report['counts'] == {'decoded': 6, 'failed': 3}  # the sample photos; the broken files
  assert report['devices_initialised'] is False


def test_the_gpu_steps_modules_ask_for_memory_growth_before_tensorflow_starts():
  """A process that loads the model (or any other TensorFlow code) after importing the GPU
  step's modules finds memory growth on, however it reaches its first TensorFlow op; importing
  them initialises no device."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_FORCE_GPU_ALLOW_GROWTH'}
  report = _python('''
import json, os, sys
import transforms.embed
from models.gpus import devices_initialised
print(json.dumps({'growth': os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'),
                  'devices_initialised': devices_initialised()}))
''', env=env)
  assert report == {'growth': 'true', 'devices_initialised': False}


def test_an_explicit_choice_of_memory_growth_is_left_alone():
  env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH='false')
  report = _python('import json, os, transforms.embed; '
                   'print(json.dumps(os.environ["TF_FORCE_GPU_ALLOW_GROWTH"]))', env=env)
  assert report == 'false'


def test_devices_initialised_tells_a_process_that_ran_an_op():
  assert _python('import json\nfrom models.gpus import devices_initialised\n'
                 'import tensorflow as tf\nbefore = devices_initialised()\n'
                 'tf.constant(1.0) + 1\nprint(json.dumps([before, devices_initialised()]))'
                 ) == [False, True]


def test_gpu_self_check_starts_the_vms_processes_and_reports_each():
  """`pnasnet-embeddings check-gpu`'s process check, on the CPU here: this process holds the
  model, two fresh ones decode photos and embed them through shared memory."""
  from pipeline.gpu_check import check_processes  # pylint: disable=import-outside-toplevel
  lines = check_processes(3, 'builtin:pnasnet_tiny', batch_size=3, device_type='CPU')
  assert lines[0] == f'model process {os.getpid()}: the model runs on the CPU'
  assert len(lines) == 3
  for line in lines[1:]:
    assert line.startswith('decoding process ') and '6 photos decoded and embedded' in line
    assert 'features [3, 160]' in line and 'never initialised' in line
