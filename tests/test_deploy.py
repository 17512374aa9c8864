"""deploy/: the Flex Template's parameters and entry point, the images' pins, the GPU check."""

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
from packaging.specifiers import SpecifierSet

from pipeline.gpu_check import CheckFailed, check_model_on
from models.loading import load_embedding_model
from pipeline.options import EmbeddingOptions, OptionsError, validate

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(PROJECT, 'deploy')

# Project flags that are deliberately not template parameters.
NOT_PARAMETERS = {
    'no_wait': 'the template entry point always adds it: a template launch must never wait',
    'dataflow_job_file': 'it writes a file inside the launcher container, which nobody can read',
    'ended_job': 'a one-off override naming one dead job, given by hand after checking it',
}
# Values for the required parameters and the image ones, of which a launch gives one or both (they
# must also satisfy metadata.json's regexes).
REQUIRED_SAMPLES = {'input': 'gs://bucket/photos/**.jpg', 'output': 'gs://bucket/embeddings/{date}',
                    'input_manifest': 'gs://bucket/manifests/*.txt'}
IMAGE_PARAMETERS = ('input', 'input_manifest')
# Probes for the regexes: a value a regex accepts must be one the flag's type accepts.
PROBES = ('abc', '0', '-1', '1.5', '', 'true', 'float64', 'gzip', '64', '0.875')


def _read(*path) -> str:
  with open(os.path.join(PROJECT, *path)) as f:
    return f.read()


def _metadata() -> dict:
  return json.loads(_read('deploy', 'flex', 'metadata.json'))


def _project_flags() -> dict:
  """EmbeddingOptions' own argparse definitions, by name."""
  parser = argparse.ArgumentParser()
  EmbeddingOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  actions = parser._actions  # pylint: disable=protected-access
  return {a.dest: a for a in actions if a.option_strings and a.dest != 'help'}


def _beam_flags() -> set:
  parser = _BeamArgumentParser(allow_abbrev=False)
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return {a.dest for a in parser._actions if a.option_strings}  # pylint: disable=protected-access


