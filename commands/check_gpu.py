"""`pnasnet-embeddings check-gpu`: the GPU self-check (pipeline/gpu_check.py), run inside the
worker container before paying for a GPU job.

    docker run --gpus all --rm --entrypoint pnasnet-embeddings IMAGE check-gpu \
        --model /opt/pnasnet/model

Exit 0 every check passed, 1 a check failed (with what to do), 2 the model handle itself is wrong
(checked first, so a wrong model says so on a machine without a GPU too).
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from commands.common import DONE, FAILED, REFUSED, parse, verb_parser

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keep TensorFlow's start-up chatter out


def _positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of 1 or more')
  return int(text)


def build_parser() -> argparse.ArgumentParser:
  from models.handles import COMPUTE_DTYPES, DEFAULT_MODEL_HANDLE
  parser = verb_parser('check-gpu', __doc__.split('\n\n')[0], epilog=None)
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
  parser.add_argument('--processes', type=_positive_int, default=os.cpu_count(),
                      help='SDK processes to start, as Dataflow starts one per vCPU (one holds '
                      'the model, the others decode)')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, _ = parse(build_parser(), argv, passes_to_beam=False)
  from models.description import check_model_options, describe_model
  from models.handles import ModelLoadError
  from pipeline import gpu_check  # TensorFlow: once the flags are read
  try:  # a wrong model is the user's to fix (exit 2) whether or not this machine has a GPU
    check_model_options(args.model, args.checkpoint, args.compute_dtype)
    describe_model(args.model, args.checkpoint, args.seed)
  except ModelLoadError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return REFUSED
  try:
    print(f'ok: {gpu_check.check_cuda_build()}')
    for gpu in gpu_check.check_visible_gpus():
      print(f'ok: sees {gpu}')
    print('ok: ' + gpu_check.check_model_on('GPU', args.model, args.checkpoint, args.seed,
                                            args.compute_dtype, args.batch_size))
    for line in gpu_check.check_processes(args.processes, args.model, args.checkpoint,
                                          args.seed, args.compute_dtype, args.batch_size):
      print(f'ok: {line}')
  except gpu_check.CheckFailed as exc:
    print(f'FAILED: {exc}', file=sys.stderr)
    return FAILED
  except ModelLoadError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return REFUSED
  print('GPU self-check passed')
  return DONE
