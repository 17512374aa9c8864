"""Writes docs/flags.md from the parser that `pnasnet-embeddings embed --help` prints, so the page
lists every flag with the parser's own defaults, choices and help: `python -m pipeline.flags_doc >
docs/flags.md` (tests/test_docs.py fails when the page, `--help` or the template disagree)."""

import argparse
from typing import Dict, List, NamedTuple

from pipeline.beam_flags import all_flags_parser
from pipeline.options import EmbeddingOptions

PROGRAM = 'pnasnet-embeddings embed'


class FlagNotes(NamedTuple):
  """What the one-line help leaves out: a working example and, where it helps, more."""
  example: str
  note: str = ''


NOTES: Dict[str, FlagNotes] = {
    'input': FlagNotes('--input "gs://bucket/photos/**.jpg" gs://bucket/more/',
                       'What matches: [inputs](running.md#inputs). This or `--input_manifest` '
                       'is required.'),
    'exclude': FlagNotes('--exclude "*.md" thumbnails', 'See [inputs](running.md#inputs).'),
    'include_all_files': FlagNotes('--include_all_files',
                                   'Which names are skipped: [inputs](running.md#inputs). A path '
                                   'that names one file, and manifests, are read either way.'),
    'input_manifest': FlagNotes('--input_manifest gs://bucket/lists/part-*.txt.gz',
                                'See [inputs](running.md#inputs).'),
    'input_format': FlagNotes('--input_format webdataset',
                              'Member URIs, which members are images, failures: '
                              '[shards](shards.md). Name the format when a folder holds other '
                              'shards beside the images\' (img2dataset writes a metadata '
                              '`.parquet` beside each `.tar`).'),
    'image_column': FlagNotes('--image_column image', 'See [shards](shards.md#which-members-are-images).'),
    'key_column': FlagNotes('--key_column id', 'See [shards](shards.md#which-members-are-images).'),
    'image_feature': FlagNotes('--image_feature image/jpeg',
                               'The key is `image/filename` when the record has it, else the '
                               'record number: [shards](shards.md#member-uris).'),
    'output': FlagNotes('--output "gs://bucket/embeddings/{date}"',
                        'Required. `{date}` gives `2026-11-27`, `{datetime}` '
                        '`2026-11-27T030405Z`. What it receives: '
                        '[the output format](output-format.md).'),
    'output_format': FlagNotes('--output_format both'),
    'embedding_dtype': FlagNotes('--embedding_dtype float16',
                                 'Parquet: a halffloat list; TFRecord: the bytes feature '
                                 '`embedding/float16` ([the format](output-format.md#float16-'
                                 'vectors)). The recipe says `embedding_dtype=float16`; a '
                                 '`--collection` holds one dtype (another is refused, exit 2). '
                                 'Rankings: [measured](performance.md#float16-vectors).'),
    'model': FlagNotes('--model gs://bucket/modules/pnasnet_large_fv1',
                       'Also any URL serving a compressed module. See [models](models.md).'),
    'checkpoint': FlagNotes('--checkpoint gs://bucket/pnasnet-5_large_2017_12_13/model.ckpt',
                            'Checked against the network before any work.'),
    'seed': FlagNotes('--seed 1'),
    'compute_dtype': FlagNotes('--compute_dtype float16', 'The model id says `+float16`.'),
    'min_batch_size': FlagNotes('--min_batch_size 8'),
    'max_batch_size': FlagNotes('--max_batch_size 64', '32-64 on a GPU.'),
    'center_crop_fraction': FlagNotes('--center_crop_fraction 0.875',
                                      'As `tf.image.central_crop`.'),
    'num_shards': FlagNotes('--num_shards 64',
                            'Index files too. Leave it at 0 for large runs: a fixed count adds a '
                            'shuffle of every record ([costs](dataflow.md#costs)).'),
    'compression': FlagNotes('--compression gzip'),
    'large_model': FlagNotes('--large_model',
                             'The processes hand the model their batches through shared '
                             'memory, not pickles ([Dataflow](dataflow.md#feeding-the-gpu)).'),
    'model_copies': FlagNotes('--model_copies 2',
                              'Copy i runs on GPU i mod G of a VM with G GPUs.'),
    'max_image_pixels': FlagNotes('--max_image_pixels 200000000',
                                  'The default is Pillow\'s own limit.'),
    'max_file_bytes': FlagNotes('--max_file_bytes 1073741824',
                                'The default is 256 MiB, so a stray video cannot exhaust a '
                                'worker; larger files fail at stage `read`.'),
    'jpeg_draft': FlagNotes('--jpeg_draft',
                            'libjpeg decodes at 1/2, 1/4 or 1/8 scale: '
                            '[decoding](models.md#decoding-and-resizing).'),
    'jit_compile': FlagNotes('--jit_compile',
                             '5-10x slower on CPUs. Padded rows are dropped, so each process '
                             'compiles at most log2(max)+2 shapes; each compile time is logged; '
                             'the recipe says `jit_compile=1` (features within 1e-5 of the plain '
                             'path).'),
    'collection': FlagNotes('--collection gs://bucket/collection',
                            'Unchanged means same URI, size, model id and recipe, and the same '
                            'content identity where the store gives one (GCS crc32c, S3 ETag), '
                            'else the same modification time. One model, vector size and dtype '
                            'per collection (another is refused, exit 2). A night whose commit '
                            'another night beat ends `failed` (exit 1), nothing committed. See '
                            '[nightly runs](running.md#nightly-only-what-is-new).'),
    'inference_accelerator': FlagNotes(
        '--inference_accelerator '
        '"type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"',
        'The GPU step reads, decodes and embeds. L4 needs a G2 `machine_type`, T4 an N1 one: '
        '[which GPU and machine](dataflow.md#which-gpu-and-machine), '
        '[right fitting](dataflow.md#right-fitting-gpus-only-where-the-gpu-step-runs). Not with '
        'the `worker_accelerator` service option.'),
    'inference_min_ram': FlagNotes('--inference_min_ram 16GB'),
    'no_wait': FlagNotes('--no_wait',
                         'Prints the job id. On the local runner the pipeline runs in the '
                         'launching process, so the command still returns only when it is done, '
                         'without reading the summary.'),
    'clean_unfinished': FlagNotes('--clean_unfinished', 'What it deletes is logged. A run '
                                  'still alive there is refused, nothing deleted: '
                                  '[a killed launcher](reliability.md#a-killed-launcher).'),
    'ended_job': FlagNotes('--ended_job 2026-12-08_01_02_03-123456789',
                           'Only for the job the claim names, when Dataflow cannot be asked '
                           '(no access to its project, no network): [live or dead]'
                           '(reliability.md#live-or-dead-the-heartbeat-and-the-jobs-state).'),
    'skip_if_finished': FlagNotes('--skip_if_finished', 'Makes a loop over chunks rerunnable: '
                                  '[backfill](running.md#a-very-large-backfill-in-chunks).'),
    'max_failed_fraction': FlagNotes('--max_failed_fraction 0.01', '[Exit codes](running.md#exit-codes) '
                                     'and why 0.5.'),
}

