"""Flags handed to Beam, checked first: Beam only logs and drops a flag it does not know, so a
misspelt one would silently become a default. Beam is imported only to build its parser, so a
command can word its own refusals with `unknown_flags` at no import cost."""

import argparse
import difflib
from typing import Sequence


class OptionsError(ValueError):
  """A flag's value cannot work; raised before any work starts."""


def unknown_flags(unknown: Sequence[str], command: str, own_flags: Sequence[str],
                  known: Sequence[str] = ()) -> str:
  """One line per unknown flag, with the closest of the command's own flags, else of `known`."""
  problems = []
  for flag in [arg.split('=', 1)[0] for arg in unknown if arg.startswith('-')] or unknown:
    close = (difflib.get_close_matches(flag, list(own_flags), n=1) or
             difflib.get_close_matches(flag, list(known), n=1))
    problems.append(f'unknown flag {flag}' + (f'; did you mean {close[0]}?' if close else ''))
  return '\n'.join(problems) + f'\n({command} --help lists the flags)'


def all_flags_parser(command: str = 'pnasnet-embeddings embed',
                     beam_only: bool = False) -> argparse.ArgumentParser:
  """Every option Beam and this project know, as `PipelineOptions.get_all_options` sees them
  (`beam_only`: Beam's own, not the embedding job's); `command` is named in its errors, in one
  line: argparse would answer a bad value (`--output_format csv`, a flag left without its value)
  with a usage line listing some 165 options."""
  from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

  class OneLineErrors(_BeamArgumentParser):

    def error(self, message):
      raise OptionsError(f'{message} ({command} --help lists the flags)')

  parser = OneLineErrors(prog=command, allow_abbrev=False, add_help=False)
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    if beam_only and not cls.__module__.startswith('apache_beam.'):
      continue
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def check_known_flags(argv: Sequence[str], command: str = 'pnasnet-embeddings embed',
                      own_flags: Sequence[str] = (), beam_only: bool = False) -> None:
  """OptionsError naming each flag neither the command (`own_flags`, offered first as
  corrections) nor Beam knows (`beam_only`: nor the embedding job, for the other verbs)."""
  parser = all_flags_parser(command, beam_only)
  _, unknown = parser.parse_known_args(list(argv))
  if unknown:
    known = [s for action in parser._actions for s in action.option_strings]  # pylint: disable=protected-access
    raise OptionsError(unknown_flags(unknown, command, own_flags, known))
