"""The FAISS neighbour index over a collection: build (its ids the collection's row ids, its rows
read from the collection), `add` after nights (only the changes: inserted rows added, deleted
row ids gone, ids equal to the collection's, nothing new after a compaction), refusals, float16
collections read back as float32. Its plans (PCA and product codes), re-rank and health checks:
tests/test_index_plans.py."""

import datetime
import json
import os

import numpy as np
import pytest

import collection
from benchmarks.synthetic_collection import write_synthetic_collection
from commands import index as index_command
from embeddings import neighbour_index
from embeddings.similarity import unit_rows
from jobs import index_plan
from storage.run_dirs import MixedModelsError
from tests.collection_nights import night, vectors_of

DIMENSION = 48
OTHER_MODEL = 'builtin:pnasnet_mobile@synthetic-seed0'


def held(uri: str, version=None) -> tuple:
  """(row ids, uris, float32 vectors) of a collection version, in row id order."""
  table = collection.open_collection(uri, version).dataset.to_table(
      columns=['uri', 'embedding'], with_row_id=True).sort_by('_rowid')
  vectors = np.asarray(table.column('embedding').to_pylist(), np.float32)
  return (table.column('_rowid').to_numpy().astype(np.int64), table.column('uri').to_pylist(),
          vectors)


def exact_top(uris, vectors, queries: np.ndarray, k: int) -> list:
  scores = unit_rows(queries) @ unit_rows(vectors).T
  return [[uris[i] for i in np.argsort(-row, kind='stable')[:k]] for row in scores]


def build(uri: str, output: str, *flags) -> str:
  index_command.main(['build', '--collection', uri, '--output', output, *flags])
  return output


def test_an_exhaustive_index_equals_exact_search_its_ids_and_rows_the_collections(tmp_path):
  made = write_synthetic_collection(str(tmp_path / 'collection'), 600, seed=1,
                                    dimension=DIMENSION, clusters=6, fragment_rows=250)
  directory = build(made.uri, str(tmp_path / 'index'))
  index = neighbour_index.NeighbourIndex(directory)
  ids, uris, vectors = held(made.uri)
  with open(os.path.join(directory, neighbour_index.INDEX_FILE)) as f:
    description = json.load(f)
  assert (description['collection'], description['version']) == (made.uri, made.versions[-1])
  assert description['plan']['kind'] == 'exhaustive' and description['model'] == made.model_id
  assert index.count == 600 and np.array_equal(index.indexed_ids(), ids)
  queries = vectors[:20]
  found = index.search(queries, 10, model=made.model_id)
  assert [[n.uri for n in row] for row in found] == exact_top(uris, vectors, queries, 10)
  assert [row[0].metadata['id'] for row in found] == ids[:20].tolist()
  assert found[0][0].score == pytest.approx(1.0, abs=1e-5)
  assert found[0][0].metadata['run'] == 'synthetic-night-0'
  np.testing.assert_array_equal(index.stored_vectors(ids[[250, 5]]), vectors[[250, 5]])
  row = index.find_row('uri', uris[42])
  assert (row['id'], row['uri']) == (ids[42], uris[42])
  assert index.find_row('sha256', row['sha256'])['id'] == ids[42]
  assert index.find_row('uri', 'gs://nowhere/not-an-image.jpg') is None
  assert index.description['probe_recall_at_10'] == pytest.approx(1.0)
  assert len(index.sample_uris(7)) == 7


