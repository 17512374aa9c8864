"""GPU self-check: run it inside the worker container before paying for a GPU job.

    docker run --gpus all --rm --entrypoint python IMAGE -m models.check_gpu \
        --model /opt/pnasnet/model

Checks, in order, and stops at the first that fails (exit 1, with what to do):
TensorFlow is a CUDA build; it sees a GPU; the model loads with its variables on that GPU
(loaded as the workers load it, without forcing a device); one batch runs there and gives the
model's feature size. Exit 2 when the model handle itself is wrong, as for the pipeline: checked
first, so a wrong model says so on a machine without a GPU too.
"""

import argparse
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keep TensorFlow's start-up chatter out

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.description import check_model_options, describe_model  # noqa: E402
from models.gpus import configure_gpus  # noqa: E402
from models.handles import COMPUTE_DTYPES, DEFAULT_MODEL_HANDLE, ModelLoadError  # noqa: E402
from models.loading import load_embedding_model  # noqa: E402


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


def _positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of 1 or more')
  return int(text)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m models.check_gpu',
                                   description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--model', default=DEFAULT_MODEL_HANDLE,
                      help='the model handle the job will use: a TF-Hub handle, a module or '
                      'SavedModel directory, or builtin:pnasnet_large')
  parser.add_argument('--checkpoint', default=None,
                      help='the TF-Slim checkpoint prefix the job will use with a builtin: model')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the untrained builtin weights, as the job would use it '
                      '(without a checkpoint)')
  parser.add_argument('--compute_dtype', choices=COMPUTE_DTYPES, default='float32',
                      help='compute dtype of a builtin: model, as the job will use it '
                      '(float16 or bfloat16 for mixed precision on GPUs)')
  parser.add_argument('--batch_size', type=_positive_int, default=4,
                      help='images in the one test batch run on the GPU (the job\'s '
                      'max_batch_size shows whether its batches fit in GPU memory)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:  # a wrong model is the user's to fix (exit 2) whether or not this machine has a GPU
    check_model_options(args.model, args.checkpoint, args.compute_dtype)
    describe_model(args.model, args.checkpoint, args.seed)
  except ModelLoadError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  try:
    print(f'ok: {check_cuda_build()}')
    for gpu in check_visible_gpus():
      print(f'ok: sees {gpu}')
    print('ok: ' + check_model_on('GPU', args.model, args.checkpoint, args.seed,
                                  args.compute_dtype, args.batch_size))
  except CheckFailed as exc:
    print(f'FAILED: {exc}', file=sys.stderr)
    return 1
  except ModelLoadError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  print('GPU self-check passed')
  return 0


if __name__ == '__main__':
  sys.exit(main())
