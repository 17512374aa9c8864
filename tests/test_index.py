"""The FAISS neighbour index: build, query, add (replacing URIs embedded again), model refusal,
and float16 runs read back as float32. Its plans, refine store, health checks and the
collection's rule: tests/test_index_plans.py."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embeddings
from benchmarks.synthetic_collection import uri_of, write_synthetic_run
from commands import index as index_command
from embeddings import neighbour_index
from embeddings.similarity import unit_rows
from jobs import index_plan
from storage.run_dirs import MixedModelsError

DIMENSION = 48
OTHER_MODEL = 'builtin:pnasnet_mobile@synthetic-seed0'


def _exact_top(collection, queries: np.ndarray, k: int) -> list:
  scores = unit_rows(queries) @ unit_rows(collection.vectors).T
  return [[collection.uris[i] for i in np.argsort(-row, kind='stable')[:k]] for row in scores]


def _build(tmp_path, runs, **flags):
  output = str(tmp_path / 'index')
  argv = ['build', '--runs', *runs, '--output', output]
  for name, value in flags.items():
    argv += [f'--{name}', str(value)]
  index_command.main(argv)
  return output


def test_small_collection_gets_an_exhaustive_index_whose_results_equal_exact_search(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run1'), 600, seed=1, dimension=DIMENSION,
                            clusters=6, shard_rows=250)
  directory = _build(tmp_path, [run.directory])
  index = neighbour_index.NeighbourIndex(directory)
  collection = embeddings.load(run.directory)
  assert index.description['plan']['kind'] == 'exhaustive'
  assert index.count == 600 and index.model == run.model_id
  queries = collection.vectors[:20]
  found = index.search(queries, 10, model=run.model_id)
  assert [[n.uri for n in row] for row in found] == _exact_top(collection, queries, 10)
  exact_first = float(unit_rows(queries[:1])[0] @ unit_rows(collection.vectors[:1])[0])
  assert found[0][0].score == pytest.approx(exact_first, abs=1e-5) and found[0][0].score <= 1.0
  assert index.description['probe_recall_at_10'] == pytest.approx(1.0)


def test_index_directory_records_model_runs_plan_and_maps_ids_to_uris(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run1'), 300, seed=2, dimension=DIMENSION,
                            clusters=3, shard_rows=100)
  directory = _build(tmp_path, [run.directory])
  with open(os.path.join(directory, neighbour_index.INDEX_FILE)) as f:
    description = json.load(f)
  assert description['model'] == run.model_id
  assert [r['path'] for r in description['runs']] == [run.directory]
  assert description['embedding_size'] == DIMENSION and description['count'] == 300
  ids = pa.ipc.open_file(os.path.join(directory, neighbour_index.IDS_FILE)).read_all()
  assert sorted(ids.column('uri').to_pylist()) == sorted(uri_of(n) for n in range(300))
  index = neighbour_index.NeighbourIndex(directory)
  positions = index.rows(ids.column('id').to_numpy()[[5, 250]])
  stored = index.stored_vectors(ids.column('id').to_numpy()[[5, 250]])
  collection = embeddings.load(run.directory)
  for position, vector in zip(positions, stored):
    uri = ids.column('uri')[int(position)].as_py()
    np.testing.assert_array_equal(vector, collection.vectors[collection.uris.index(uri)])
  refined = index.refine_vectors(ids.column('id').to_numpy()[[5, 250]])
  np.testing.assert_allclose(refined, unit_rows(stored), atol=1e-3)


def test_add_appends_new_vectors_and_replaces_uris_embedded_again(tmp_path):
  first = write_synthetic_run(str(tmp_path / 'night1'), 400, seed=3, dimension=DIMENSION,
                              clusters=4, shard_rows=200, finished_at='2026-01-01T00:00:00Z')
  directory = _build(tmp_path, [first.directory])
  # The second night re-embeds rows 300..399 (new vectors: another seed) and adds 400..499.
  second = write_synthetic_run(str(tmp_path / 'night2'), 200, seed=4, dimension=DIMENSION,
                               clusters=4, shard_rows=200, first_row=300,
                               finished_at='2026-01-02T00:00:00Z')
  description = index_command.main(['add', '--index', directory, '--runs', second.directory])
  assert description['last_add']['removed'] == 100 and description['last_add']['added'] == 200
  index = neighbour_index.NeighbourIndex(directory)
  assert index.count == 500
  uris = index.ids.column('uri').to_pylist()
  assert len(uris) == len(set(uris)) == 500
  latest = embeddings.load([first.directory, second.directory])
  assert len(latest.uris) == 500
  queries = latest.vectors[[latest.uris.index(uri_of(n)) for n in (310, 450, 10)]]
  found = index.search(queries, 10)
  assert [row[0].uri for row in found] == [uri_of(310), uri_of(450), uri_of(10)]
  assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in found)
  assert [[n.uri for n in row] for row in found] == _exact_top(latest, queries, 10)
  with pytest.raises(SystemExit) as again:
    index_command.main(['add', '--index', directory, '--runs', second.directory])
  assert again.value.code == 2


def test_runs_and_queries_of_another_model_are_refused(tmp_path, capsys):
  run = write_synthetic_run(str(tmp_path / 'run1'), 200, seed=5, dimension=DIMENSION,
                            clusters=2, shard_rows=100)
  directory = _build(tmp_path, [run.directory])
  other = write_synthetic_run(str(tmp_path / 'other'), 100, seed=6, dimension=DIMENSION,
                              clusters=2, model_id=OTHER_MODEL)
  with pytest.raises(SystemExit) as refused:
    index_command.main(['add', '--index', directory, '--runs', other.directory])
  assert refused.value.code == 2
  assert OTHER_MODEL in capsys.readouterr().err
  index = neighbour_index.NeighbourIndex(directory)
  assert index.count == 200
  with pytest.raises(MixedModelsError, match=OTHER_MODEL):
    index.search(np.ones((1, DIMENSION), np.float32), 5, model=OTHER_MODEL)


def test_rerank_rescores_candidates_with_the_stored_vectors(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run1'), 300, seed=7, dimension=DIMENSION,
                            clusters=3, shard_rows=100)
  index = neighbour_index.NeighbourIndex(_build(tmp_path, [run.directory]))
  collection = embeddings.load(run.directory)
  query = collection.vectors[[42]]
  found = index.search(query, 5, rerank=50, exclude_uris=[[collection.uris[42]]])[0]
  assert collection.uris[42] not in [n.uri for n in found]
  expected = _exact_top(collection, query, 6)[0][1:]
  assert [n.uri for n in found] == expected
  exact = unit_rows(collection.vectors[[collection.uris.index(expected[0])]])[0] @ unit_rows(
      query)[0]
  assert found[0].score == pytest.approx(float(exact), abs=1e-6)


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


def test_a_budget_too_small_for_any_index_is_refused(tmp_path, capsys):
  run = write_synthetic_run(str(tmp_path / 'run1'), 100, seed=8, dimension=DIMENSION,
                            clusters=2)
  with pytest.raises(SystemExit) as refused:
    _build(tmp_path, [run.directory], memory_budget='nonsense')
  assert refused.value.code == 2
  assert '--memory_budget' in capsys.readouterr().err
  with pytest.raises(SystemExit) as refused:
    _build(tmp_path, [run.directory], recall_target=1.5)
  assert refused.value.code == 2 and not os.path.exists(tmp_path / 'index')
  assert '--recall_target' in capsys.readouterr().err
  with pytest.raises(ValueError, match='raise --memory_budget'):
    index_plan.choose_plan(1_000_000, 4320, 1_000_000)


def test_float16_runs_are_read_back_as_float32_everywhere(tmp_path):
  import duckdb
  half = write_synthetic_run(str(tmp_path / 'half'), 120, seed=9, dimension=DIMENSION,
                             clusters=2, shard_rows=50, embedding_dtype='float16')
  full = write_synthetic_run(str(tmp_path / 'full'), 120, seed=9, dimension=DIMENSION,
                             clusters=2, shard_rows=50)
  stored = pq.read_schema(os.path.join(half.directory, 'embeddings-00000-of-00003.parquet'))
  assert str(stored.field('embedding').type.value_type) == 'halffloat'
  loaded, reference = embeddings.load(half.directory), embeddings.load(full.directory)
  assert loaded.vectors.dtype == np.float32 and loaded.vectors.shape == (120, DIMENSION)
  np.testing.assert_array_equal(loaded.vectors,
                                reference.vectors.astype(np.float16).astype(np.float32))
  shards = list(embeddings.iter_shards(half.directory))
  assert all(s.vectors.dtype == np.float32 for s in shards)
  from embeddings.neighbours import search, Query
  runs = embeddings.find_runs(half.directory)
  query = Query(loaded.uris[0], loaded.vectors[0], None, 'embedded', loaded.uris[0])
  found = search(runs, query, 3)
  assert len(found) == 3 and isinstance(found[0].score, float)
  row = duckdb.sql(f"SELECT embedding FROM '{half.directory}/embeddings-*.parquet' "
                   f"WHERE uri = '{loaded.uris[0]}'").fetchall()[0]
  np.testing.assert_array_equal(np.array(row[0], np.float32), loaded.vectors[0])


def test_a_collection_over_the_budget_gets_a_pca_and_product_codes_and_keeps_its_recall(tmp_path):
  """The PCA + IVF-PQ plan, trained from sample files: the index keeps only the PCA's projection
  (not the dimension^2 eigenvector matrix training used) and no sample file is left behind."""
  import faiss
  run = write_synthetic_run(str(tmp_path / 'run1'), 10_500, seed=4, dimension=32, clusters=40,
                            shard_rows=1500)
  directory = _build(tmp_path, [run.directory], memory_budget='250KB')
  index = neighbour_index.NeighbourIndex(directory)
  plan = index.description['plan']
  assert (plan['kind'], plan['pca_dimension'], index.count) == ('ivf_pq', 32, 10_500)
  read = faiss.read_index(os.path.join(directory, neighbour_index.FAISS_FILE))  # owns the rest
  projection = faiss.downcast_VectorTransform(faiss.downcast_index(read).chain.at(0))
  assert type(projection).__name__ == 'LinearTransform'
  assert sorted(os.listdir(directory)) == sorted([
      neighbour_index.INDEX_FILE, neighbour_index.FAISS_FILE, neighbour_index.IVFDATA_FILE,
      neighbour_index.TRAINED_FILE, neighbour_index.IDS_FILE, neighbour_index.FAISS_IDS_FILE,
      neighbour_index.VECTOR_ROWS_FILE, neighbour_index.VECTORS_FILE, neighbour_index.PROBES_FILE,
      *(neighbour_index.lookup_file(column) for column in neighbour_index.LOOKUP_COLUMNS)])
  collection = embeddings.load(run.directory)
  queries = collection.vectors[::500]
  found = index.search(queries, 10, rerank=100)
  exact = _exact_top(collection, queries, 10)
  recall = np.mean([len({n.uri for n in row} & set(truth)) / 10
                    for row, truth in zip(found, exact)])
  assert recall >= 0.9


def test_a_tiny_index_prints_its_summary_alone_without_nan_or_faiss_notes(tmp_path, capfd):
  """FAISS's clustering warning below 39 vectors a list, its `resizing ... ivfdata.tmp` on
  stdout when `add` gives a list its kept entries back (7 entries, 1 removed: a bigger slot),
  and `recall@10 on 0 probe vectors: nan` (issue 38)."""
  first = write_synthetic_run(str(tmp_path / 'night1'), 4, seed=3, dimension=DIMENSION,
                              clusters=1, finished_at='2026-01-01T00:00:00Z')
  directory = _build(tmp_path, [first.directory])
  second = write_synthetic_run(str(tmp_path / 'night2'), 3, seed=4, dimension=DIMENSION,
                               clusters=1, first_row=3, finished_at='2026-01-02T00:00:00Z')
  description = index_command.main(['add', '--index', directory, '--runs', second.directory])
  assert description['last_add']['removed'] == 1 and description['count'] == 6
  out, err = capfd.readouterr()
  assert [line.split(';')[0] for line in out.splitlines()] == [
      f'{directory}: 4 vectors of {first.model_id} from 1 run(s)',
      f'{directory}: 6 vectors of {first.model_id} from 2 run(s)',
      'added 3 vector(s), removed 1 that newer runs re-embedded, did not match or failed on']
  assert 'nan' not in out and out.count('recall@10 not measured') == 2
  assert 'recall@10 of the added runs not measured' in out
  assert 'WARNING clustering' not in err
