"""The project's flags, beside Beam's own in `--help` (`--runner` and the rest pass through)."""

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.models import (COMPUTE_DTYPES, DEFAULT_MODEL, ModelLoadError,
                               check_model_options)
from transforms.read import DEFAULT_MAX_FILE_BYTES
from transforms.write import COMPRESSIONS

PILLOW_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


class OptionsError(ValueError):
  """A flag's value cannot work; raised before any work starts."""


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text} is not a positive whole number')
  return value


class EmbeddingOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    group = parser.add_argument_group('PNASNet embeddings')
    group.add_argument(
        '--input', nargs='+', default=None,
        help='One or more glob patterns or URIs of images on any Beam FileSystem, e.g. '
        '"gs://bucket/photos/**.jpg" sample_images/*.png.')
    group.add_argument(
        '--output', default=None,
        help='Output directory or prefix (local or gs://) for embeddings-*.tfrecord, '
        'failures-*.jsonl and run_summary.json. Must not hold an earlier run.')
    group.add_argument(
        '--model', default=DEFAULT_MODEL,
        help='TF-Hub handle, a local or gs:// directory with a TF1-Hub-format module or TF2 '
        'SavedModel, or builtin:pnasnet_large / builtin:pnasnet_mobile. Default: %(default)s')
    group.add_argument(
        '--checkpoint', default=None,
        help='TF-Slim checkpoint prefix for a builtin: model, e.g. '
        'gs://bucket/pnasnet-5_large_2017_12_13/model.ckpt. Without it the builtin weights are '
        'seeded and UNTRAINED, and the output says so.')
    group.add_argument('--seed', type=int, default=0,
                       help='Seed of the untrained builtin weights (no --checkpoint).')
    group.add_argument('--compute_dtype', choices=COMPUTE_DTYPES, default='float32',
                       help='Compute dtype of a builtin: model (float16/bfloat16 for GPU '
                       'workers); features are float32 either way.')
    group.add_argument('--min_batch_size', type=_positive_int, default=1,
                       help='Smallest inference batch Beam may form.')
    group.add_argument('--max_batch_size', type=_positive_int, default=16,
                       help='Largest inference batch (images per model call).')
    group.add_argument('--center_crop_fraction', type=float, default=1.0,
                       help='Central fraction of height and width kept before resizing, in '
                       '(0, 1]; 1.0 keeps the whole image.')
    group.add_argument('--num_shards', type=int, default=0,
                       help='Embedding and failure files to write; 0 lets the runner decide.')
    group.add_argument('--compression', choices=sorted(COMPRESSIONS), default='none',
                       help='gzip writes embeddings-*.tfrecord.gz.')
    group.add_argument('--large_model', action='store_true', default=False,
                       help='One model per VM shared by all its processes (Beam\'s '
                       'share_model_across_processes), for GPU workers.')
    group.add_argument('--model_copies', type=_positive_int, default=None,
                       help='Exactly this many models per VM (implies sharing across '
                       'processes), e.g. one per GPU.')
    group.add_argument('--max_image_pixels', type=_positive_int,
                       default=PILLOW_MAX_IMAGE_PIXELS,
                       help='Decompression-bomb limit: larger images go to the dead letter.')
    group.add_argument('--max_file_bytes', type=_positive_int, default=DEFAULT_MAX_FILE_BYTES,
                       help='Files larger than this are not read; they go to the dead letter.')
    group.add_argument('--jpeg_draft', action='store_true', default=False,
                       help='Let Pillow decode large JPEGs at reduced size (faster, '
                       'slightly different pixels; see README).')
    group.add_argument('--jit_compile', action='store_true', default=False,
                       help='Compile a builtin: model with XLA (for GPU workers; slow on CPUs), '
                       'once per batch size, batches padded to powers of two up to '
                       '--max_batch_size.')


def validate(options: EmbeddingOptions) -> None:
  """Everything that can be checked without touching storage or the model."""
  problems = []
  if not options.input:
    problems.append('--input is required: one or more glob patterns, e.g. '
                    '--input "gs://bucket/photos/*.jpg"')
  if not options.output:
    problems.append('--output is required: a directory such as gs://bucket/embeddings/run1')
  if options.min_batch_size > options.max_batch_size:
    problems.append(f'--min_batch_size {options.min_batch_size} exceeds --max_batch_size '
                    f'{options.max_batch_size}')
  if not 0.0 < options.center_crop_fraction <= 1.0:
    problems.append(f'--center_crop_fraction {options.center_crop_fraction} must be in (0, 1]')
  if options.num_shards < 0:
    problems.append('--num_shards must be 0 (runner decides) or more')
  try:
    check_model_options(options.model, options.checkpoint, options.compute_dtype)
  except ModelLoadError as exc:
    problems.append(str(exc))
  if problems:
    raise OptionsError('\n'.join(problems))
