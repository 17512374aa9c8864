"""Nightly state that stays right for years (issue 23): a failed night is not state, a deleted run's
vectors are embedded again, a narrow run supersedes nothing, a live run refuses a second night, and
compaction lets every older run go."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import embeddings
from commands import compact as compact_command
from commands.embed import main
from embeddings import list_runs
from pipeline.launcher import TooManyFailuresError, read_summary, run
from run_format import CLAIM_FILE

TINY = '--model=builtin:pnasnet_tiny'
PHOTOS = ('astronaut.png', 'camera.png', 'chelsea.png')
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def photos(image_folder, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in PHOTOS:
    shutil.copy(image_folder / name, folder / name)
  return folder


def _night(photos, runs, name, *flags):
  return run([f'--input={photos}', TINY, f'--output={runs}/{name}',
              f'--incremental_from={runs}/*'] + list(flags))


def _vectors(collection):
  return {uri: collection.vectors[i] for i, uri in enumerate(collection.uris)}


def _claim(directory, started_at, **fields):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CLAIM_FILE), 'w') as f:
    json.dump(dict({'started_at': started_at, 'host': 'batch-7', 'pid': 4242,
                    'runner': 'DataflowRunner', 'output_format': 'tfrecord'}, **fields), f)


def _ago(hours: float) -> str:
  return (datetime.datetime.now(datetime.timezone.utc) -
          datetime.timedelta(hours=hours)).isoformat(timespec='milliseconds')


def test_a_failed_night_is_not_state_and_the_next_night_embeds_all(photos, tmp_path):
  """Item 1: every image of night 1 fails at decode (here: a pixel limit below every photo, as a
  broken decoder would); night 2, the same files, embeds them all instead of skipping them."""
  runs = tmp_path / 'runs'
  with pytest.raises(TooManyFailuresError):
    _night(photos, runs, '1', '--max_image_pixels=100', '--allow_no_earlier_runs')
  assert read_summary(f'{runs}/1').outcome == 'too_many_failures'
  second = _night(photos, runs, '2')
  assert (second['embedded'], second['skipped'], second['failed']) == (3, 0, 0)
  assert second['source_runs'] == []  # the failed night is not a source either
  assert sorted(embeddings.load(f'{runs}/*').uris) == sorted(str(photos / n) for n in PHOTOS)


def test_deleting_the_oldest_run_re_embeds_exactly_what_it_held(photos, image_folder, tmp_path):
  """Item 2: r1 embeds three photos, r2 skips them (its index names r1 as their vector_run) and
  embeds a new one; a retention rule deletes r1; list_runs and load say what is lost, and r3
  embeds exactly r1's photos again, after which load has every image."""
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  shutil.copy(image_folder / 'coffee.png', photos / 'coffee.png')
  second = _night(photos, runs, '2')
  assert (second['embedded'], second['skipped']) == (1, 3)
  shutil.rmtree(runs / '1')
  [state] = list_runs.list_runs([str(runs / '2')])
  assert state.counts['lost'] == 3 and 'vector_run is gone' in state.note
  assert embeddings.load(f'{runs}/*').uris == [str(photos / 'coffee.png')]
  third = _night(photos, runs, '3')
  assert (third['embedded'], third['skipped']) == (3, 1)
  everything = embeddings.load(f'{runs}/*')
  assert sorted(everything.uris) == sorted(str(photos / n) for n in PHOTOS + ('coffee.png',))
  assert dict(zip(everything.uris, everything.metadata.column('run').to_pylist()))[
      str(photos / 'coffee.png')] == str(runs / '2')


def test_full_then_narrow_then_full_again_embeds_nothing(photos, tmp_path):
  """Item 3: a backfill of one file between two full nights supersedes nothing."""
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  narrow = run([f'--input={photos}/camera.png', TINY, f'--output={runs}/2',
                f'--incremental_from={runs}/*'])
  assert (narrow['embedded'], narrow['skipped']) == (0, 1)
  full = _night(photos, runs, '3')
  assert (full['embedded'], full['skipped']) == (0, 3)
  assert sorted(full['incremental_runs']) == [f'{runs}/1', f'{runs}/2']


