"""Checks the options, model and inputs, runs the pipeline, and writes run_summary.json."""

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (PipelineOptions, SetupOptions,
                                                  StandardOptions, _BeamArgumentParser)
from apache_beam.runners.runner import PipelineState

from pipeline.build import build_pipeline
from pipeline.options import EmbeddingOptions, OptionsError, validate
from transforms import read, write
from transforms.failures import DECODE, INFERENCE, READ
from transforms.models import ModelLoadError, describe_model
from transforms.read import NoInputError, check_patterns_match

SUMMARY_FILE = 'run_summary.json'
OUTPUT_PATTERNS = ('embeddings-*', 'failures-*', SUMMARY_FILE)
PROJECT_SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'setup.py')


class OutputExistsError(ValueError):
  """Writing over an earlier run would mix its shards with this run's."""


def check_output_is_new(output: str) -> None:
  patterns = [FileSystems.join(output, name) for name in OUTPUT_PATTERNS]
  found = [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
  if found:
    raise OutputExistsError(f'--output {output} already holds a run ({found[0]} and '
                            f'{len(found) - 1} more); choose a new --output directory')


def _prepare_remote_workers(options: PipelineOptions) -> None:
  """Remote workers need this project's packages: ship setup.py unless told otherwise."""
  runner = (options.view_as(StandardOptions).runner or '').lower()
  setup = options.view_as(SetupOptions)
  if 'dataflow' in runner and not (setup.setup_file or setup.requirements_file):
    setup.setup_file = PROJECT_SETUP_FILE
    logging.info('--setup_file %s: workers install the project from it', PROJECT_SETUP_FILE)


def _counter(result, namespace: str, name: str) -> int:
  counters = result.metrics().query(
      MetricsFilter().with_namespace(namespace).with_name(name))['counters']
  return sum((c.committed if c.committed is not None else c.attempted) or 0 for c in counters)


def summarize(result, options: EmbeddingOptions, model, runner: str,
              wall_time: float) -> Dict:
  failed = {stage: _counter(result, write.METRICS_NAMESPACE, f'failed_{stage}')
            for stage in (READ, DECODE, INFERENCE)}
  embedded = _counter(result, write.METRICS_NAMESPACE, 'embeddings')
  return {
      'matched': _counter(result, read.METRICS_NAMESPACE, 'matched'),
      'embedded': embedded,
      'failed': sum(failed.values()),
      'failed_by_stage': failed,
      'model': model.model_id,
      'embedding_size': model.feature_size,
      'image_size': [model.height, model.width],
      'input': list(options.input),
      'output': options.output,
      'runner': runner,
      'wall_time_seconds': round(wall_time, 3),
      'images_per_second': round(embedded / wall_time, 3) if wall_time > 0 else None,
  }


def run(argv: Optional[List[str]] = None) -> Dict:
  options = PipelineOptions(argv)
  embedding = options.view_as(EmbeddingOptions)
  validate(embedding)
  FileSystems.set_options(options)  # the checks below read storage with the run's credentials
  # Local patterns made absolute, so that every record's image/uri names its file unambiguously.
  embedding.input = [p if '://' in p else os.path.abspath(p) for p in embedding.input]
  check_output_is_new(embedding.output)
  model = describe_model(embedding.model, embedding.checkpoint, embedding.seed)
  check_patterns_match(embedding.input)
  _prepare_remote_workers(options)
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  logging.info('embedding %s with %s (%dx%d -> %d) on %s', embedding.input, model.model_id,
               model.height, model.width, model.feature_size, runner)

  started = time.monotonic()
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, embedding, model)
  result = pipeline.run()
  state = result.wait_until_finish()
  if state != PipelineState.DONE:
    raise RuntimeError(f'the pipeline ended in state {state}')
  summary = summarize(result, embedding, model, runner, time.monotonic() - started)
  with FileSystems.create(FileSystems.join(embedding.output, SUMMARY_FILE)) as f:
    f.write(json.dumps(summary, indent=2).encode())
  return summary


def print_help() -> None:
  """This project's flags and every Beam option, as `PipelineOptions.get_all_options` sees them."""
  parser = _BeamArgumentParser(prog='run_pipeline.py', description=__doc__, allow_abbrev=False)
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  parser.print_help()


def main(argv: Optional[List[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    print_help()
    return
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  try:
    summary = run(argv)
  except (OptionsError, NoInputError, ModelLoadError, OutputExistsError) as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary, indent=2))
