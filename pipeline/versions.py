"""The launch's project, Beam and Python versions, recorded in the job's options
(`--launch_versions`, set by the launcher) and checked by every worker at start-up.

A worker image built from another checkout, or on another Beam or Python, otherwise breaks far
from its cause: an unpickling error in a DoFn, a changed run format, a coder that disagrees. Python
is compared on major.minor (what pickles and Beam's containers depend on), the others exactly.
"""

import platform
from typing import Dict, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.provenance import project_version

WORKER_IMAGE_RECIPE = 'deploy/worker/Dockerfile'
UNKNOWN = '(not installed)'  # a launch from a source tree that was never installed: not compared


class LaunchOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--launch_versions', default=None,
        help='Set by the launcher, not by hand: the project, Beam and Python versions of the '
        'launch (project=...;beam=...;python=...), which the workers check at start-up.')


def current_versions() -> Dict[str, str]:
  return {'project': project_version(), 'beam': beam.__version__,
          'python': '.'.join(platform.python_version_tuple()[:2])}


def format_versions(versions: Dict[str, str]) -> str:
  return ';'.join(f'{name}={value}' for name, value in versions.items())


def parse_versions(text: str) -> Dict[str, str]:
  return dict(part.split('=', 1) for part in text.split(';') if '=' in part)


class VersionMismatchError(RuntimeError):
  """This worker's project, Beam or Python is not the launch's."""


def check_versions(launched: str) -> None:
  """VersionMismatchError naming both sides if this process's versions are not `launched`'s."""
  expected, here = parse_versions(launched), current_versions()
  if all(here.get(name) == value or value.endswith(UNKNOWN) for name, value in expected.items()):
    return
  raise VersionMismatchError(
      f'this worker runs {_describe(here)}, {MISMATCH_WORDS} {_describe(expected)}: build the worker image ({WORKER_IMAGE_RECIPE}) from the checkout '
      'that launches, and pass it as --sdk_container_image')


MISMATCH_WORDS = 'but the job was launched with'


def version_mismatch(exc: BaseException) -> Optional[str]:
  """The mismatch's one line, when `exc` is (or passes on as text, as Beam's runners do) a
  VersionMismatchError; None otherwise."""
  for line in str(exc).splitlines():
    if MISMATCH_WORDS in line:
      return line[line.index('this worker runs'):] if 'this worker runs' in line else line
  return None


def _describe(versions: Dict[str, str]) -> str:
  return ', '.join(f'{name} {versions.get(name, "?")}' for name in ('project', 'beam', 'python'))


class _CheckVersions(beam.DoFn):
  """Passes its elements on; its set-up (once per worker process) fails on a mismatch."""

  def __init__(self, launched: str):
    self._launched = launched

  def setup(self):
    check_versions(self._launched)

  def process(self, element):
    yield element


class CheckWorkerVersions(beam.PTransform):
  """A pass-through step whose workers check their versions first; nothing without a record
  (a pipeline built outside the launcher)."""

  def __init__(self, launched: str):
    super().__init__()
    self._launched = launched

  def expand(self, elements):
    if not self._launched:
      return elements
    return elements | 'Check' >> beam.ParDo(_CheckVersions(self._launched))
