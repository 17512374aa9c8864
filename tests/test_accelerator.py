"""--inference_accelerator: Dataflow's right-fitting grammar, machine families, the template."""

import json
import os
import re

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.accelerator import ACCELERATOR, accelerator_problems
from pipeline.options import EmbeddingOptions, OptionsError, validate

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ['--input=gs://b/photos/*.jpg', '--output=gs://b/emb/run1']


def _template_regexes():
  with open(os.path.join(PROJECT, 'deploy', 'flex', 'metadata.json')) as f:
    parameters = {p['name']: p for p in json.load(f)['parameters']}
  return parameters['inference_accelerator']['regexes']


def _validate(*args):
  options = PipelineOptions(REQUIRED + list(args))
  validate(options.view_as(EmbeddingOptions), options)


@pytest.mark.parametrize('hint', [
    'type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver',
    'type:nvidia-l4;count:1;machine_type:g2-standard-16;install-nvidia-driver:latest',
    'type:nvidia-tesla-t4;count:1;machine_type:n1-standard-8;install-nvidia-driver;use_nvidia_mps',
    'type:nvidia-tesla-t4;count:2;machine_type:n1-highmem-16;install-nvidia-driver:550.90.07',
    'type:nvidia-tesla-a100;count:1;machine_type:a2-highgpu-1g;install-nvidia-driver',
    'type:nvidia-some-future-gpu;count:1;install-nvidia-driver',  # no known family: not judged
    'type:nvidia-l4;count:1;install-nvidia-driver',  # the job's machine type is not known here
])
def test_documented_hints_are_accepted_by_the_launcher_and_the_template(hint):
  assert accelerator_problems(hint, job_machine_type=None) == []
  _validate(f'--inference_accelerator={hint}')
  assert all(re.fullmatch(regex, hint) for regex in _template_regexes())


@pytest.mark.parametrize('hint, message', [
    ('nvidia-l4', 'expected "type:GPU_TYPE;count:N'),
    ('type:nvidia-l4;count:0;machine_type:g2-standard-8;install-nvidia-driver', 'expected'),
    ('type:nvidia-l4;machine_type:g2-standard-8;count:1;install-nvidia-driver', 'expected'),
    ('type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver;mps', 'expected'),
    ('type:nvidia-l4;count:1;machine_type:g2-standard-8', 'add install-nvidia-driver'),
    ('type:nvidia-l4;count:1;machine_type:n1-standard-8;install-nvidia-driver',
     'nvidia-l4 attaches only to G2 machine types'),
    ('type:nvidia-tesla-t4;count:1;machine_type:g2-standard-8;install-nvidia-driver',
     'machine_type:n1-standard-8'),
    ('type:nvidia-tesla-t4;count:2;machine_type:n1-standard-8;install-nvidia-driver;'
     'use_nvidia_mps', 'use_nvidia_mps only with count:1'),
    ('type:nvidia-tesla-t4;count:1;install-nvidia-driver;install-nvidia-driver:latest',
     'given more than once'),
])
def test_hints_that_cannot_start_gpu_workers_fail_before_any_work(hint, message):
  with pytest.raises(OptionsError, match=re.escape(message)):
    _validate(f'--inference_accelerator={hint}')


def test_without_machine_type_the_jobs_worker_machine_type_is_judged():
  hint = 'type:nvidia-l4;count:1;install-nvidia-driver'
  with pytest.raises(OptionsError, match=re.escape("n1-standard-8 (the job's --worker_machine")):
    _validate(f'--inference_accelerator={hint}', '--worker_machine_type=n1-standard-8')
  _validate(f'--inference_accelerator={hint}', '--worker_machine_type=g2-standard-8')


def test_a_hint_without_any_machine_type_is_warned_about(caplog):
  hint = 'type:nvidia-l4;count:1;install-nvidia-driver'
  _validate(f'--inference_accelerator={hint}')  # the template's environment may set it
  assert 'names no machine_type' in caplog.text and 'machine_type:g2-standard-8' in caplog.text
  caplog.clear()
  _validate('--inference_accelerator=type:nvidia-l4;count:1;machine_type:g2-standard-8;'
            'install-nvidia-driver')
  assert 'names no machine_type' not in caplog.text


def test_template_regex_is_the_launchers():
  assert _template_regexes() == [ACCELERATOR.pattern]
