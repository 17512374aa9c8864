"""deploy/ for GPU workers: pinned CUDA wheels, memory growth, no reinstall, recipes that can start."""

import glob
import importlib.metadata
import os
import re

from packaging.requirements import Requirement

from pipeline.accelerator import accelerator_problems

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path) -> str:
  with open(os.path.join(PROJECT, *path)) as f:
    return f.read()


def _recipes() -> dict:
  """Every file that tells a user how to launch: the manual's pages (not the flags' reference,
  whose examples show each flag's syntax), the deploy files."""
  paths = (['README.md'] + [path for path in glob.glob('docs/*.md', root_dir=PROJECT)
                            if path != 'docs/flags.md']
           + glob.glob('deploy/**/*.md', root_dir=PROJECT, recursive=True)
           + ['deploy/airflow/pnasnet_embeddings_dag.py'])
  return {path: _read(path) for path in paths}


def _constraints() -> dict:
  pins = {}
  for line in _read('deploy', 'worker', 'cuda-constraints.txt').splitlines():
    if line.strip() and not line.startswith('#'):
      requirement = Requirement(line)
      (specifier,) = requirement.specifier
      assert specifier.operator == '==', line
      pins[requirement.name] = specifier.version
  return pins


def test_every_cuda_wheel_of_tensorflow_is_pinned_within_its_range():
  setup_pin = re.search(r"'tensorflow==([^']+)'", _read('setup.py')).group(1)
  assert importlib.metadata.version('tensorflow') == setup_pin  # the ranges below are its own
  cuda = [Requirement(r) for r in importlib.metadata.requires('tensorflow')
          if 'and-cuda' in r]
  pins = _constraints()
  assert {r.name for r in cuda} == set(pins), 'pin exactly the and-cuda requirements'
  for requirement in cuda:
    assert pins[requirement.name] in requirement.specifier, (requirement, pins[requirement.name])


def test_worker_image_builds_with_the_constraints_and_sets_memory_growth():
  worker = _read('deploy', 'worker', 'Dockerfile')
  copied = re.search(r'^COPY (\S*cuda-constraints\.txt) (\S+)$', worker, re.M)
  assert copied and copied.group(1) == 'deploy/worker/cuda-constraints.txt'
  destination = copied.group(2).rstrip('/')
  installs = re.findall(r'^RUN pip install ((?:.*\\\n)*.*)$', worker, re.M)
  tensorflow_install = [line for line in installs if 'tensorflow[and-cuda]' in line]
  assert len(tensorflow_install) == 1
  constraint = re.search(r'(?:-c|--constraint)[ =](\S+)', tensorflow_install[0]).group(1)
  assert constraint in ('cuda-constraints.txt', destination,
                        f'{destination}/cuda-constraints.txt'), constraint
  assert re.search(r'^ENV TF_FORCE_GPU_ALLOW_GROWTH=true$', worker, re.M)


def test_same_image_template_does_not_reinstall_the_project():
  flex = _read('deploy', 'flex', 'Dockerfile')
  assert not re.search(r'^ENV FLEX_TEMPLATE_PYTHON_(SETUP|REQUIREMENTS)_FILE', flex, re.M)
  assert re.search(r'^FROM \$\{WORKER_IMAGE\}$', flex, re.M)


def test_recipes_fix_no_shard_count_and_give_a_disk_size():
  recipes = _recipes()
  for path, text in recipes.items():
    assert not re.search(r'num_shards[=" :]+[1-9]', text), f'{path} fixes --num_shards'
  dag = recipes['deploy/airflow/pnasnet_embeddings_dag.py']
  assert re.search(r"'diskSizeGb': [1-9]", dag)
  every_launch = '\n'.join(recipes.values())
  assert re.search(r'disk_size_gb=[1-9]', every_launch)  # the gcloud launch (template parameter)
  assert re.search(r'"diskSizeGb": [1-9]', every_launch)  # the Cloud Scheduler request


def test_every_accelerator_in_the_recipes_can_start_gpu_workers():
  """The README's, the docs' and the DAG's inference accelerators, as the launcher judges them."""
  found = []
  for path, text in _recipes().items():
    for match in re.finditer(r'inference_accelerator[\'"]?[=: ]+\(?[\'"]?(type:(?:[\'"]\s*[\'"]|'
                             r'[^"\'\s),])+)', text):
      hint = re.sub(r'[\'"]\s*[\'"]', '', match.group(1))  # Python's implicit concatenation
      found.append(hint)
      assert accelerator_problems(hint, job_machine_type=None) == [], (path, hint)
  assert any('nvidia-l4' in h and 'machine_type:g2-' in h for h in found), found
  assert any('nvidia-tesla-t4' in h and 'machine_type:n1-' in h for h in found), found
