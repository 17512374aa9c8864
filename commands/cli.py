"""`pnasnet-embeddings VERB [flags]`: the one command. `--help` lists the verbs; `VERB --help`, the
verb's flags with their defaults.

Only the chosen verb's module is imported, so `--help` and a misspelt verb cost no TensorFlow or
Beam import. A verb's `main(argv)` returns its result to Python callers; an int is its exit code
(`runs`, `check-gpu`), anything else means done (0). The console script and `python -m commands`
call `run`, which ends the process with that code (see `run`).
"""

import atexit
import difflib
import importlib
import logging
import os
import sys
from typing import List, NoReturn, Optional

from commands.common import DONE, PROGRAM, REFUSED

# verb: (module, what it does, in one line)
VERBS = {
    'embed': ('commands.embed', 'embed images (files, folders, globs, manifests) into a run '
              'directory'),
    'runs': ('commands.runs', 'list run directories: finished, failed or unfinished, with counts'),
    'neighbours': ('commands.neighbours', 'the images nearest a query image, exactly or through '
                   'an index'),
    'duplicates': ('commands.duplicates', 'exact and near duplicates, as a CSV and a contact '
                   'sheet'),
    'index': ('commands.index', 'build an approximate-neighbour index over runs, or add newer '
              'runs to it'),
    'collection': ('commands.collection', 'the collection: import run directories once, '
                   'compact, clean up old versions, list its history'),
    'export': ('commands.export', 'keep the collection in pgvector, Milvus, Qdrant or Vertex AI '
               'files'),
    'browse': ('commands.browse', 'a local web page to search the collection and look at its '
               'duplicates'),
    'check-gpu': ('commands.check_gpu', 'check a worker container\'s GPU, model and process '
                  'layout before paying for a GPU job'),
    'export-model': ('commands.export_model', 'write the built-in network as a TF1 Hub module '
                     'or a SavedModel'),
}


def usage() -> str:
  width = max(map(len, VERBS))
  lines = [f'usage: {PROGRAM} VERB [flags]   ({PROGRAM} VERB --help: the verb\'s flags)', '',
           'PNASNet-5 image embeddings at scale with Apache Beam.', '', 'verbs:']
  lines += [f'  {verb.ljust(width)}  {text}' for verb, (_, text) in VERBS.items()]
  lines += ['', 'Exit codes: 0 done, 1 the job failed, 2 refused before any work,',
            '3 finished with too many failures, 130 interrupted.']
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help'):
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return DONE if argv else REFUSED
  verb, rest = argv[0], argv[1:]
  if verb not in VERBS:
    close = difflib.get_close_matches(verb, list(VERBS), n=1)
    print(f'error: unknown verb {verb}' + (f'; did you mean {close[0]}?' if close else '') +
          f' ({PROGRAM} --help lists the verbs)', file=sys.stderr)
    return REFUSED
  result = importlib.import_module(VERBS[verb][0]).main(rest)
  return result if isinstance(result, int) and not isinstance(result, bool) else DONE


def run(argv: Optional[List[str]] = None) -> NoReturn:
  """`main` as a process: its exit code, whatever native threads are still running.

  A library's pool thread can still be releasing a Python object when the command is done
  (pyarrow's, after reading Parquet through a Python file: apache/arrow#34314). Once the
  interpreter finalizes, that thread's wait for the GIL ends it with pthread_exit inside a C++
  destructor: `terminate called without an active exception`, exit 134 after a correct answer
  (`compact` 3 runs in 30 here). So the process ends with os._exit after the exit handlers
  (Milvus Lite's servers, temporary files, logging), before finalization. Not in `main`: tests
  call it in-process."""
  exit_code = []
  atexit.register(_exit_now, exit_code)  # before the verb registers any: runs after all of them
  try:
    exit_code.append(main(argv))
  except SystemExit as stop:  # a refusal or a failure (commands.common.fail), --help
    exit_code.append(0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1)
    raise
  sys.exit(exit_code[0])


def _exit_now(exit_code: List[int]) -> None:
  """An uncaught exception (no code) ends as Python ends it: its traceback, exit 1 or 130."""
  if exit_code:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code[0])
