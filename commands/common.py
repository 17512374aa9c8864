"""What every verb shares: its parser (defaults shown in --help), the --runs and --model flags,
the flags it hands to Beam (checked for typos first), sizes, and exit codes with one-line errors.

Imports neither TensorFlow nor Beam: a verb's --help and its refusals stay fast.
"""

import argparse
import contextlib
import logging
import re
import sys
from typing import Iterator, List, NoReturn, Optional, Sequence, Tuple, Type

import collection
import storage
from pipeline.beam_flags import OptionsError, check_known_flags, unknown_flags

PROGRAM = 'pnasnet-embeddings'
# The exit codes every verb and the docs share; schedulers act on them.
DONE = 0
FAILED = 1  # the job ran and failed: nothing finished was written
REFUSED = 2  # refused before any work: bad flags, inputs or targets
TOO_MANY_FAILURES = 3  # finished, but more images failed than allowed
INTERRUPTED = 130  # Ctrl-C or SIGTERM
BEAM_EPILOG = ('Other --flags go to Beam (--runner, --direct_num_workers, --project, ...), whose '
               'FileSystems read gs:// and s3:// paths (--s3_endpoint_url=URL ...).')
FILESYSTEM_EPILOG = ('Other --flags go to Beam\'s FileSystems, e.g. --s3_endpoint_url=URL '
                     '--s3_region_name=REGION for s3:// paths.')


class HelpWithDefaults(argparse.HelpFormatter):
  """Each flag's default in --help, unless its help already says it ("(default ...", "Default
  ...")."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ''
    if (action.required or not action.option_strings or action.default is None or
        action.default is False or action.default == argparse.SUPPRESS or
        re.search(r'\(default[ :]|Default[ :]|%\(default\)', text)):
      return text
    return text + ' (default: %(default)s)'


def verb_parser(verb: str, description: str, epilog: str = BEAM_EPILOG) -> argparse.ArgumentParser:
  """Abbreviated flags are refused, as Beam's parser refuses them for `embed`: every verb reads
  its flags the same way."""
  return argparse.ArgumentParser(prog=f'{PROGRAM} {verb}', description=description,
                                 epilog=epilog, formatter_class=HelpWithDefaults,
                                 allow_abbrev=False)


def sub_verb(parser: argparse.ArgumentParser, verbs, name: str,
             description: str) -> argparse.ArgumentParser:
  """A verb's own verb (`index build`), read as the verb is."""
  return verbs.add_parser(name, help=description, description=description,
                          epilog=parser.epilog, formatter_class=HelpWithDefaults,
                          allow_abbrev=False)


def _own_flags(parser: argparse.ArgumentParser) -> List[str]:
  """The parser's flags and its sub-verbs', offered first as corrections."""
  flags = []
  for action in parser._actions:  # pylint: disable=protected-access
    flags += action.option_strings
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      flags += [flag for sub in action.choices.values() for flag in _own_flags(sub)]
  return flags


def add_runs_flags(parser: argparse.ArgumentParser, required: bool = True,
                   model_help: str = 'the model id to use when the runs hold several') -> None:
  parser.add_argument('--runs', nargs='+', required=required,
                      help='run directories or globs of them (local, gs://, s3://)')
  parser.add_argument('--model', help=model_help)


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--collection', required=True,
                      help='the collection to read (a local folder, gs://, s3://): what '
                           '`embed --collection` commits to')
  parser.add_argument('--version', type=int,
                      help='read this version of the collection (`collection history` lists '
                           'them); default: the latest')


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
          passes_to_beam: bool = True) -> Tuple[argparse.Namespace, List[str]]:
  """(the verb's options, the other flags, for Beam): a flag neither the verb nor Beam knows is
  refused (exit 2) with the closest match, since Beam would only log and drop it. A verb that
  hands nothing to Beam (`passes_to_beam` False) refuses every other flag, also with the closest
  match."""
  args, beam_flags = parser.parse_known_args(argv)
  own = _own_flags(parser)
  if beam_flags and not passes_to_beam:
    parser.error(unknown_flags(beam_flags, parser.prog, own))
  if beam_flags:
    try:
      check_known_flags(beam_flags, parser.prog, own, beam_only=True)
    except OptionsError as exc:
      parser.error(str(exc))
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
  storage.set_filesystem_options(beam_flags)
  collection.set_store_options(beam_flags)
  return args, beam_flags


def parse_size(text: str) -> int:
  """'4GB', '512MB', '1.5GiB' or a plain count of bytes (GB: 1000^3, GiB: 1024^3)."""
  match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*', text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f'{text!r} is not a size such as 4GB or 512MB')
  power = ' KMGT'.index(match[2].upper() or ' ')
  return int(float(match[1]) * (1024 if match[3] and match[3].lower() == 'ib' else 1000) ** power)


def fail(code: int, message: object) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def exits(refused: Tuple[Type[BaseException], ...] = (),
          failed: Tuple[Type[BaseException], ...] = ()) -> Iterator[None]:
  """What the block raises of `refused` ends the command with exit 2, of `failed` with exit 1:
  one `error:` line each, no traceback."""
  try:
    yield
  except refused as exc:
    fail(REFUSED, exc)
  except failed as exc:
    fail(FAILED, exc)
