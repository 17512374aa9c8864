"""`pnasnet-embeddings VERB`: one command, its verbs' help, their refusals of misspelt flags, and
the exit codes schedulers act on."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.synthetic_collection import write_synthetic_run
from commands import cli, embed
from commands.common import parse_size
from tests.conftest import SAMPLE_IMAGES

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '--model=builtin:pnasnet_tiny'


def _command(*args):
  return subprocess.run([sys.executable, '-m', 'commands', *args], cwd=PROJECT,
                        capture_output=True, text=True, timeout=300)


def test_the_installed_command_lists_every_verb():
  script = os.path.join(os.path.dirname(sys.executable), 'pnasnet-embeddings')
  assert os.path.exists(script), 'pip install -e . installs the console script'
  listed = subprocess.run([script, '--help'], capture_output=True, text=True, check=True).stdout
  for verb in cli.VERBS:
    assert re.search(rf'^  {re.escape(verb)} +\S', listed, re.M), verb


def test_help_and_a_misspelt_verb_import_neither_tensorflow_nor_beam():
  code = ('import sys\nfrom commands import cli\n'
          'codes = [cli.main(["--help"]), cli.main(["idnex"])]\n'
          'print(codes, sorted({"apache_beam", "tensorflow"} & set(sys.modules)))')
  result = subprocess.run([sys.executable, '-c', code], cwd=PROJECT, capture_output=True,
                          text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[0, 2] []'
  assert 'unknown verb idnex; did you mean index?' in result.stderr


def _parsers():
  """(verb, parser) of every verb and sub-verb; `embed`'s own flags as its --help lists them."""
  for verb, (module, _) in cli.VERBS.items():
    parser = importlib.import_module(module).build_parser()
    subparsers = [a for a in parser._actions if isinstance(a.choices, dict)]  # pylint: disable=protected-access
    if subparsers:
      for name, sub in subparsers[0].choices.items():
        yield f'{verb} {name}', sub
    else:
      yield verb, parser


def test_every_verbs_help_shows_each_flags_default():
  seen = 0
  for verb, parser in _parsers():
    formatter = parser._get_formatter()  # pylint: disable=protected-access
    for action in parser._actions:  # pylint: disable=protected-access
      shown = action.default is not None and action.default is not False and (
          action.default != argparse.SUPPRESS)
      if action.option_strings and shown:
        seen += 1
        text = formatter._expand_help(action)  # pylint: disable=protected-access
        assert re.search(r'default', text, re.I), f'{verb} {action.option_strings[0]}: {text}'
  assert seen > 20