def test_defects_4_and_5_add_reads_only_the_changes_and_no_run_directory(tmp_path, capsys):
  """Night 2 changes 100 files and adds 100, night 3 deletes 50: one `add` of both nights adds
  the rows inserted since the build and removes the ids deleted since. The rows name run
  directories that do not exist: nothing is read from runs. A compaction then changes no id."""
  uri = str(tmp_path / 'collection')
  made = write_synthetic_collection(uri, 400, seed=3, dimension=DIMENSION, clusters=4,
                                    fragment_rows=200)
  directory = build(uri, str(tmp_path / 'index'))
  ids, uris, _ = held(uri)
  changed = {u: v for u, v in zip(uris[300:], vectors_of(uris[300:], DIMENSION, 4))}
  changed.update({f'gs://new/{n}.jpg': v for n, v in enumerate(vectors_of(range(100), DIMENSION,
                                                                        5))})
  night(uri, str(tmp_path / 'gone-run-2'), changed, dimension=DIMENSION, model=made.model_id)
  night(uri, str(tmp_path / 'gone-run-3'), gone=uris[:50], dimension=DIMENSION)
  description = index_command.main(['add', '--index', directory])
  assert (description['last_add']['added'], description['last_add']['removed']) == (200, 150)
  assert description['version'] == collection.open_collection(uri).version
  index = neighbour_index.NeighbourIndex(directory)
  now_ids, now_uris, now_vectors = held(uri)
  assert index.count == 450 and np.array_equal(index.indexed_ids(), now_ids)
  assert not set(ids[:50]) & set(index.indexed_ids()) and not set(ids[300:]) & set(now_ids)
  queries = now_vectors[[now_uris.index(uris[310]), now_uris.index('gs://new/7.jpg'), 0]]
  found = index.search(queries, 10)
  assert [row[0].uri for row in found] == [uris[310], 'gs://new/7.jpg', now_uris[0]]
  assert [[n.uri for n in row] for row in found] == exact_top(now_uris, now_vectors, queries, 10)
  assert not os.path.exists(found[0][0].metadata['run'])  # its run directory never existed

  capsys.readouterr()
  assert index_command.main(['add', '--index', directory]) == description
  assert 'nothing new' in capsys.readouterr().out
  collection.compact(uri)
  after = index_command.main(['add', '--index', directory])
  assert (after['last_add']['added'], after['last_add']['removed'], after['count']) == (0, 0, 450)
  assert np.array_equal(neighbour_index.NeighbourIndex(directory).indexed_ids(), now_ids)


def _bytes_under(directory: str) -> dict:
  return {name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}


def test_defect_3_an_add_after_a_compaction_leaves_the_index_directory_as_it_was(tmp_path):
  """The refine store only grew: an `add` of a compacted run appended every vector again. The
  index now keeps no vectors (re-ranks read the collection by row id), and a compaction changes
  no row, so the `add` after one writes nothing."""
  uri = str(tmp_path / 'collection')
  write_synthetic_collection(uri, 200, seed=5, dimension=DIMENSION, clusters=2, fragment_rows=50)
  directory = build(uri, str(tmp_path / 'index'))
  before = _bytes_under(directory)
  collection.compact(uri)
  index_command.main(['add', '--index', directory])
  assert {name: size for name, size in _bytes_under(directory).items()
          if name != 'index.json'} == {name: size for name, size in before.items()
                                       if name != 'index.json'}
  assert not [name for name in before if name.endswith(('.f16', '.f32'))]


def test_other_models_a_cleaned_up_version_and_bad_flags_are_refused(tmp_path, capsys):
  uri = str(tmp_path / 'collection')
  write_synthetic_collection(uri, 200, seed=5, dimension=DIMENSION, clusters=2,
                             fragment_rows=100)
  directory = build(uri, str(tmp_path / 'index'))
  index = neighbour_index.NeighbourIndex(directory)
  with pytest.raises(MixedModelsError, match=OTHER_MODEL):
    index.search(np.ones((1, DIMENSION), np.float32), 5, model=OTHER_MODEL)
  night(uri, 'night2', {'gs://new/a.jpg': vectors_of(['a'], DIMENSION, 6)[0]},
        dimension=DIMENSION)
  collection.cleanup(uri, datetime.timedelta(0))
  for argv, message in (
      (['add', '--index', directory], 'is no longer kept'),
      (['add', '--index', str(tmp_path / 'none')], 'no index.json'),
      (['build', '--collection', str(tmp_path / 'none'), '--output', str(tmp_path / 'x')],
       'no collection at'),
      (['build', '--collection', uri, '--output', directory], 'already holds an index'),
      (['build', '--collection', uri, '--output', str(tmp_path / 'x'), '--memory_budget',
        'nonsense'], '--memory_budget'),
      (['build', '--collection', uri, '--output', str(tmp_path / 'x'), '--recall_target',
        '1.5'], '--recall_target')):
    with pytest.raises(SystemExit) as refused:
      index_command.main(argv)
    assert refused.value.code == 2
    assert message in capsys.readouterr().err, argv
  assert not os.path.exists(tmp_path / 'x')
  with pytest.raises(ValueError, match='raise --memory_budget'):
    index_plan.choose_plan(1_000_000, 4320, 1_000_000)