def test_a_night_beside_a_live_run_is_refused_and_beside_a_dead_one_it_runs(photos, tmp_path,
                                                                          capsys, caplog):
  """Item 4: a run launched elsewhere a minute ago is alive, so a second night exits 2 before any
  work, naming it (unless --allow_concurrent); once neither its launch nor its job's heartbeat is
  within the hour it is dead: the night runs and names it, as it names a local run launched here
  a moment ago whose launcher is gone. A finished run's claim carries the heartbeat its job
  wrote."""
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  with open(runs / '1' / CLAIM_FILE) as f:
    assert 'heartbeat_at' in json.load(f)  # rewritten by the job while it ran
  _claim(runs / 'elsewhere', _ago(2), heartbeat_at=_ago(1 / 60))
  argv = [f'--input={photos}', TINY, f'--output={runs}/2', f'--incremental_from={runs}/*']
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_info.value.code == 2 and f'{runs}/elsewhere' in error and 'batch-7' in error
  assert '--allow_concurrent' in error and not os.path.exists(runs / '2')
  beside = run(argv[:2] + [f'--output={runs}/2b', argv[3], '--allow_concurrent'])
  assert (beside['embedded'], beside['skipped']) == (0, 3)
  _claim(runs / 'elsewhere', _ago(2), heartbeat_at=_ago(1.5))
  exited = subprocess.Popen([sys.executable, '-c', 'pass'])
  exited.wait()
  _claim(runs / 'here', _ago(0), host=socket.gethostname(), pid=exited.pid, runner='FnApiRunner')
  night = run(argv)
  assert (night['embedded'], night['skipped']) == (0, 3)
  warnings = {name: [r.getMessage() for r in caplog.records if f'{runs}/{name} ' in
                     r.getMessage() and 'dead run' in r.getMessage()]
              for name in ('elsewhere', 'here')}
  [here] = warnings['here']  # dead because its launcher's process is gone, not for an hour
  assert 'its launcher is no longer running on this host' in here
  assert 'last sign of life' not in here and '60 min' not in here
  assert 'no sign of life for 60 min or more' in warnings['elsewhere'][0]
  [dead] = [s for s in list_runs.list_runs([f'{runs}/*']) if s.run == f'{runs}/elsewhere']
  assert dead.state == 'unfinished' and dead.note.endswith('dead (interrupted or failed)')


def test_the_next_night_deletes_a_dead_runs_temp_folders_and_nothing_else(photos, tmp_path):
  """Issue 25, item 5: what a failed run's sinks left (beam-temp-<prefix>-<32 hex>, up to the
  size of its embeddings) goes with the next run into the same parent; its claim, its shards and
  anything not named as Beam names its folders stay."""
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  died = runs / 'died'
  _claim(died, _ago(3))
  ours = died / 'beam-temp-embeddings-0a1b2c3d4e5f60718293a4b5c6d7e8f9'
  ours.mkdir()
  (ours / 'part-0').write_bytes(b'partial')
  kept = [died / 'beam-temp-notes', died / 'beam-temp-embeddings-mine', died / 'index-01.jpg']
  kept[0].mkdir()
  kept[1].mkdir()
  kept[2].write_bytes(b'a user file')
  _night(photos, runs, '2')
  assert not ours.exists()
  assert all(path.exists() for path in kept) and (died / CLAIM_FILE).exists()


def test_compact_then_delete_every_older_run(photos, image_folder, tmp_path, capsys):
  """Compaction: one run from the latest vectors (and the broken file as undecodable); with every
  older run deleted, load returns the same vectors, and the next night skips everything."""
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  shutil.copy(image_folder / 'coffee.png', photos / 'coffee.png')
  (photos / 'chelsea.png').write_bytes(b'not an image any more')
  os.remove(photos / 'astronaut.png')
  _night(photos, runs, '2')
  before = _vectors(embeddings.load(f'{runs}/*'))
  assert sorted(before) == [str(photos / 'camera.png'), str(photos / 'coffee.png')]
  summary = compact_command.main(['--runs', f'{runs}/*', '--output', f'{tmp_path}/compacted/1'])
  assert (summary['embedded'], summary['failed'], summary['outcome']) == (2, 1, 'finished')
  assert 'may now be deleted' in capsys.readouterr().out
  shutil.rmtree(runs)
  after = _vectors(embeddings.load(f'{tmp_path}/compacted/1'))
  assert sorted(after) == sorted(before)
  for uri, vector in before.items():
    np.testing.assert_array_equal(after[uri], vector)
  night = run([f'--input={photos}', TINY, f'--output={runs}/3',
               f'--incremental_from={tmp_path}/compacted/*'])
  assert (night['embedded'], night['skipped'], night['failed']) == (0, 3, 0)


def test_compact_refuses_beside_a_live_run(photos, tmp_path, capsys):
  runs = tmp_path / 'runs'
  _night(photos, runs, '1', '--allow_no_earlier_runs')
  _claim(runs / 'going', _ago(0.1))
  with pytest.raises(SystemExit) as exit_info:
    compact_command.main(['--runs', f'{runs}/*', '--output', f'{tmp_path}/compacted'])
  assert exit_info.value.code == 2 and f'{runs}/going' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'compacted')


def test_a_read_only_output_is_refused_in_one_line(image_folder, tmp_path):
  """Issue 26, item 3: --output on a read-only file system (a read-only bind mount, in a user and
  mount namespace of its own) exits 2 with one line, no traceback."""
  readonly = tmp_path / 'readonly'
  readonly.mkdir()
  command = (f'mount --bind -o ro {readonly} {readonly} && exec {sys.executable} run_pipeline.py '
             f'--input={image_folder}/camera.png {TINY} --output={readonly}/out')
  result = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                           command], cwd=PROJECT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --output {readonly}/out cannot be written: Read-only file '
                         'system'), last
  assert not os.path.exists(readonly / 'out')
