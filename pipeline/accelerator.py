"""`--inference_accelerator`: Dataflow's right-fitting accelerator hint, checked before any work.

Dataflow's grammar (its "right fitting" and "GPUs" pages) is
`type:GPU_TYPE;count:N;machine_type:MACHINE_TYPE;CONFIGURATION_OPTIONS`, the machine type optional
and the options among `install-nvidia-driver` (optionally `:VERSION`, e.g. `:latest`) and
`use_nvidia_mps`. Without `machine_type` the GPU workers take the job's worker machine type, so a
GPU that attaches only to one machine family (L4 to G2) fails there at start-up; a machine type
known here that cannot hold the GPU is refused instead, and a hint that names none is warned
about (a template's environment may set the job's machine type where the launcher cannot see it).
"""

import re
from typing import List, Optional

# deploy/flex/metadata.json carries the same pattern (tests/test_accelerator.py compares them).
ACCELERATOR = re.compile(r'^type:[a-z0-9-]+;count:[1-9][0-9]*(;machine_type:[a-z0-9-]+)?'
                         r'(;(install-nvidia-driver(:[a-z0-9.-]+)?|use_nvidia_mps))*$')
EXAMPLE = 'type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver'

# The machine family each GPU attaches to on Compute Engine ("GPU machine types").
MACHINE_FAMILIES = {
    'nvidia-l4': 'g2',
    'nvidia-tesla-t4': 'n1',
    'nvidia-tesla-p4': 'n1',
    'nvidia-tesla-p100': 'n1',
    'nvidia-tesla-v100': 'n1',
    'nvidia-tesla-a100': 'a2',
    'nvidia-a100-80gb': 'a2',
    'nvidia-h100-80gb': 'a3',
    'nvidia-h100-mega-80gb': 'a3',
}
EXAMPLE_MACHINES = {'g2': 'g2-standard-8', 'n1': 'n1-standard-8', 'a2': 'a2-highgpu-1g',
                    'a3': 'a3-highgpu-1g'}
DATAFLOW_DEFAULT_MACHINE_TYPE = 'n1-standard-1'  # a batch job's workers without --machine_type


WORKER_IMAGE_RECIPE = 'deploy/worker/Dockerfile'
# Beam's own SDK images (what Dataflow uses without --sdk_container_image) hold no CUDA.
BEAM_IMAGE_PREFIXES = ('apache/beam_python', 'gcr.io/cloud-dataflow/v1beta3/beam_python')


def image_problem(image: Optional[str], flag: str) -> Optional[str]:
  """Without a worker image holding TensorFlow with CUDA, Dataflow's GPU VMs pip-install the
  project into Beam's default container and embed on their CPUs while the GPUs are billed."""
  if image and not image.startswith(BEAM_IMAGE_PREFIXES):
    return None
  given = f'--sdk_container_image {image} is Beam\'s own image, which' if image else (
      'without --sdk_container_image the workers run Beam\'s own image, which')
  return (f'{flag} on Dataflow: {given} has no CUDA, so TensorFlow would run on the CPUs of the '
          f'GPU workers; build the worker image from {WORKER_IMAGE_RECIPE} (docs/dataflow.md, '
          '"Build the images") and pass it as --sdk_container_image')


def gpu_count(hint: str) -> int:
  """The hint's `count`, 1 if it names none."""
  count = _field(hint, 'count')
  return int(count) if count and count.isdigit() else 1


def _field(hint: str, name: str) -> Optional[str]:
  for part in hint.split(';'):
    if part.startswith(name + ':'):
      return part[len(name) + 1:]
  return None


def accelerator_problems(hint: str, job_machine_type: Optional[str]) -> List[str]:
  """What is wrong with `hint` for GPU workers, [] when nothing is."""
  flag = f'--inference_accelerator {hint!r}'
  if not ACCELERATOR.match(hint):
    return [f'{flag}: expected "type:GPU_TYPE;count:N[;machine_type:MACHINE_TYPE]'
            f'[;install-nvidia-driver[:VERSION]][;use_nvidia_mps]", e.g. "{EXAMPLE}"']
  problems = []
  options = [part.split(':', 1)[0] for part in hint.split(';')[2:]]
  repeated = sorted({option for option in options if options.count(option) > 1})
  if repeated:
    problems.append(f'{flag}: {", ".join(repeated)} given more than once')
  if 'install-nvidia-driver' not in options:
    problems.append(f'{flag}: add install-nvidia-driver, or Dataflow installs no NVIDIA driver '
                    'and TensorFlow sees no GPU')
  if 'use_nvidia_mps' in options and _field(hint, 'count') != '1':
    problems.append(f'{flag}: Dataflow supports use_nvidia_mps only with count:1')
  gpu = _field(hint, 'type')
  family = MACHINE_FAMILIES.get(gpu)
  machine_type = _field(hint, 'machine_type')
  chosen = machine_type or job_machine_type
  if family and chosen and chosen.split('-', 1)[0] != family:
    where = 'its machine_type' if machine_type else 'the job\'s --worker_machine_type'
    problems.append(
        f'{flag}: {gpu} attaches only to {family.upper()} machine types, and the GPU workers '
        f'would get {chosen} ({where}); put a {family.upper()} type in the hint, e.g. '
        f'machine_type:{EXAMPLE_MACHINES[family]}, so only the GPU step runs on it')
  return problems


def machine_type_unknown(hint: str, job_machine_type: Optional[str]) -> Optional[str]:
  """A warning when nothing here names the GPU workers' machine type: they get the job's (set
  outside the launcher, e.g. a template's environment) or Dataflow's default,
  n1-standard-1, which holds no GPU but an N1 one."""
  gpu = _field(hint, 'type')
  if _field(hint, 'machine_type') or job_machine_type or gpu not in MACHINE_FAMILIES:
    return None
  family = MACHINE_FAMILIES[gpu]
  return (f'--inference_accelerator names no machine_type: the GPU workers get the job\'s '
          f'machine type, or {DATAFLOW_DEFAULT_MACHINE_TYPE} if none is set; {gpu} needs '
          f'{family.upper()} (e.g. machine_type:{EXAMPLE_MACHINES[family]})')
