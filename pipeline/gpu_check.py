"""GPU self-check (`pnasnet-embeddings check-gpu`): run it inside the worker container before
paying for a GPU job.

    docker run --gpus all --rm --entrypoint pnasnet-embeddings IMAGE check-gpu \
        --model /opt/pnasnet/model

Checks, in order, and stops at the first that fails (exit 1, with what to do):
TensorFlow is a CUDA build; it sees a GPU; the model loads with its variables on that GPU
(loaded as the workers load it, without forcing a device); one batch runs there and gives the
model's feature size; then the GPU step as a Dataflow VM runs it with --large_model: this process
holds the model, `--processes - 1` fresh processes decode photos and hand their batches over
through shared memory, and only the model's process may hold GPU memory (one line per process
says what it holds). Exit 2 when the model handle itself is wrong, as for the pipeline: checked
first, so a wrong model says so on a machine without a GPU too.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keep TensorFlow's start-up chatter out

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from apache_beam.utils.multi_process_shared import MultiProcessShared  # noqa: E402

from models.description import check_model_options, describe_model  # noqa: E402
from models.gpus import configure_gpus  # noqa: E402
from models.loading import load_embedding_model  # noqa: E402
from models.shared_batches import SharedBatchModel  # noqa: E402
from pipeline import check_gpu_caller  # noqa: E402


class CheckFailed(RuntimeError):
  """One check failed; the message says what is wrong and what to do."""


def check_cuda_build() -> str:
  info = tf.sysconfig.get_build_info()
  if not tf.test.is_built_with_cuda():
    raise CheckFailed(f'TensorFlow {tf.__version__} is not built with CUDA: install '
                      f'"tensorflow[and-cuda]=={tf.__version__}" (deploy/worker/Dockerfile does)')
  return (f'TensorFlow {tf.__version__}, CUDA {info.get("cuda_version")}, '
          f'cuDNN {info.get("cudnn_version")}')


def check_visible_gpus() -> list:
  gpus = configure_gpus()  # memory growth, as on the workers
  if not gpus:
    raise CheckFailed(
        'no GPU: TensorFlow sees no GPU on this machine. On Dataflow the accelerator must '
        'include install-nvidia-driver (e.g. "type:nvidia-l4;count:1;install-nvidia-driver"); '
        'locally run the container with --gpus all and check that nvidia-smi works; '
        f'CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}')
  names = []
  for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    names.append(f'{gpu.name} ({details.get("device_name", "?")}, compute capability '
                 f'{details.get("compute_capability", "?")})')
  return names


def check_model_on(device_type: str, model_handle: str, checkpoint=None, seed: int = 0,
                   compute_dtype: str = 'float32', batch_size: int = 4) -> str:
  """Loads the model as the workers do, then checks where it lives and one batch's output."""
  check_model_options(model_handle, checkpoint, compute_dtype)
  model_description = describe_model(model_handle, checkpoint, seed)
  embedding_model = load_embedding_model(model_handle, checkpoint, seed, compute_dtype)
  devices = embedding_model.devices()
  if not devices or not all(f'/device:{device_type}:' in d for d in devices):
    raise CheckFailed(f'{model_description.model_id} loaded on {devices}, not on a {device_type}')
  images = np.random.default_rng(0).random(
      (batch_size, model_description.height, model_description.width, 3), dtype=np.float32)
  started = time.monotonic()
  features = embedding_model.embed(images)
  seconds = time.monotonic() - started
  expected = (batch_size, model_description.feature_size)
  if features.shape != expected or not np.all(np.isfinite(features)):
    raise CheckFailed(f'one batch gave features of shape {features.shape} (finite: '
                      f'{bool(np.all(np.isfinite(features)))}); expected {expected}, finite')
  return (f'{model_description.model_id} on {", ".join(devices)}: a batch of {batch_size} '
          f'{model_description.height}x{model_description.width} images -> '
          f'{model_description.feature_size} features each, in {seconds:.2f} s (first call, '
          f'includes tracing)')