def _entry_point():
  spec = importlib.util.spec_from_file_location('flex_main',
                                                os.path.join(DEPLOY, 'flex', 'main.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_template_parameters_are_exactly_the_launchers_flags():
  parameters = {p['name']: p for p in _metadata()['parameters']}
  project = _project_flags()
  not_flags = set(parameters) - set(project) - _beam_flags()
  assert not not_flags, f'metadata.json declares parameters the launcher refuses: {not_flags}'
  missing = set(project) - set(parameters) - set(NOT_PARAMETERS)
  assert not missing, (f'flags with no template parameter: {sorted(missing)}; declare them in '
                       'deploy/flex/metadata.json or justify them in NOT_PARAMETERS')
  assert not set(NOT_PARAMETERS) & set(parameters)
  for parameter in parameters.values():
    assert parameter['label'] and parameter['helpText'] and 'isOptional' in parameter


def test_required_parameters_are_what_validation_requires():
  """Required: what every run needs; the images are one of input and input_manifest, both
  optional in the template (a scheduled run from a manifest alone lists nothing)."""
  parameters = {p['name']: p for p in _metadata()['parameters']}
  required = {name for name, p in parameters.items() if not p['isOptional']}
  assert all(parameters[name]['isOptional'] for name in IMAGE_PARAMETERS)

  def check(names):
    options = PipelineOptions([f'--{name}={REQUIRED_SAMPLES[name]}' for name in sorted(names)])
    validate(options.view_as(EmbeddingOptions), options)

  for images in ({'input'}, {'input_manifest'}, set(IMAGE_PARAMETERS)):
    check(required | images)  # the required parameters and either image parameter: valid
  with pytest.raises(OptionsError, match='--input.*--input_manifest'):
    check(required)
  for name in required:  # and each required one is needed
    with pytest.raises(OptionsError, match=f'--{name}'):
      check(required - {name} | {'input'})


def _accepted_by_type(action, text: str) -> bool:
  if action.nargs == 0:  # an on/off flag: the entry point takes true or false
    return text in ('true', 'false')
  try:
    value = action.type(text) if action.type else text
  except (ValueError, argparse.ArgumentTypeError):
    return False
  return action.choices is None or value in action.choices


def _matches(parameter: dict, text: str) -> bool:
  return all(re.fullmatch(regex, text) for regex in parameter.get('regexes', []))


def test_regexes_accept_the_flags_values_and_nothing_their_types_refuse():
  project = _project_flags()
  for parameter in _metadata()['parameters']:
    name = parameter['name']
    if name in REQUIRED_SAMPLES:
      assert _matches(parameter, REQUIRED_SAMPLES[name]), name
    if name not in project:
      continue
    action = project[name]
    if action.nargs == 0:
      good = ['true', 'false']
    elif action.choices:
      good = list(action.choices)
    else:
      good = [] if action.default is None else [str(action.default)]
    for text in good:
      assert _matches(parameter, text), f'{name}: its regexes refuse {text!r}'
    for text in PROBES:
      if _matches(parameter, text):
        assert _accepted_by_type(action, text), f'{name}: regexes accept {text!r}, the flag not'


def test_entry_point_never_waits_and_passes_switches_and_the_worker_image():
  flex = _entry_point()
  switches = flex.switch_flags()
  assert {'--large_model', '--jpeg_draft', '--save_main_session'} <= switches
  argv = flex.template_argv(
      ['--input=gs://b/p/*.jpg', '--output=gs://b/e', '--large_model=true', '--jpeg_draft=false',
       '--max_batch_size=64'], {'PNASNET_WORKER_IMAGE': 'us-docker.pkg.dev/p/r/worker:1'},
      switches)
  assert argv == ['--input=gs://b/p/*.jpg', '--output=gs://b/e', '--large_model',
                  '--max_batch_size=64', '--sdk_container_image=us-docker.pkg.dev/p/r/worker:1',
                  '--no_wait']
  options = PipelineOptions(argv).view_as(EmbeddingOptions)
  assert (options.large_model, options.jpeg_draft, options.max_batch_size) == (True, False, 64)
  own_image = flex.template_argv(['--sdk_container_image=mine', '--no_wait'],
                                 {'PNASNET_WORKER_IMAGE': 'built'}, switches)
  assert own_image == ['--sdk_container_image=mine', '--no_wait']
  with pytest.raises(SystemExit, match='true or false'):
    flex.template_argv(['--large_model=maybe'], {}, switches)


def test_a_template_launch_from_a_manifest_alone(gcs_server, tmp_path):
  """What Dataflow does with a launch's parameters (checked against metadata.json), then the
  entry point, as the template launcher runs it, on the Dataflow runner's dry run."""
  gcs_server.create_bucket('template-manifest')
  gcs_server.upload('gs://template-manifest/photos/a.png',
                    _read_bytes('sample_images', 'camera.png'))
  gcs_server.upload('gs://template-manifest/manifests/night.txt',
                    b'# tonight\ngs://template-manifest/photos/a.png\n')
  launch = {'input_manifest': 'gs://template-manifest/manifests/*.txt',
            'output': 'gs://template-manifest/embeddings/{date}', 'model': 'builtin:pnasnet_mobile'}
  parameters = {p['name']: p for p in _metadata()['parameters']}
  assert {name for name, p in parameters.items() if not p['isOptional']} <= set(launch)
  assert all(_matches(parameters[name], value) for name, value in launch.items())
  result = subprocess.run(
      [sys.executable, os.path.join(DEPLOY, 'flex', 'main.py')] +
      [f'--{name}={value}' for name, value in launch.items()] +
      ['--runner=DataflowRunner', '--dry_run=True', '--project=test', '--region=us-central1',
       '--temp_location=gs://template-manifest/tmp'],
      cwd=PROJECT, env=dict(os.environ, PYTHONPATH=PROJECT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'nothing submitted, nothing written' in result.stdout
  assert gcs_server.list('gs://template-manifest/embeddings/') == []


def _read_bytes(*path) -> bytes:
  with open(os.path.join(PROJECT, *path), 'rb') as f:
    return f.read()


def _setup_pins() -> dict:
  setup = _read('setup.py')
  return {
      'beam': re.search(r"'apache-beam(?:\[[^\]]*\])?==([^']+)'", setup).group(1),
      'tensorflow': re.search(r"'tensorflow==([^']+)'", setup).group(1),
      'python_requires': re.search(r"python_requires='([^']+)'", setup).group(1),
      'packages': re.findall(r"'(\w+)'", re.search(r'include=\[([^\]]*)\]', setup).group(1)),
  }


def test_dockerfiles_pin_what_setup_py_pins():
  pins = _setup_pins()
  worker = _read('deploy', 'worker', 'Dockerfile')
  flex = _read('deploy', 'flex', 'Dockerfile')
  python, beam = re.search(r'^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)$', worker, re.M).groups()
  assert beam == pins['beam']
  assert re.findall(r'tensorflow\[and-cuda\]==([\w.]+)', worker) == [pins['tensorflow']]
  assert python in SpecifierSet(pins['python_requires'])
  launcher_python = re.search(r'python(\d)(\d+)-template-launcher-base', flex).groups()
  assert '.'.join(launcher_python) == python
  assert re.search(r'^FROM \$\{WORKER_IMAGE\}$', flex, re.M), 'the flex image extends the worker'
  copied = {source.rstrip('/') for sources in re.findall(r'^COPY (?!--from)(.+) \S+$', worker, re.M)
            for source in sources.split()}
  assert set(pins['packages']) <= copied, 'the worker image must copy every package setup.py has'


def test_docker_copy_sources_exist_and_cloud_build_builds_both_images():
  for dockerfile in ('deploy/worker/Dockerfile', 'deploy/flex/Dockerfile'):
    text = _read(dockerfile)
    for sources in re.findall(r'^COPY (?!--from)(.+) \S+$', text, re.M):
      for source in sources.split():
        assert os.path.exists(os.path.join(PROJECT, source)), f'{dockerfile}: COPY {source}'
  ignored = _read('.gcloudignore').splitlines()
  assert not {'deploy/', 'pipeline/', 'setup.py'} & set(ignored)
  build = yaml.safe_load(_read('deploy', 'cloudbuild.yaml'))
  docker_steps = {}
  for step in build['steps']:
    args = step['args']
    if step['name'].endswith('/docker') and args[0] == 'build':
      options = dict(a[2:].split('=', 1) for a in args if a.startswith('--'))
      docker_steps[options['file']] = options
  worker = docker_steps['deploy/worker/Dockerfile']
  flex = docker_steps['deploy/flex/Dockerfile']
  assert flex['build-arg'] == f"WORKER_IMAGE={worker['tag']}"
  assert set(build['images']) == {worker['tag'], flex['tag']}
  for dockerfile, options in docker_steps.items():
    argument = options['build-arg'].split('=')[0]
    assert re.search(rf'^ARG {argument}\b', _read(dockerfile), re.M), (dockerfile, argument)


def test_gpu_self_check_without_a_gpu_exits_non_zero_and_says_so():
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='-1', PYTHONPATH=PROJECT)
  result = subprocess.run([sys.executable, '-m', 'commands', 'check-gpu', '--model',
                           'builtin:pnasnet_tiny'], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  assert 'FAILED: no GPU' in result.stderr
  assert 'ok: TensorFlow' in result.stdout  # the CUDA build check ran first and passed


def test_model_check_loads_as_workers_do_and_runs_one_batch(tf1_hub_module):
  report = check_model_on('CPU', tf1_hub_module, batch_size=2)
  assert 'device:CPU:0' in report and '-> 160 features' in report
  with pytest.raises(CheckFailed, match='not on a GPU'):
    check_model_on('GPU', tf1_hub_module, batch_size=2)


def test_model_load_logs_its_device(tf1_hub_module, caplog):
  with caplog.at_level(logging.INFO):
    model = load_embedding_model(tf1_hub_module)
  assert model.devices() == ['/job:localhost/replica:0/task:0/device:CPU:0']
  assert f'model {tf1_hub_module} loaded on /job:localhost/replica:0/task:0/device:CPU:0' in \
      caplog.text