# Beam's options that this manual's commands use, with what they do here.
BEAM_FLAGS: Dict[str, str] = {
    'runner': 'None: Beam\'s FnApiRunner on this machine, downloading nothing; `DataflowRunner`, '
              '`PortableRunner`, `PrismRunner`, `FlinkRunner`, `SparkRunner`: '
              '[runners](running.md#runners)',
    'job_endpoint': 'PortableRunner: the job server (`HOST:PORT`), e.g. Flink\'s or Spark\'s',
    'environment_type': 'Portable runners: how the SDK workers run (`DOCKER` with the worker '
                        'image, `PROCESS`, `LOOPBACK`)',
    'direct_running_mode': 'The local runner: `multi_processing` runs several worker processes',
    'direct_num_workers': 'The local runner: how many workers',
    'project': 'Dataflow: the Google Cloud project',
    'region': 'Dataflow: the region',
    'temp_location': 'Dataflow: a `gs://` folder for temporary files',
    'staging_location': 'Dataflow: a `gs://` folder for staged files',
    'sdk_container_image': 'the worker image (TensorFlow with CUDA: '
                           '[the worker image](dataflow.md#build-the-images)); the Flex Template '
                           'defaults it to the image it was built with',
    'disk_size_gb': 'Dataflow: every worker\'s disk; 50 holds the ~10 GB worker image '
                    '([costs](dataflow.md#costs))',
    'setup_file': 'without `--sdk_container_image` the launcher adds `--setup_file ./setup.py`, '
                  'which installs the project on workers at start-up',
    'dataflow_service_options': '`worker_accelerator=...` puts a GPU on every worker (not with '
                                '`--inference_accelerator`)',
    'experiments': 'runner experiments',
    'dry_run': 'with `True`, build the Dataflow job without submitting it '
               '([the dry run](dataflow.md#check-before-you-launch-the-dry-run))',
    'dataflow_job_file': 'with `--dry_run True`, also write the job description as JSON',
    's3_region_name': 's3://: the region',
    's3_endpoint_url': 's3://: an S3-compatible server such as MinIO',
    's3_access_key_id': 's3://: credentials, if not from the AWS environment',
    's3_secret_access_key': 's3://: credentials, if not from the AWS environment',
}

