"""Flags handed to Beam, checked first: Beam only logs and drops a flag it does not know, so a
misspelt one would silently become a default. Imports Beam's options alone (no TensorFlow), so
every command can check its flags cheaply."""

import argparse
import difflib
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser


class OptionsError(ValueError):
  """A flag's value cannot work; raised before any work starts."""


class _OneLineErrors(_BeamArgumentParser):
  """argparse answers a bad value (`--output_format csv`, a flag left without its value) with
  its usage line, which for Beam's parser lists some 165 options: say the problem in one line,
  naming the `command` whose --help lists the flags."""

  def __init__(self, command: str, **kwargs):
    super().__init__(**kwargs)
    self.command = command

  def error(self, message):
    raise OptionsError(f'{message} ({self.command} --help lists the flags)')


def all_flags_parser(command: str = 'pnasnet-embeddings embed') -> argparse.ArgumentParser:
  """Every option Beam and this project know, as `PipelineOptions.get_all_options` sees them;
  `command` is named in its errors."""
  parser = _OneLineErrors(command, prog=command, allow_abbrev=False, add_help=False)
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def check_known_flags(argv: Sequence[str], command: str = 'pnasnet-embeddings embed',
                      own_flags: Sequence[str] = ()) -> None:
  """Beam only logs and drops flags it does not know, so a typo silently becomes a default.
  `own_flags`: the calling command's flags, offered first as corrections."""
  parser = all_flags_parser(command)
  _, unknown = parser.parse_known_args(list(argv))
  flags = [arg.split('=', 1)[0] for arg in unknown if arg.startswith('-')]
  if not flags and not unknown:
    return
  known = [s for action in parser._actions for s in action.option_strings]  # pylint: disable=protected-access
  problems = []
  for flag in flags or unknown:
    close = difflib.get_close_matches(flag, list(own_flags), n=1) or difflib.get_close_matches(
        flag, known, n=1)
    problems.append(f'unknown flag {flag}' + (f'; did you mean {close[0]}?' if close else ''))
  raise OptionsError('\n'.join(problems) + f'\n({command} --help lists the flags)')
