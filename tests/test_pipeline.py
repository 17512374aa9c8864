"""End to end on real Beam runners: local folders and gs:// on a real GCS server on loopback."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps

from pipeline.launcher import OutputExistsError, run
from pipeline.options import OptionsError
from tests.outputs import read_examples, read_failures
from transforms.decode import decode_and_resize
from models.handles import ModelLoadError
from models.loading import load_embedding_model
from transforms.read import NoInputError

BROKEN = {'empty.jpg', 'truncated.jpg', 'notes.jpg'}
FEATURES = {'image/uri', 'image/sha256', 'image/height', 'image/width', 'image/size_bytes',
            'image/last_modified', 'model', 'model/weights', 'embedding/recipe',
            'pipeline/version', 'embedding'}
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_run(summary, output, sources, model_dir, tmp_path):
  """Every input is embedded or dead-lettered; each embedding is the model's own output."""
  examples = read_examples(output, tmp_path)
  failures = read_failures(output)
  embedded = {e.features.feature['image/uri'].bytes_list.value[0].decode(): e for e in examples}
  assert {os.path.basename(uri) for uri in embedded} == set(sources) - BROKEN
  assert {os.path.basename(f['uri']) for f in failures} == BROKEN
  assert all(f['stage'] == 'decode' and f['error'] and f['message'] for f in failures)
  assert summary['matched'] == len(sources) == summary['embedded'] + summary['failed']
  assert summary['skipped'] == 0
  assert summary['embedded'] == len(examples) and summary['failed_by_stage']['decode'] == 3
  with FileSystems.open(FileSystems.join(output, 'run_summary.json')) as f:
    assert json.loads(f.read()) == summary

  model = load_embedding_model(model_dir)
  for uri, example in embedded.items():
    feature = example.features.feature
    assert set(feature) == FEATURES
    data = sources[os.path.basename(uri)]
    assert feature['image/sha256'].bytes_list.value[0].decode() == hashlib.sha256(
        data).hexdigest()
    with Image.open(sources.path(os.path.basename(uri))) as image:
      width, height = ImageOps.exif_transpose(image).size
    assert (feature['image/height'].int64_list.value[0],
            feature['image/width'].int64_list.value[0]) == (height, width)
    assert feature['model'].bytes_list.value[0].decode() == model_dir
    assert feature['image/size_bytes'].int64_list.value == [len(data)]
    assert feature['embedding/recipe'].bytes_list.value == [summary['recipe'].encode()]
    _, _, pixels = decode_and_resize(data, 64, 64)
    direct = model.embed(pixels[np.newaxis])[0]
    np.testing.assert_allclose(feature['embedding'].float_list.value, direct, rtol=0, atol=1e-5)


class _Sources(dict):
  """File name -> bytes, remembering the local folder they came from."""

  def __init__(self, folder):
    super().__init__({p.name: p.read_bytes() for p in folder.iterdir()})
    self._folder = folder

  def path(self, name):
    return self._folder / name


