"""The project's flags, beside Beam's own (`--runner` and the rest pass through)."""

import argparse
import datetime
import logging
import re

import apache_beam as beam
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, WorkerOptions)

from models.description import check_model_options
from models.handles import COMPUTE_DTYPES, DEFAULT_MODEL_HANDLE, IMAGE_INPUT, ModelLoadError
from pipeline.accelerator import EXAMPLE as ACCELERATOR_EXAMPLE
from pipeline.accelerator import (accelerator_problems, gpu_count, image_problem,
                                  machine_type_unknown)
from pipeline.beam_flags import OptionsError
from run_format import EMBEDDING_DTYPES
from transforms.decode import DEFAULT_MAX_IMAGE_PIXELS
from transforms.read import DEFAULT_MAX_FILE_BYTES
from storage.members import DEFAULT_IMAGE_FEATURE, PARQUET, TFRECORD
from transforms.shards import AUTO, INPUT_FORMATS, ShardInputs
from transforms.write import COMPRESSIONS, OUTPUT_FORMATS

MAX_SEED = 2**32 - 1
OUTPUT_PLACEHOLDERS = {'date': '%Y-%m-%d', 'datetime': '%Y-%m-%dT%H%M%SZ'}




MIN_CENTER_CROP_FRACTION = 0.1  # a tenth of each side: the crop is already upscaled 10x or more
DEFAULT_MAX_FAILED_FRACTION = 0.5