def gpu_memory_by_process() -> Optional[Dict[int, int]]:
  """MiB of GPU memory per process holding a CUDA context, from nvidia-smi; None without it.

  In a container nvidia-smi may list the host's process ids, so the check counts processes
  rather than matching ids."""
  nvidia_smi = shutil.which('nvidia-smi') or shutil.which('nvidia-smi',
                                                          path='/usr/local/nvidia/bin')
  if not nvidia_smi:
    return None
  listed = subprocess.run([nvidia_smi, '--query-compute-apps=pid,used_memory',
                           '--format=csv,noheader,nounits'], capture_output=True, text=True,
                          timeout=60, check=False)
  if listed.returncode != 0:
    return None
  used = {}
  for line in listed.stdout.splitlines():
    pid, _, mib = line.partition(',')
    if pid.strip().isdigit() and mib.strip().isdigit():
      used[int(pid)] = int(mib)
  return used


def _decoding_process(tag: str, height: int, width: int, batch_size: int, seed: int):
  """A fresh interpreter, as Dataflow starts an SDK process: it imports only what a decoding
  process of the GPU step imports (pipeline/check_gpu_caller.py)."""
  return subprocess.Popen(
      [sys.executable, '-m', check_gpu_caller.__name__, tag, str(height), str(width),
       str(batch_size), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_processes(processes: int, model_handle: str, checkpoint=None, seed: int = 0,
                    compute_dtype: str = 'float32', batch_size: int = 4,
                    device_type: str = 'GPU') -> List[str]:
  """The GPU step as a Dataflow VM runs it with --large_model: this process holds the shared
  model (as the first SDK process to take Beam's lock does), the others decode and embed through
  shared memory. One line per process; fails if a decoding process initialised TensorFlow's
  devices or if more processes than the model's hold GPU memory."""
  if processes < 2:
    raise CheckFailed(f'--processes {processes}: at least 2 (one model, one decoding)')
  model_description = describe_model(model_handle, checkpoint, seed)
  tag = f'pnasnet-check-gpu-{uuid.uuid4().hex}'

  def load():
    configure_gpus()
    return SharedBatchModel(load_embedding_model(model_handle, checkpoint, seed, compute_dtype))

  MultiProcessShared(load, tag=tag, always_proxy=True).acquire()  # served from this process
  callers = [_decoding_process(tag, model_description.height, model_description.width,
                               batch_size, index) for index in range(processes - 1)]
  reports = []
  for caller in callers:
    out, err = caller.communicate(timeout=1800)
    if caller.returncode != 0:
      raise CheckFailed(f'a decoding process failed (exit {caller.returncode}): '
                        f'{err.strip().splitlines()[-1] if err.strip() else "no message"}')
    reports.append(json.loads(out.strip().splitlines()[-1]))
  used = gpu_memory_by_process()
  lines = [f'model process {os.getpid()}: {_model_memory(device_type, used)}']
  for report in reports:
    if report['devices_initialised']:
      raise CheckFailed(f'decoding process {report["pid"]} initialised TensorFlow\'s devices: it '
                        'holds a CUDA context and GPU memory of its own')
    lines.append(f'decoding process {report["pid"]}: {report["images"]} photos decoded and '
                 f'embedded through shared memory, features {report["feature_shape"]}; '
                 'TensorFlow\'s devices never initialised: no CUDA context, no GPU memory')
  if used is not None and len(used) > 1:
    raise CheckFailed(f'{len(used)} processes hold GPU memory (MiB by process id, as '
                      f'nvidia-smi lists them: {used}); only the model\'s process should')
  return lines


def _model_memory(device_type: str, used: Optional[Dict[int, int]]) -> str:
  if device_type != 'GPU':
    return f'the model runs on the {device_type}'
  peak = tf.config.experimental.get_memory_info('GPU:0')['peak'] >> 20
  listed = (f'{sum(used.values())} MiB of GPU memory (nvidia-smi)' if used
            else 'nvidia-smi not found')
  return f'{listed}, TensorFlow\'s allocator peaked at {peak} MiB'
