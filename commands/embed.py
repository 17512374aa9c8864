"""`pnasnet-embeddings embed`: embeds images into a run directory (pipeline/launcher.py `run`).

The process front of a launch: log filters, Ctrl-C and SIGTERM as one line, and the exit codes
schedulers act on (commands/common.py). It ends with one line (embedded, skipped, failed, where,
how long); the whole summary is the run directory's run_summary.json, printed with --json.
"""

import argparse
import json
import logging
import os
import signal
import sys
from typing import Dict, List, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # keep TensorFlow's start-up chatter out

from commands.common import (FAILED, INTERRUPTED, PROGRAM, REFUSED,  # noqa: E402
                             TOO_MANY_FAILURES, HelpWithDefaults, fail)
from models.handles import ModelLoadError  # noqa: E402
from pipeline.beam_flags import OptionsError, all_flags_parser  # noqa: E402
from pipeline.launcher import (InterruptedRun, NoCredentialsError, OutOfSpaceRun,  # noqa: E402
                               PipelineFailedError, TooManyFailuresError, one_line_error,
                               out_of_space, run)
from pipeline.options import EmbeddingOptions  # noqa: E402
from pipeline.output_dir import OutputExistsError, OutputNotWritableError  # noqa: E402
from pipeline.versions import version_mismatch  # noqa: E402
from run_format import SUMMARY_FILE, IncompatibleRunError  # noqa: E402
from transforms import quiet_logs  # noqa: E402
from transforms.read import NoInputError  # noqa: E402

VERB = f'{PROGRAM} embed'
JSON_FLAG = '--json'
# Beam's chatter that reads like a problem on every run (see docs/running.md, "Log messages").
QUIET_LOGGERS = ('apache_beam.io.iobase',)
REFUSALS = (OptionsError, NoInputError, ModelLoadError, OutputExistsError, OutputNotWritableError,
            IncompatibleRunError, NoCredentialsError)


class _NoStopTracebacks(logging.Filter):
  """Beam logs the error that stops a step with its whole traceback (80 lines and more) before
  the launcher says in one line what failed, what was left where, and what to do: the
  KeyboardInterrupt of Ctrl-C, a full disk's OSError and a worker's version mismatch are left
  out, any other error is logged in its one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.exc_info:
      return True
    error = record.exc_info[1]
    if isinstance(error, KeyboardInterrupt) or out_of_space(error) or version_mismatch(error):
      return False
    record.msg, record.args = one_line_error(error), ()
    record.exc_info = record.exc_text = None
    return True


def _quiet_unraisable(hook):
  """A writer closed by the garbage collector after the disk filled (pyarrow's
  `ParquetWriter.__del__`) reports its own OSError as "Exception ignored in": the launcher says
  what happened once."""

  def unraisable(report):
    if not out_of_space(report.exc_value):
      hook(report)
  return unraisable


def build_parser() -> argparse.ArgumentParser:
  """The embedding job's own flags and --json; Beam's many options are listed by --help_beam."""
  parser = argparse.ArgumentParser(
      prog=VERB, add_help=False, formatter_class=HelpWithDefaults, description=(
          'Embeds images with PNASNet-5. Beam\'s own options (--runner, --project, --region, '
          f'--temp_location, ...) pass through: {VERB} --help_beam lists them.'))
  EmbeddingOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  parser.add_argument(JSON_FLAG, action='store_true',
                      help=f'print the whole run summary (the run directory\'s {SUMMARY_FILE}) as '
                      'JSON instead of one line')
  return parser


def summary_line(summary: Dict) -> str:
  """One line a person reads: what became of the images, where, how long."""
  if summary.get('submitted'):
    return (f'submitted job {summary.get("job_id") or "(no id)"}; it writes {summary["summary"]} '
            'when it finishes')
  rate = summary.get('images_per_second')
  by_name = summary.get('skipped_by_name')
  committed = summary.get('collection_version')
  return (f'{summary["output"]}: {summary["embedded"]} embedded, {summary["skipped"]} skipped '
          f'(held by the collection), {summary["failed"]} failed of '
          f'{summary["matched"]} matched'
          + (f', {by_name} not images by name (--include_all_files takes them)' if by_name else '')
          + (f'; committed version {committed} of {summary["collection"]} '
             f'({summary["collection_added"]} added, {summary["collection_removed"]} removed)'
             if committed is not None else '')
          + f', in {summary["wall_time_seconds"]:.0f} s'
          + (f' ({rate:.1f} images/s)' if rate else '') + f'; details: {SUMMARY_FILE}')


def _terminate(signum, frame):
  raise KeyboardInterrupt()


def main(argv: Optional[List[str]] = None) -> Optional[Dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  if '-h' in argv or '--help' in argv or '--help_beam' in argv:
    (all_flags_parser(VERB) if '--help_beam' in argv else build_parser()).print_help()
    return None
  as_json = JSON_FLAG in argv
  argv = [arg for arg in argv if arg != JSON_FLAG]
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  quiet_logs.install()
  for handler in logging.getLogger().handlers:
    handler.addFilter(_NoStopTracebacks())
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too when inherited as ignored (`cmd &`)
    signal.signal(signum, _terminate)
  try:
    summary = run(argv)
  except REFUSALS as exc:
    fail(REFUSED, exc)
  except (PipelineFailedError, OutOfSpaceRun) as exc:
    fail(FAILED, exc)
  except TooManyFailuresError as exc:
    print(json.dumps(exc.summary, indent=2) if as_json else summary_line(exc.summary))
    fail(TOO_MANY_FAILURES, exc)
  except InterruptedRun as exc:
    fail(INTERRUPTED, exc)
  except KeyboardInterrupt:
    fail(INTERRUPTED, 'interrupted before any work started')
  if not summary.get('dry_run'):  # a dry run printed its own, shorter account
    print(json.dumps(summary, indent=2) if as_json else summary_line(summary))
  return summary
