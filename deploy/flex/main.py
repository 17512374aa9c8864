"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): submit the job and return.

The template launcher calls this file with each parameter as `--name=value`. It adds `--no_wait`
(a template launch that waited would hold the launcher until the job ended), turns `--flag=true`
/ `--flag=false` of on/off flags into `--flag` / nothing (argparse refuses a value on those), and
defaults `--sdk_container_image` to the worker image the template was built with
($PNASNET_WORKER_IMAGE), then runs the project's launcher.
"""

import os
import sys
from typing import List, Mapping

NO_WAIT = '--no_wait'
WORKER_IMAGE_VARIABLE = 'PNASNET_WORKER_IMAGE'
TRUE_WORDS = ('true', '1', 'yes')
FALSE_WORDS = ('false', '0', 'no', '')


def switch_flags() -> set:
  """Every on/off flag the launcher accepts: this project's and Beam's (`--name`)."""
  import argparse

  import pipeline.options  # noqa: F401  (registers the embedding job's flags beside Beam's)
  from pipeline.beam_flags import all_flags_parser
  parser = all_flags_parser()
  return {option for action in parser._actions  # pylint: disable=protected-access
          if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
          for option in action.option_strings if option.startswith('--')}


def template_argv(argv: List[str], environ: Mapping[str, str], switches: set) -> List[str]:
  result = []
  for arg in argv:
    name, has_value, value = arg.partition('=')
    if name in switches and has_value:
      if value.lower() in TRUE_WORDS:
        result.append(name)
      elif value.lower() not in FALSE_WORDS:
        raise SystemExit(f'error: {name}={value}: give true or false')
    else:
      result.append(arg)
  names = {arg.partition('=')[0] for arg in result}
  image = environ.get(WORKER_IMAGE_VARIABLE)
  if image and '--sdk_container_image' not in names:
    result.append(f'--sdk_container_image={image}')
  if NO_WAIT not in names:
    result.append(NO_WAIT)
  return result


if __name__ == '__main__':
  from commands.embed import main
  main(template_argv(sys.argv[1:], os.environ, switch_flags()))
