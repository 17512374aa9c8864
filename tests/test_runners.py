"""The runners users get: the local FnApiRunner without --runner (no Prism download), Beam's
portable Job API (the path Prism, Flink and Spark take) with the same outcome, and workers that
refuse to run another version of the launch."""

import os
import shutil
import subprocess
import sys

import duckdb
import numpy as np

from embeddings import load_run
from pipeline.launcher import PROJECT_SETUP_FILE, run
from tests.outputs import read_failures

PROJECT = os.path.dirname(PROJECT_SETUP_FILE)
TINY = '--model=builtin:pnasnet_tiny'
PORTABLE = ['--runner=PortableRunner', '--job_endpoint=embed', '--environment_type=LOOPBACK']


def _outcome(summary, output):
  """What a run produced, independent of how its runner sharded the files."""
  loaded = load_run(output)
  vectors = {uri: np.asarray(vector) for uri, vector in zip(loaded.uris, loaded.vectors)}
  counts = {key: summary[key] for key in ('matched', 'embedded', 'failed', 'skipped',
                                          'failed_by_stage', 'outcome')}
  failures = sorted((os.path.basename(f['uri']), f['stage']) for f in read_failures(output))
  index = sorted(duckdb.sql(f"select uri, outcome from '{output}/index-*.parquet'").fetchall())
  kinds = sorted({name.split('-')[0] for name in os.listdir(output)})
  return counts, vectors, failures, [(os.path.basename(u), o) for u, o in index], kinds


def test_the_portable_job_api_gives_the_in_memory_run_s_outcome(image_folder, tmp_path):
  """A first night in memory, then the same second night (new photos, broken files, skipped
  ones) in memory and through the Job API in-process."""
  photos = tmp_path / 'photos'
  photos.mkdir()
  names = sorted(os.listdir(image_folder))
  for name in names[:4]:
    shutil.copy(image_folder / name, photos / name)
  run([f'--input={photos}', TINY, f'--output={tmp_path}/runs/1',
       f'--collection={tmp_path}/in_memory'])
  shutil.copytree(tmp_path / 'in_memory', tmp_path / 'portable')  # both nights read night 1
  for name in names[4:]:
    shutil.copy(image_folder / name, photos / name)
  second = [f'--input={photos}', TINY]
  in_memory = run(second + [f'--output={tmp_path}/runs/in_memory',
                            f'--collection={tmp_path}/in_memory'])
  portable = run(second + [f'--output={tmp_path}/runs/portable',
                           f'--collection={tmp_path}/portable'] + PORTABLE)
  assert portable['runner'] == 'PortableRunner' and in_memory['runner'] == 'FnApiRunner'
  expected = _outcome(in_memory, f'{tmp_path}/runs/in_memory')
  got = _outcome(portable, f'{tmp_path}/runs/portable')
  assert expected[0] == got[0] and expected[0]['skipped'] > 0 and expected[0]['failed'] > 0
  assert expected[1].keys() == got[1].keys()
  for uri, vector in expected[1].items():
    np.testing.assert_array_equal(vector, got[1][uri])
  assert expected[2:] == got[2:]


def test_a_default_local_run_downloads_nothing(image_folder, tmp_path):
  """Beam's DirectRunner would try Prism first (a download from GitHub); the default is the
  FnApiRunner the tests run."""
  result = subprocess.run(
      [sys.executable, 'run_pipeline.py', f'--input={image_folder}/camera.png', TINY,
       f'--output={tmp_path}/out', '--json'], cwd=PROJECT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr
  assert 'prism' not in result.stderr.lower() and 'Downloading' not in result.stderr
  assert '"runner": "FnApiRunner"' in result.stdout


def test_a_worker_of_another_version_fails_at_once_naming_both(image_folder, tmp_path):
  launched = 'project=pnasnet-embeddings 0.0.1;beam=2.0.0;python=3.11'
  result = subprocess.run(
      [sys.executable, 'run_pipeline.py', f'--input={image_folder}/camera.png', TINY,
       f'--output={tmp_path}/out', f'--launch_versions={launched}'],
      cwd=PROJECT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1
  assert result.stderr.count('but the job was launched with') == 1, result.stderr[-3000:]
  assert 'the job was launched with project pnasnet-embeddings 0.0.1, beam 2.0.0' in result.stderr
  assert 'this worker runs project pnasnet-embeddings' in result.stderr
  assert not (tmp_path / 'out' / 'run_summary.json').exists()
