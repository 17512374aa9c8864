"""Which vector `embeddings.load` and `iter_shards` return per URI over many runs: the latest
finished run that looked at a URI decides; files gone from a later run's input drop out; unfinished
runs are skipped with a warning; `history=True` keeps what later runs no longer have."""

import logging
import os
import shutil

import numpy as np
import pytest

import embeddings
from pipeline.launcher import run as run_pipeline
from tests.conftest import SAMPLE_IMAGES
from tests.run_writer import rows, write_run

TINY = '--model=builtin:pnasnet_tiny'


def _by_uri(collection):
  return {uri: collection.vectors[i] for i, uri in enumerate(collection.uris)}


def _runs_of(collection):
  return dict(zip(collection.uris, collection.metadata.column('run').to_pylist()))


def test_a_file_broken_deleted_or_renamed_after_a_run_is_gone_from_the_collection(tmp_path):
  """Item 3 of issue 18, with the pipeline: the second, incremental run dead-letters a photo
  replaced by a broken file, no longer matches a deleted one, and finds one under a new name."""
  photos = tmp_path / 'photos'
  photos.mkdir()
  for name in ('astronaut.png', 'camera.png', 'chelsea.png', 'coffee.png'):
    shutil.copy(os.path.join(SAMPLE_IMAGES, name), photos / name)
  first, second = str(tmp_path / 'runs' / '1'), str(tmp_path / 'runs' / '2')
  run_pipeline([f'--input={photos}', TINY, f'--output={first}'])
  (photos / 'camera.png').write_bytes(b'not an image any more')
  os.remove(photos / 'chelsea.png')
  os.rename(photos / 'astronaut.png', photos / 'renamed.png')
  summary = run_pipeline([f'--input={photos}', TINY, f'--output={second}',
                          f'--incremental_from={tmp_path}/runs/*'])
  assert (summary['embedded'], summary['skipped'], summary['failed']) == (1, 1, 1)

  collection = embeddings.load(f'{tmp_path}/runs/*')
  assert _runs_of(collection) == {str(photos / 'coffee.png'): first,  # skipped: first's vector
                                  str(photos / 'renamed.png'): second}
  np.testing.assert_array_equal(_by_uri(collection)[str(photos / 'coffee.png')],
                                _by_uri(embeddings.load(first))[str(photos / 'coffee.png')])
  shards = embeddings.iter_shards(f'{tmp_path}/runs/*')
  assert sorted(u for s in shards for u in s.uris) == sorted(collection.uris)


def test_an_unfinished_run_is_skipped_with_a_warning_named_or_in_a_glob(tmp_path, caplog):
  """Item 15 of issue 18: an interrupted run leaves its claim (and maybe some shards), no
  summary."""
  write_run(str(tmp_path / 'runs' / 'done'), rows(['a'], 4, seed=1))
  interrupted = tmp_path / 'runs' / 'interrupted'
  interrupted.mkdir()
  (interrupted / 'run_claim.json').write_text('{"started_at": "2026-01-02T00:00:00Z"}')
  (interrupted / 'beam-temp-embeddings-0123').mkdir()
  failed = tmp_path / 'runs' / 'failed'
  write_run(str(failed), rows(['a', 'b'], 4, seed=2), summary=False)
  (failed / 'run_claim.json').write_text('{"started_at": "2026-01-03T00:00:00Z"}')

  with caplog.at_level(logging.WARNING, logger='embeddings'):
    assert embeddings.load(str(tmp_path / 'runs' / '*')).uris == ['a']
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2, warnings
  for directory in (interrupted, failed):
    [warning] = [w for w in warnings if str(directory) in w]
    assert 'unfinished' in warning

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='embeddings'):
    assert embeddings.load([str(interrupted), str(tmp_path / 'runs' / 'done')]).uris == ['a']
  assert f'{interrupted}' in caplog.text and 'unfinished' in caplog.text
  with pytest.raises(embeddings.NoRunsError, match=f'{interrupted}.*unfinished run'):
    embeddings.load(str(interrupted))