# A model shared across processes (--large_model, --model_copies) is end to end in
# test_shared_pipeline.py, bit for bit against the in-process model.
@pytest.mark.parametrize('runner_args', [
    [],
    ['--direct_running_mode=multi_processing', '--direct_num_workers=2'],
], ids=['in_memory', 'multi_processing'])
def test_local_folder_end_to_end(runner_args, image_folder, tf1_hub_module, tmp_path):
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/*', f'--output={output}',
                 f'--model={tf1_hub_module}', '--max_batch_size=4'] + runner_args)
  _check_run(summary, output, _Sources(image_folder), tf1_hub_module, tmp_path)
  assert glob.glob(os.path.join(output, 'embeddings-00000-of-*.tfrecord'))


def test_gcs_end_to_end(gcs_server, image_folder, tf1_hub_module, tmp_path):
  """Images, the module and the output all on gs://."""
  gcs_server.create_bucket('e2e')
  for path in image_folder.iterdir():
    gcs_server.upload(f'gs://e2e/photos/{path.name}', path.read_bytes())
  for root, _, files in os.walk(tf1_hub_module):
    for name in files:
      relative = os.path.relpath(os.path.join(root, name), tf1_hub_module)
      with open(os.path.join(root, name), 'rb') as f:
        gcs_server.upload(f'gs://e2e/modules/tiny/{relative}', f.read())
  model = 'gs://e2e/modules/tiny'
  output = 'gs://e2e/runs/first'
  summary = run(['--input=gs://e2e/photos/*', f'--output={output}', f'--model={model}',
                 '--compression=gzip', '--num_shards=2'])
  _check_run(summary, output, _Sources(image_folder), model, tmp_path)
  names = [os.path.basename(p) for p in gcs_server.list(output + '/')]
  assert 'embeddings-00000-of-00002.tfrecord.gz' in names and 'run_summary.json' in names


def test_s3_end_to_end(s3_server, image_folder, tf1_hub_module, tmp_path):
  """Images and output on s3://, through Beam's S3 FileSystem and its --s3_* options."""
  s3_server.create_bucket('photos')
  for path in image_folder.iterdir():
    s3_server.upload(f's3://photos/in/{path.name}', path.read_bytes())
  output = 's3://photos/embeddings/run1'
  summary = run(['--input=s3://photos/in/*', f'--output={output}', f'--model={tf1_hub_module}']
                + s3_server.options)
  _check_run(summary, output, _Sources(image_folder), tf1_hub_module, tmp_path)
  assert f'{output}/run_summary.json' in s3_server.list('s3://photos/embeddings/')


def test_full_large_network_through_the_pipeline(image_folder, tmp_path):
  """The README's main command, on one photo: the real 331x331 -> 4320 network, offline."""
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/chelsea.png', f'--output={output}',
                 '--model=builtin:pnasnet_large'])
  assert (summary['embedded'], summary['embedding_size'], summary['image_size']) == (
      1, 4320, [331, 331])
  [example] = read_examples(output, tmp_path)
  embedding = np.array(example.features.feature['embedding'].float_list.value)
  assert embedding.shape == (4320,) and np.isfinite(embedding).all() and embedding.std() > 0


def _build_without_launcher(argv):
  """The graph as the launcher builds it, run with Beam directly."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from pipeline.build import build_pipeline
  from pipeline.options import EmbeddingOptions
  from models.description import describe_model
  from transforms.provenance import Provenance, recipe
  from pipeline.launcher import launch_record
  from run_format import utc_now

  options = PipelineOptions(argv)
  embedding = options.view_as(EmbeddingOptions)
  model = describe_model(embedding.model)
  provenance = Provenance(model.model_id, 'untrained seed 0', recipe('float32', 1.0, False),
                          'test')
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, embedding, model, provenance,
                 launch_record(embedding, options, model, provenance, utc_now(), None))
  return pipeline


def test_model_is_loaded_once_per_process_for_many_batches(image_folder, tmp_path):
  from apache_beam.metrics.metric import MetricsFilter

  pipeline = _build_without_launcher([f'--input={image_folder}/*.png',
                                      f'--output={tmp_path}/out', '--model=builtin:pnasnet_tiny',
                                      '--max_batch_size=1'])
  result = pipeline.run()
  result.wait_until_finish()
  metrics = result.metrics().query(MetricsFilter().with_namespace('embed'))
  counters = {c.key.metric.name: c.committed for c in metrics['counters']}
  loads = [d.committed.count for d in metrics['distributions']
           if d.key.metric.name == 'load_model_latency_milli_secs']
  assert counters['embedded'] == 4  # four PNGs, one batch each
  assert sum(loads) == 1


def test_the_job_writes_its_own_summary_with_exact_counts(image_folder, tmp_path):
  """No launcher: the summary is the pipeline's last step, counted from the data."""
  output = tmp_path / 'out'
  pipeline = _build_without_launcher([f'--input={image_folder}', f'--output={output}',
                                      '--model=builtin:pnasnet_tiny', '--num_shards=2'])
  pipeline.run().wait_until_finish()
  summary = json.loads((output / 'run_summary.json').read_text())
  assert (summary['matched'], summary['embedded'], summary['failed'], summary['skipped']) == (
      len(list(image_folder.iterdir())), len(list(image_folder.iterdir())) - 3, 3, 0)
  assert summary['failed_by_stage'] == {'read': 0, 'decode': 3, 'inference': 0}
  assert sorted(os.path.basename(f) for f in summary['files']) == sorted(
      p.name for p in output.iterdir() if p.name != 'run_summary.json')
  assert len(read_examples(str(output), tmp_path)) == summary['embedded']


def test_no_summary_when_a_sink_fails(image_folder, tmp_path):
  """The summary waits for every sink: an output that cannot be written leaves none."""
  blocker = tmp_path / 'out'
  blocker.mkdir()
  (blocker / 'embeddings-00000-of-00001.tfrecord').mkdir()  # a folder where a shard must go
  pipeline = _build_without_launcher([f'--input={image_folder}/*.png', f'--output={blocker}',
                                      '--model=builtin:pnasnet_tiny'])
  with pytest.raises(Exception):
    pipeline.run().wait_until_finish()
  assert not (blocker / 'run_summary.json').exists()


def test_untrained_builtin_is_labelled_and_local_uris_are_absolute(image_folder, tmp_path,
                                                                  monkeypatch):
  monkeypatch.chdir(image_folder)
  output = str(tmp_path / 'out')
  summary = run(['--input=chelsea.png', f'--output={output}', '--model=builtin:pnasnet_tiny',
                 '--seed=7'])
  assert summary['model'] == 'builtin:pnasnet_tiny@untrained-seed7'
  [example] = read_examples(output, tmp_path)
  assert example.features.feature['model'].bytes_list.value == [
      b'builtin:pnasnet_tiny@untrained-seed7']
  assert example.features.feature['image/uri'].bytes_list.value == [
      str(image_folder / 'chelsea.png').encode()]


@pytest.mark.parametrize('args, error, message', [
    (['--input=/no/such/dir/*.jpg'], NoInputError, 'no file matches'),
    (['--model=/no/such/model'], ModelLoadError, 'neither a TF-Hub URL'),
    (['--min_batch_size=8', '--max_batch_size=4'], OptionsError, 'exceeds'),
    (['--center_crop_fraction=0'], OptionsError, 'center_crop_fraction'),
    (['--model=/some/module', '--checkpoint=/x/model.ckpt'], OptionsError, 'builtin'),
    (['--model=/some/module', '--compute_dtype=float16'], OptionsError, 'compute_dtype'),
])
def test_bad_options_fail_before_any_work(args, error, message, image_folder, tmp_path):
  base = {'input': f'{image_folder}/*.png', 'output': str(tmp_path / 'out'),
          'model': 'builtin:pnasnet_tiny'}
  for arg in args:
    base.pop(arg.split('=')[0][2:], None)
  argv = [f'--{k}={v}' for k, v in base.items()] + args
  with pytest.raises(error, match=message):
    run(argv)
  assert not (tmp_path / 'out').exists()


def test_oversized_file_is_dead_lettered_unread(image_folder, tmp_path):
  output = str(tmp_path / 'out')
  limit = (image_folder / 'camera.png').stat().st_size + 1
  summary = run([f'--input={image_folder}/*.png', f'--output={output}',
                 '--model=builtin:pnasnet_tiny', f'--max_file_bytes={limit}',
                 '--max_failed_fraction=1'])  # three of the four photos are over the limit
  failures = read_failures(output)
  too_large = sorted(p.name for p in image_folder.glob('*.png') if p.stat().st_size > limit)
  assert too_large and sorted(os.path.basename(f['uri']) for f in failures) == too_large
  assert {(f['stage'], f['error']) for f in failures} == {('read', 'FileTooLargeError')}
  assert summary['failed_by_stage']['read'] == len(too_large)
  assert summary['matched'] == 4 == summary['embedded'] + summary['failed']


def test_refuses_to_overwrite_an_earlier_run(image_folder, tmp_path):
  argv = [f'--input={image_folder}/camera.png', f'--output={tmp_path}/out',
          '--model=builtin:pnasnet_tiny']
  run(argv)
  with pytest.raises(OutputExistsError, match='choose a new --output'):
    run(argv)


def test_command_line_help_and_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=PROJECT)
  help_text = subprocess.run([sys.executable, 'run_pipeline.py', '--help'], cwd=PROJECT,
                             env=env, capture_output=True, text=True, check=True).stdout
  for flag in ('--input', '--output', '--model', '--checkpoint', '--max_batch_size',
               '--center_crop_fraction', '--num_shards', '--compression', '--large_model',
               '--model_copies', '--runner'):
    assert flag in help_text
  failed = subprocess.run([sys.executable, 'run_pipeline.py', '--input=/nothing/*.jpg',
                           f'--output={tmp_path}/o', '--model=builtin:pnasnet_tiny'],
                          cwd=PROJECT, env=env, capture_output=True, text=True)
  assert failed.returncode == 2
  assert 'error: no file matches' in failed.stderr


def test_dataflow_workers_get_the_project_setup_file():
  from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
  from pipeline.launcher import PROJECT_SETUP_FILE, _prepare_remote_workers

  dataflow = PipelineOptions(['--runner=DataflowRunner'])
  _prepare_remote_workers(dataflow)
  assert dataflow.view_as(SetupOptions).setup_file == PROJECT_SETUP_FILE
  assert os.path.exists(PROJECT_SETUP_FILE)
  own = PipelineOptions(['--runner=DataflowRunner', '--requirements_file=reqs.txt'])
  _prepare_remote_workers(own)
  assert own.view_as(SetupOptions).setup_file is None
  local = PipelineOptions([])
  _prepare_remote_workers(local)
  assert local.view_as(SetupOptions).setup_file is None