INTRO = """\
# Flags

The flags of `pnasnet-embeddings embed`. Generated by
`python -m pipeline.flags_doc > docs/flags.md` from the parser that `pnasnet-embeddings embed
--help` prints; `tests/test_docs.py` fails when this page, `--help` or `deploy/flex/metadata.json`
disagree. `pnasnet-embeddings embed --help_beam` lists Beam's own options too, which pass straight
through. `--json` prints the whole run summary (`run_summary.json`) as JSON instead of the one
line the command ends with. An unknown flag (a typo such as `--max_batchsize`) stops the run with
exit 2 and a suggestion.

## This project's flags

| flag | default | value | example | meaning |
| --- | --- | --- | --- | --- |
"""

OUTRO = """
Bad values fail before any work starts, with exit code 2 and one message that says what to do:
a batch range upside down, a crop outside [0.1, 1], a seed out of range, `--large_model` with
`--model_copies`, `--checkpoint` without a `builtin:` model or with variables that do not fit the
network (missing names listed once, summarised past 20), an unknown model, an unreachable or
broken model download, an input that matches nothing, a `--collection` of another model,
vector size or dtype (or a folder that holds other files), `gs://` paths without Google
credentials, an output whose bucket does not exist or that is a file, an output that holds a run
or is claimed by another. Every exit code: [Running](running.md#exit-codes).

As Flex Template parameters (`deploy/flex/metadata.json`), every flag above except `--no_wait`
(the template always adds it) is `name=value`, and on/off flags take `true` or `false`.

## Beam's options used in this manual

| flag | Beam's default | here |
| --- | --- | --- |
"""


def project_parser() -> argparse.ArgumentParser:
  """The parser `pnasnet-embeddings embed --help` prints: this project's flags only."""
  parser = argparse.ArgumentParser(prog=PROGRAM, add_help=False)
  EmbeddingOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def project_flags() -> List[argparse.Action]:
  return [a for a in project_parser()._actions if a.option_strings]  # pylint: disable=protected-access


def is_switch(action: argparse.Action) -> bool:
  return action.nargs == 0


def default_text(action: argparse.Action) -> str:
  if is_switch(action):
    return 'off'
  return 'none' if action.default is None else f'`{action.default}`'


def value_text(action: argparse.Action) -> str:
  if is_switch(action):
    return 'none (on/off)'
  if action.choices:
    return 'one of ' + ', '.join(f'`{choice}`' for choice in action.choices)
  kind = {int: 'whole number', float: 'number'}.get(action.type, 'text')
  if action.type is not None and action.type.__name__ == '_positive_int':
    kind = 'whole number >= 1'
  return kind + ('; several, repeatable' if action.nargs == '+' else '')


def help_text(action: argparse.Action) -> str:
  """As argparse prints it (with %(default)s filled in), on one line."""
  text = action.help % dict(vars(action), prog=PROGRAM)
  return ' '.join(text.split())


def _cell(text: str) -> str:
  return text.replace('|', '\\|')


def render() -> str:
  flags = project_flags()
  names = [a.dest for a in flags]
  if sorted(names) != sorted(NOTES):
    raise SystemExit(f'pipeline/flags_doc.py NOTES must cover exactly the flags: missing '
                     f'{sorted(set(names) - set(NOTES))}, stale {sorted(set(NOTES) - set(names))}')
  rows = []
  for action in flags:
    notes = NOTES[action.dest]
    meaning = help_text(action).replace('*', '\\*') + (f' {notes.note}' if notes.note else '')
    rows.append(f'| `{action.option_strings[0]}` | {default_text(action)} | {value_text(action)} '
                f'| `{_cell(notes.example)}` | {_cell(meaning)} |\n')
  beam = {a.dest: a for a in all_flags_parser()._actions if a.option_strings}  # pylint: disable=protected-access
  beam_rows = []
  for name, use in BEAM_FLAGS.items():
    action = beam[name]  # a KeyError here: Beam renamed or dropped an option this manual uses
    flag = next(s for s in action.option_strings if s.lstrip('-') == name)
    beam_rows.append(f'| `{flag}` | {default_text(action)} | {_cell(use)} |\n')
  return INTRO + ''.join(rows) + OUTRO + ''.join(beam_rows)


def main() -> None:
  print(render(), end='')


if __name__ == '__main__':
  main()