def test_a_skipped_file_has_the_vector_of_the_run_that_embedded_that_version(tmp_path):
  version1 = rows(['a', 'b', 'c'], 4, seed=1)
  version2 = [r._replace(size_bytes=2000) for r in rows(['a'], 4, seed=2)]
  write_run(str(tmp_path / '1'), version1[:2], failed_uris=['c'],
            finished_at='2026-01-01T00:00:00Z')
  write_run(str(tmp_path / '2'), version2, skipped_rows=version1[1:],
            finished_at='2026-01-02T00:00:00Z')  # a changed; b and the undecodable c unchanged
  write_run(str(tmp_path / '3'), [], skipped_rows=version2 + version1[1:], embedding_size=4,
            finished_at='2026-01-03T00:00:00Z')
  collection = embeddings.load(str(tmp_path / '*'))
  assert _runs_of(collection) == {'a': str(tmp_path / '2'), 'b': str(tmp_path / '1')}
  np.testing.assert_array_equal(_by_uri(collection)['a'], version2[0].embedding)
  np.testing.assert_array_equal(_by_uri(collection)['b'], version1[1].embedding)

  # A run that skipped `a` as the first version (its --incremental_from named run 1 alone).
  write_run(str(tmp_path / '3'), [], skipped_rows=version1[:2], embedding_size=4,
            finished_at='2026-01-03T00:00:00Z')
  assert _runs_of(embeddings.load(str(tmp_path / '*')))['a'] == str(tmp_path / '1')
  # Without the run that embedded a skipped version, that file has no vector.
  assert embeddings.load(str(tmp_path / '3')).uris == []


def test_a_later_failure_removes_the_vector_without_reading_the_superseded_shard(tmp_path):
  old = rows(['a', 'b'], 4, seed=1)
  [old_shard] = write_run(str(tmp_path / 'old'), old, finished_at='2026-01-01T00:00:00Z')
  write_run(str(tmp_path / 'new'), rows(['a'], 4, seed=2), failed_uris=['b'],
            finished_at='2026-01-02T00:00:00Z')
  with open(old_shard, 'wb') as f:
    f.write(b'not a TFRecord file: nothing of it is left, so it must not be read')
  collection = embeddings.load(str(tmp_path / '*'))
  assert _runs_of(collection) == {'a': str(tmp_path / 'new')}


# (older run's inputs, manifests, URIs; newer run's inputs, manifests, URIs; URIs of the older
# run left in the collection)
COVERAGE = [
    pytest.param(['/p'], [], ['/p/a', '/p/b', '/p/sub/c'], ['/p'], [], ['/p/a'], [],
                 id='same folder: deleted files drop out'),
    pytest.param(['/p/'], [], ['/p/a', '/p/b'], ['/p'], [], ['/p/a'], [],
                 id='a trailing slash is the same folder'),
    pytest.param(['/p/2025'], [], ['/p/2025/a', '/p/2025/b'], ['/p'], [], ['/p/2025/a'], [],
                 id='a folder covers its sub-folders'),
    pytest.param(['/g/*.jpg'], [], ['/g/1.jpg', '/g/2.jpg'], ['/g'], [], ['/g/1.jpg'], [],
                 id='a folder covers a glob inside it'),
    pytest.param(['/g/*.jpg'], [], ['/g/1.jpg', '/g/2.jpg'], ['/g/*.jpg'], [], ['/g/1.jpg'], [],
                 id='the same glob'),
    pytest.param(['/h'], [], ['/h/1.png', '/h/2.jpg'], ['/h/*.jpg'], [], ['/h/2.jpg'],
                 ['/h/1.png'], id='a glob does not cover the folder it is in'),
    pytest.param(['/q/x'], [], ['/q/x/1'], ['/q/y'], [], ['/q/y/1'], ['/q/x/1'],
                 id='other inputs cover nothing'),
    pytest.param(['/pq'], [], ['/pq/1'], ['/p'], [], ['/p/1'], ['/pq/1'],
                 id='a folder is not a name prefix'),
    pytest.param([], ['/m.txt'], ['/m/1', '/m/2'], [], ['/m.txt'], ['/m/1'], [],
                 id='the same manifest'),
    pytest.param([], ['/m.txt'], ['/m/1', '/m/2'], [], ['/n.txt'], ['/m/1'], ['/m/2'],
                 id='another manifest'),
    pytest.param(['/p/a', '/p/b'], [], ['/p/a', '/p/b'], ['/p/a'], [], ['/p/a'], ['/p/b'],
                 id='a file input not given again'),
    pytest.param(['/p/2025'], ['/m.txt'], ['/p/2025/a', '/z/b'], ['/p'], [], ['/p/x'],
                 ['/z/b'], id='a file under a later folder is covered by it alone'),
    pytest.param([], [], ['/p/a'], [], [], ['/p/b'], ['/p/a'],
                 id='runs that recorded no inputs cover nothing'),
]