@pytest.mark.parametrize('count, budget, kind, factory', [
    (5_000, 4e9, 'exhaustive', 'IVF1,Flat'), (100_000, 4e9, 'hnsw', 'HNSW32,Flat'),
    (227_000, 4e9, 'hnsw', 'HNSW32,Flat'), (240_000, 4e9, 'ivf_pq', 'IVF2048_HNSW32,PQ256'),
    (1_000_000, 4e9, 'ivf_pq', 'IVF4096_HNSW32,PQ256'),
    (100_000_000, 15e9, 'ivf_pq', 'IVF32768_HNSW32,PQ128'), (20_000, 1e6, 'ivf_pq', 'IVF512,PQ16')])
def test_plan_is_hnsw_while_it_fits_then_the_largest_product_code_that_fits(count, budget, kind,
                                                                            factory):
  """As autofaiss plans (issue 28): HNSW while vectors and graph fit the budget, then IVF-PQ
  with the largest code that fits, its quantizer an HNSW graph from 1,024 lists on."""
  plan = index_plan.choose_plan(count, 4320, int(budget))
  assert (plan.kind, plan.factory) == (kind, factory)
  assert count * plan.bytes_per_vector <= budget or kind == 'exhaustive'


def test_a_float16_collection_is_indexed_and_read_back_as_float32(tmp_path):
  made = write_synthetic_collection(str(tmp_path / 'half'), 120, seed=9, dimension=DIMENSION,
                                    clusters=2, fragment_rows=50, embedding_dtype='float16')
  index = neighbour_index.NeighbourIndex(build(made.uri, str(tmp_path / 'index')))
  ids, uris, vectors = held(made.uri)
  stored = index.stored_vectors(ids[:3])
  assert stored.dtype == np.float32
  np.testing.assert_array_equal(stored, vectors[:3])
  assert [row[0].uri for row in index.search(vectors[:3], 3)] == uris[:3]


def test_a_tiny_index_prints_its_summary_alone_without_nan_or_faiss_notes(tmp_path, capfd):
  """FAISS's clustering warning below 39 vectors a list, its `resizing ... ivfdata.tmp` on
  stdout when `add` gives a list its kept entries back, and `recall@10 on 0 probe vectors: nan`
  (issue 38)."""
  uri = str(tmp_path / 'collection')
  names = [f'gs://photos/{n}.jpg' for n in range(4)]
  first = night(uri, 'night1', dict(zip(names, vectors_of(names, DIMENSION, 3))),
                dimension=DIMENSION)
  directory = build(uri, str(tmp_path / 'index'))
  added = [names[3]] + [f'gs://photos/{n}.jpg' for n in (4, 5)]
  second = night(uri, 'night2', dict(zip(added, vectors_of(added, DIMENSION, 4))),
                 dimension=DIMENSION)
  description = index_command.main(['add', '--index', directory])
  assert description['last_add']['removed'] == 1 and description['count'] == 6
  out, err = capfd.readouterr()
  assert [line.split(';')[0] for line in out.splitlines()] == [
      f'{directory}: 4 vectors of builtin:test@untrained-seed0, version {first} of {uri}',
      f'{directory}: 6 vectors of builtin:test@untrained-seed0, version {second} of {uri}',
      f'added 3 vector(s) inserted since version {first}, removed 1 deleted since (changed, '
      'gone or failed files)']
  assert 'nan' not in out and out.count('recall@10 not measured') == 2
  assert 'recall@10 of the added rows not measured' in out
  assert 'WARNING clustering' not in err