@pytest.mark.parametrize('argv, suggestion', [
    (['browse', '--collection', 'c', '--prot', '8766'], '--port'),
    (['neighbours', '--collection', 'c', '--query', 'q.jpg', '--kk', '3'], '--k'),
    (['runs', 'r', '--jsno'], '--json'),
    (['duplicates', '--collection', 'c', '--csv', 'x.csv', '--treshold', '0.9'], '--threshold'),
    (['index', 'build', '--collection', 'c', '--output', 'i', '--memory_budjet', '1GB'],
     '--memory_budget'),
    (['collection', 'import', '--runs', 'r', '--collection', 'c', '--mode', 'm'], '--model'),
    (['export', '--collection', 'c', '--to', 'vertex:v', '--bacth_size', '2'], '--batch_size'),
    (['check-gpu', '--proceses', '2'], '--processes'),
    (['export-model', '--output', 'o', '--sed', '2'], '--seed'),
    (['embed', '--input', 'x', '--outptu', 'o'], '--output'),
])
def test_every_verb_refuses_a_misspelt_flag_before_any_work(argv, suggestion, tmp_path,
                                                            monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as refused:
    cli.main(argv)
  error = capsys.readouterr().err
  assert refused.value.code == 2, error[-2000:]
  assert f'did you mean {suggestion}?' in error, error[-2000:]
  assert sorted(os.listdir(tmp_path)) == []  # nothing written


def test_sizes_in_decimal_and_binary_units_mean_the_same_everywhere():
  assert parse_size('4GB') == 4_000_000_000
  assert parse_size('4GiB') == 4 * 1024 ** 3
  assert parse_size('512mb') == 512_000_000 and parse_size('1000') == 1000
  from commands import duplicates, index
  for parser in (index.build_parser()._subparsers._group_actions[0].choices['build'],  # pylint: disable=protected-access
                 duplicates.build_parser()):
    budget = next(a for a in parser._actions if '--memory_budget' in a.option_strings)  # pylint: disable=protected-access
    assert budget.type('4GiB') == 4 * 1024 ** 3


def test_embed_ends_with_one_line_and_json_on_request(tmp_path, capsys):
  output = tmp_path / 'run'
  embed.main([f'--input={SAMPLE_IMAGES}/chelsea.png', TINY, f'--output={output}'])
  line = capsys.readouterr().out.strip()
  assert re.fullmatch(rf'{re.escape(str(output))}: 1 embedded, 0 skipped \(held by the '
                      r'collection\), 0 failed of 1 matched, in \d+ s \([0-9.]+ images/s\); '
                      r'details: run_summary.json', line), line
  embed.main([f'--input={SAMPLE_IMAGES}/chelsea.png', TINY, f'--output={tmp_path / "again"}',
              '--json'])
  assert json.loads(capsys.readouterr().out)['embedded'] == 1


def test_a_refused_launch_and_a_missing_run_exit_2_with_one_error_line(tmp_path):
  refused = _command('embed', '--input', str(tmp_path / 'nothing' / '*.jpg'), TINY,
                     f'--output={tmp_path / "out"}')
  assert refused.returncode == 2
  assert [line for line in refused.stderr.splitlines() if line.startswith('error:')]
  missing = _command('runs', str(tmp_path / 'nowhere'))
  assert missing.returncode == 2 and missing.stderr.startswith('error: no run directory')


# A pyarrow IO thread inside a Python file's read() until the interpreter exits, made certain: a
# thread of apache/arrow#34314, which ended `compact` and `runs` with exit 134 after their answer.
# What lets it go is an exit handler registered before the command's, so one that runs after it;
# once the interpreter finalizes, the thread's call into Python aborts the process.
_LIBRARY_THREAD_AT_EXIT = '''
import atexit, io, runpy, sys, threading
import pyarrow as pa, pyarrow.parquet as pq
parquet = io.BytesIO()
pq.write_table(pa.table({'row': list(range(10_000))}), parquet, row_group_size=1000)
reading, released = threading.Event(), threading.Event()
atexit.register(released.set)

class HeldFile(io.BytesIO):
  def read(self, *size):
    reading.set()
    released.wait()
    return super().read(*size)

threading.Thread(target=pq.read_table, args=(HeldFile(parquet.getvalue()),), daemon=True).start()
reading.wait()
sys.argv = ['pnasnet-embeddings', *sys.argv[1:]]
runpy.run_module('commands', run_name='__main__', alter_sys=True)
'''


def test_a_library_thread_left_running_does_not_change_the_exit_code(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run'), 20, dimension=16).directory
  result = subprocess.run([sys.executable, '-c', _LIBRARY_THREAD_AT_EXIT, 'runs', run],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stderr) == (0, '')
  assert result.stdout.splitlines()[1].startswith(f'{run}  finished')


def test_runs_and_collection_import_exit_0_run_after_run(tmp_path):
  """`compact` (now `collection import`, which reads the indexes the same way) aborted after its
  success line in 2 runs of 15, `runs` after its table in 1 of about 22 (issue 38): the exit code
  is what schedulers and the morning check read."""
  run = write_synthetic_run(str(tmp_path / 'run'), 20, dimension=16).directory
  codes = {'runs': [_command('runs', run).returncode for _ in range(5)],
           'import': [_command('collection', 'import', '--runs', run, '--collection',
                               str(tmp_path / f'collection{n}')).returncode for n in range(5)]}
  assert codes == {'runs': [0] * 5, 'import': [0] * 5}


# What a successful run printed on stderr every time (issue 38): TensorFlow's native start-up
# notes and CUDA probes on a CPU machine, Beam's routine reports, tensorflow_hub's pkg_resources
# warning, TensorFlow's notes on a module without a fingerprint.
NOISE = ('absl::InitializeLog', 'oneDNN custom operations', 'Could not find cuda drivers',
         'failed call to cuInit', 'This TensorFlow binary is optimized', 'Creating state cache',
         'BatchElements statistics', 'Renamed ', 'pkg_resources', 'Fingerprint not found',
         'path_and_singleprint')


def test_a_successful_embed_says_on_stderr_what_a_user_needs_and_nothing_else(tmp_path,
                                                                               tf1_hub_module):
  result = _command('embed', f'--input={SAMPLE_IMAGES}/c*', f'--model={tf1_hub_module}',
                    f'--output={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert [line for line in lines if any(noise in line for noise in NOISE)] == []
  assert len(lines) <= 4, lines
  assert f'embedding [\'{SAMPLE_IMAGES}/c*\'] with {tf1_hub_module}' in lines[0]