@pytest.mark.parametrize('older_inputs,older_manifests,older_uris,newer_inputs,newer_manifests,'
                         'newer_uris,kept', COVERAGE)
def test_files_drop_out_where_a_later_run_covered_them_and_did_not_match_them(
    tmp_path, older_inputs, older_manifests, older_uris, newer_inputs, newer_manifests,
    newer_uris, kept):
  write_run(str(tmp_path / 'older'), rows(older_uris, 4, seed=1), inputs=older_inputs,
            input_manifest=older_manifests, finished_at='2026-01-01T00:00:00Z')
  write_run(str(tmp_path / 'newer'), rows(newer_uris, 4, seed=2), inputs=newer_inputs,
            input_manifest=newer_manifests, finished_at='2026-01-02T00:00:00Z')
  collection = embeddings.load(str(tmp_path / '*'))
  expected = dict.fromkeys(kept, str(tmp_path / 'older'))
  expected.update(dict.fromkeys(newer_uris, str(tmp_path / 'newer')))
  assert _runs_of(collection) == expected
  # Either order of the arguments, and shard by shard, give the same.
  assert sorted(u for s in embeddings.iter_shards([str(tmp_path / 'newer'),
                                                   str(tmp_path / 'older')])
                for u in s.uris) == sorted(expected)


def test_a_folder_a_later_run_could_not_list_keeps_its_files(tmp_path):
  write_run(str(tmp_path / 'older'), rows(['/u/a', '/u/locked/b', '/u/lockedb'], 4, seed=1),
            inputs=['/u'], finished_at='2026-01-01T00:00:00Z')
  write_run(str(tmp_path / 'newer'), rows(['/u/a'], 4, seed=2), failed_uris=['/u/locked'],
            failed_stage='read', inputs=['/u'], finished_at='2026-01-02T00:00:00Z')
  assert _runs_of(embeddings.load(str(tmp_path / '*'))) == {
      '/u/a': str(tmp_path / 'newer'), '/u/locked/b': str(tmp_path / 'older')}


def test_history_keeps_each_uri_with_its_latest_embedding(tmp_path):
  old, new = rows(['/p/a', '/p/b', '/p/c'], 4, seed=1), rows(['/p/a'], 4, seed=2)
  write_run(str(tmp_path / 'old'), old, inputs=['/p'], finished_at='2026-01-01T00:00:00Z')
  write_run(str(tmp_path / 'new'), new, failed_uris=['/p/b'], inputs=['/p'],
            finished_at='2026-01-02T00:00:00Z')  # /p/b now broken, /p/c deleted
  assert _runs_of(embeddings.load(str(tmp_path / '*'))) == {'/p/a': str(tmp_path / 'new')}
  expected = {'/p/a': str(tmp_path / 'new'), '/p/b': str(tmp_path / 'old'),
              '/p/c': str(tmp_path / 'old')}
  history = embeddings.load(str(tmp_path / '*'), history=True)
  assert _runs_of(history) == expected
  np.testing.assert_array_equal(_by_uri(history)['/p/a'], new[0].embedding)
  np.testing.assert_array_equal(_by_uri(history)['/p/b'], old[1].embedding)
  shards = embeddings.iter_shards(str(tmp_path / '*'), history=True)
  assert sorted(u for s in shards for u in s.uris) == sorted(expected)