def _positive_int(text: str) -> int:
  """argparse names the type function in its own message ("invalid _positive_int value"), so
  every refusal says it in words instead."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of 1 or more')
  return value


class EmbeddingOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    group = parser.add_argument_group('PNASNet embeddings')
    group.add_argument(
        '--input', nargs='+', action='extend', default=None,
        help='Images: files, folders (every file under them, recursively) or glob patterns on '
        'any Beam FileSystem, e.g. "gs://bucket/photos/**.jpg" "sample_images/*.png". '
        'Repeatable.')
    group.add_argument(
        '--exclude', nargs='+', action='extend', default=None,
        help='Leave these out of --input: a pattern with a / matches whole paths or URIs '
        '("gs://bucket/photos/thumbs/**"); one without matches any file or folder name ("*.md", '
        'thumbnails). Repeatable.')
    group.add_argument(
        '--input_manifest', nargs='+', action='extend', default=None,
        help='Text files (or globs; .gz allowed) listing one image URI a line; blank lines, '
        '# comment lines and " # notes" after a URI are ignored. Read in parallel, never listed. '
        'Repeatable; with or without --input.')
    group.add_argument(
        '--input_format', choices=INPUT_FORMATS, default=AUTO,
        help='How inputs hold images: auto reads .tar/.tar.gz (WebDataset), .parquet and '
        '.tfrecord/.tfrecord.gz files as shards of images and every other file as one image; '
        'files reads every input as one image; a shard format reads every input as a shard of '
        'that format. Default %(default)s.')
    group.add_argument(
        '--image_column', default=None,
        help='Parquet shards: the column of image bytes, binary or struct<bytes, ...> as Hugging '
        'Face writes; without it, the first such column.')
    group.add_argument(
        '--key_column', default=None,
        help='Parquet shards: a column naming each row, for its URI (shard.parquet#KEY). '
        'Without it, the row number names the row (shard.parquet#row=N).')
    group.add_argument(
        '--image_feature', default=None,
        help=f'TFRecord shards: the tf.train.Example bytes feature of the image; without it, '
        f'{DEFAULT_IMAGE_FEATURE}.')
    group.add_argument(
        '--output', default=None,
        help='Output directory (local, gs:// or s3://). Must not hold an earlier run. {date} and '
        '{datetime} are replaced by the launch time in UTC, e.g. gs://bucket/emb/{date}.')
    group.add_argument(
        '--output_format', choices=OUTPUT_FORMATS, default='tfrecord',
        help='Embeddings as TFRecord (tf.train.Example), Parquet, or both.')
    group.add_argument(
        '--embedding_dtype', choices=EMBEDDING_DTYPES, default='float32',
        help='How the vectors are stored: float16 halves the files (values rounded to '
        'nearest, recorded in the recipe); every reader returns float32 either way.')
    group.add_argument(
        '--model', default=DEFAULT_MODEL_HANDLE,
        help='TF-Hub handle, a local or remote directory with a TF1-Hub-format module or TF2 '
        'SavedModel, or builtin:pnasnet_large / builtin:pnasnet_mobile. Default: %(default)s')
    group.add_argument(
        '--checkpoint', default=None,
        help='TF-Slim checkpoint prefix for a builtin: model, e.g. '
        'gs://bucket/pnasnet-5_large_2017_12_13/model.ckpt. Without it the builtin weights are '
        'seeded and UNTRAINED, and the output says so.')
    group.add_argument('--seed', type=int, default=0,
                       help=f'Seed (0..{MAX_SEED}) of the untrained builtin weights.')
    group.add_argument('--compute_dtype', choices=COMPUTE_DTYPES, default='float32',
                       help='Compute dtype of a builtin: model (float16/bfloat16 for GPU '
                       'workers); features are float32 either way, and the model id says so.')
    group.add_argument('--min_batch_size', type=_positive_int, default=1,
                       help='Smallest inference batch Beam may form.')
    group.add_argument('--max_batch_size', type=_positive_int, default=16,
                       help='Largest inference batch (images per model call).')
    group.add_argument('--center_crop_fraction', type=float, default=IMAGE_INPUT.crop_fraction,
                       help='Central fraction of height and width kept before resizing, '
                       f'{MIN_CENTER_CROP_FRACTION} to 1; 1.0 keeps the whole image.')
    group.add_argument('--num_shards', type=int, default=0,
                       help='Embedding and failure files to write (at most); 0 lets the runner '
                       'decide.')
    group.add_argument('--compression', choices=sorted(COMPRESSIONS), default='none',
                       help='gzip writes embeddings-*.tfrecord.gz.')
    group.add_argument('--large_model', action='store_true', default=False,
                       help='One model per VM shared by all its processes (Beam\'s '
                       'share_model_across_processes), for GPU workers.')
    group.add_argument('--model_copies', type=_positive_int, default=None,
                       help='Exactly this many models per VM (implies sharing across '
                       'processes), e.g. one per GPU.')
    group.add_argument('--max_image_pixels', type=_positive_int,
                       default=DEFAULT_MAX_IMAGE_PIXELS,
                       help='Decompression-bomb limit: larger images go to the dead letter.')
    group.add_argument('--max_file_bytes', type=_positive_int, default=DEFAULT_MAX_FILE_BYTES,
                       help='Files larger than this are not read; they go to the dead letter.')
    group.add_argument('--jpeg_draft', action='store_true', default=False,
                       help='Let Pillow decode large JPEGs at reduced size (faster, '
                       'slightly different pixels; see docs/models.md).')
    group.add_argument('--jit_compile', action='store_true', default=False,
                       help='Compile a builtin: model with XLA (for GPU workers; slow on CPUs), '
                       'once per batch size, batches padded to powers of two up to '
                       '--max_batch_size.')
    group.add_argument(
        '--collection', default=None,
        help='The collection this night commits to (a local folder, gs://, s3://; created by '
        'the first night): files it holds unchanged (same size and content identity or '
        'modification time, same model and recipe) are skipped, changed and new ones embedded, '
        'and gone ones removed, in one commit. Without it the run embeds everything it matches.')
    group.add_argument(
        '--inference_accelerator', default=None,
        help='Beam accelerator resource hint for the GPU step only (reading, decoding and '
        'inference; Dataflow right fitting): type:GPU;count:N[;machine_type:TYPE]'
        '[;install-nvidia-driver[:VERSION]][;use_nvidia_mps], e.g. '
        f'"{ACCELERATOR_EXAMPLE}" (L4 needs a G2 machine type, T4 an N1).')
    group.add_argument('--inference_min_ram', default=None,
                       help='Beam min_ram resource hint for the GPU step, e.g. 16GB.')
    group.add_argument('--no_wait', action='store_true', default=False,
                       help='Submit and return at once (Flex Templates, schedulers): the job '
                       'writes run_summary.json itself when it finishes.')
    group.add_argument('--clean_unfinished', action='store_true', default=False,
                       help='If --output holds an unfinished run (claimed, no run_summary.json: '
                       'interrupted), delete the files that run wrote (its claim, its shards, '
                       'its beam-temp-* folders; nothing else), say which, and claim it anew.')
    group.add_argument('--ended_job', default=None, metavar='JOB_ID',
                       help='With --clean_unfinished: the Dataflow job of the unfinished run at '
                       '--output, which you have checked has ended; its files are deleted '
                       'without asking Dataflow (which a launch asks otherwise, and refuses to '
                       'clean while it cannot).')
    group.add_argument('--skip_if_finished', action='store_true', default=False,
                       help='If --output already holds a finished run of the same inputs and '
                       'model, do nothing and exit 0 (reruns of a loop of chunks); otherwise '
                       'such an output is refused.')
    group.add_argument('--max_failed_fraction', type=float, default=DEFAULT_MAX_FAILED_FRACTION,
                       help='The run writes its summary, then fails (exit 3, outcome '
                       '"too_many_failures") when more than this fraction of the matched images '
                       'failed: a wrong model or input, an unreadable bucket. 0 to 1; 1 never '
                       'fails. Default %(default)s.')
    group.add_argument('--include_all_files', action='store_true', default=False,
                       help='Read every file that folders and globs hold: without it, hidden '
                       'files (.DS_Store, .git/) and files whose extension is never an image\'s '
                       '(.txt, .json, .mp4...) are skipped, and counted in run_summary.json as '
                       'skipped_by_name.')


def expand_output(output: str, now: datetime.datetime) -> str:
  """{date} and {datetime} in UTC, once at launch, so one scheduled command writes a new run."""
  names = re.findall(r'{([^{}]*)}', output)
  unknown = [n for n in names if n not in OUTPUT_PLACEHOLDERS]
  if unknown:
    raise OptionsError(f'--output {output}: unknown placeholder {{{unknown[0]}}}; use '
                       + ' or '.join(f'{{{n}}}' for n in OUTPUT_PLACEHOLDERS))
  for name, pattern in OUTPUT_PLACEHOLDERS.items():
    output = output.replace(f'{{{name}}}', now.strftime(pattern))
  return output


def shard_inputs(options: EmbeddingOptions) -> ShardInputs:
  return ShardInputs(options.input_format, options.image_column, options.key_column,
                     options.image_feature or DEFAULT_IMAGE_FEATURE)


def _shard_flag_problems(options: EmbeddingOptions):
  """Flags for one shard format, given with --input_format that reads none of it."""
  for flag, kind in (('image_column', PARQUET), ('key_column', PARQUET),
                     ('image_feature', TFRECORD)):
    if getattr(options, flag) is not None and options.input_format not in (AUTO, kind):
      yield (f'--{flag} is for {kind} shards, but --input_format {options.input_format} reads '
             f'none: leave it out, or use --input_format {kind} (or auto)')


def validate(options: EmbeddingOptions, pipeline_options: PipelineOptions) -> None:
  """Everything that can be checked without touching storage or the model."""
  problems = []
  if not options.input and not options.input_manifest:
    problems.append('--input (or --input_manifest) is required: files, folders or glob '
                    'patterns, e.g. --input "gs://bucket/photos/**.jpg"')
  for flag in ('input', 'input_manifest', 'exclude'):
    if any(not value.strip() for value in getattr(options, flag) or ()):
      problems.append(f'--{flag} is given an empty value (a template or scheduler parameter left '
                      'blank?): leave the flag out instead')
  problems.extend(_shard_flag_problems(options))
  if not options.output:
    problems.append('--output is required: a directory such as gs://bucket/embeddings/run1')
  if options.min_batch_size > options.max_batch_size:
    problems.append(f'--min_batch_size {options.min_batch_size} exceeds --max_batch_size '
                    f'{options.max_batch_size}')
  if not MIN_CENTER_CROP_FRACTION <= options.center_crop_fraction <= 1.0:
    problems.append(f'--center_crop_fraction {options.center_crop_fraction} must be between '
                    f'{MIN_CENTER_CROP_FRACTION} and 1 (the central part of each side kept)')
  if not 0.0 <= options.max_failed_fraction <= 1.0:
    problems.append(f'--max_failed_fraction {options.max_failed_fraction} must be between 0 '
                    '(no image may fail) and 1 (never fail the run for failed images)')
  if options.large_model and options.model_copies is not None:
    problems.append(f'--large_model and --model_copies {options.model_copies} both say how many '
                    'models a VM shares: --large_model is one, --model_copies N is N; keep one')
  if options.num_shards < 0:
    problems.append('--num_shards must be 0 (runner decides) or more')
  if not 0 <= options.seed <= MAX_SEED:
    problems.append(f'--seed {options.seed} must be between 0 and {MAX_SEED}')
  if options.collection is not None and not options.collection.strip():
    problems.append('--collection is given an empty value: leave the flag out for a one-off run')
  worker_accelerator = _worker_accelerator(pipeline_options)
  if (options.inference_accelerator or worker_accelerator) and 'dataflow' in (
      pipeline_options.view_as(StandardOptions).runner or '').lower():
    problem = image_problem(pipeline_options.view_as(WorkerOptions).sdk_container_image,
                            '--inference_accelerator' if options.inference_accelerator else
                            '--dataflow_service_options worker_accelerator=...')
    if problem:
      problems.append(problem)
  if options.inference_accelerator is not None:
    job_machine_type = pipeline_options.view_as(WorkerOptions).machine_type
    problems.extend(accelerator_problems(options.inference_accelerator, job_machine_type))
    warning = machine_type_unknown(options.inference_accelerator, job_machine_type)
    if warning:
      logging.warning(warning)
    if worker_accelerator:
      problems.append('--inference_accelerator (GPU for the GPU step only) and '
                      '--dataflow_service_options worker_accelerator=... (GPU on every worker) '
                      'cannot be combined; keep one')
  if options.inference_min_ram is not None:
    try:
      beam.PTransform().with_resource_hints(min_ram=options.inference_min_ram)
    except ValueError as exc:
      problems.append(f'--inference_min_ram {options.inference_min_ram!r}: {exc}')
  try:
    check_model_options(options.model, options.checkpoint, options.compute_dtype,
                        options.jit_compile)
  except ModelLoadError as exc:
    problems.append(str(exc))
  if options.output:
    try:
      expand_output(options.output, datetime.datetime.now(datetime.timezone.utc))
    except OptionsError as exc:
      problems.append(str(exc))
  if problems:
    raise OptionsError('\n'.join(problems))


def _worker_accelerator(pipeline_options: PipelineOptions) -> str:
  """The accelerator of `--dataflow_service_options worker_accelerator=...`, '' without one."""
  for option in pipeline_options.view_as(GoogleCloudOptions).dataflow_service_options or ():
    if option.startswith('worker_accelerator='):
      return option.split('=', 1)[1]
  return ''


def one_model_per_gpu(options: EmbeddingOptions, pipeline_options: PipelineOptions) -> None:
  """A GPU worker without --large_model / --model_copies loads a model in each of its SDK
  processes (one per vCPU: 8 models and 8 CUDA contexts on one GPU). Corrected, not refused:
  the fix is always the same, one model per GPU (`--model_copies G` for G GPUs), and said."""
  accelerator = options.inference_accelerator or _worker_accelerator(pipeline_options)
  if not accelerator or options.large_model or options.model_copies is not None:
    return
  gpus = gpu_count(accelerator)
  if gpus > 1:
    options.model_copies, given = gpus, f'--model_copies {gpus}'
  else:
    options.large_model, given = True, '--large_model'
  logging.warning('%s: one model per GPU, shared by the SDK processes of each GPU worker '
                  '(without it every process, one per vCPU, would load its own model on the '
                  'GPU)', given)
