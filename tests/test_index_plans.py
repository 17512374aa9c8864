"""The neighbour index's plans (HNSW, IVF-PQ), its lists merged on disk and memory-mapped without
prefetch threads, its refine store, its health check on `add`, the collection's rule (deleted
and failed files have no vector) and the benchmark's recall (issues 26 and 28)."""

import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embeddings
from benchmarks import bench_index
from benchmarks.synthetic_collection import uri_of, write_synthetic_run
from commands import index as index_command
from commands import neighbours as neighbours_command
from embeddings import neighbour_index, neighbours
from embeddings.collection import SourceRule
from embeddings.similarity import unit_rows
from jobs import index_directory
from tests.bundle_spy import calls_by_place

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs')
PQ_ROWS = 10_500  # above EXHAUSTIVE_BELOW
PQ_DIMENSION = 32


def _build(directory: str, runs, *flags) -> str:
  index_command.main(['build', '--runs', *runs, '--output', directory, *flags])
  return directory


def _exact_top(collection, queries: np.ndarray, k: int, skip_first: bool = False) -> list:
  scores = unit_rows(queries) @ unit_rows(collection.vectors).T
  start = 1 if skip_first else 0
  return [[collection.uris[i] for i in np.argsort(-row, kind='stable')[start:k + start]]
          for row in scores]


def _recall(found, truth) -> float:
  return float(np.mean([len({n.uri for n in row} & set(t)) / len(t)
                        for row, t in zip(found, truth)]))


@pytest.fixture(scope='module')
def pq_index(tmp_path_factory):
  """An IVF-PQ index over 10,500 32-d vectors (a budget too small for HNSW) and its run."""
  root = tmp_path_factory.mktemp('pq')
  run = write_synthetic_run(str(root / 'night1'), PQ_ROWS, seed=4, dimension=PQ_DIMENSION,
                            clusters=40, shard_rows=1500, finished_at='2026-01-01T00:00:00Z')
  return run, _build(str(root / 'index'), [run.directory], '--memory_budget', '250KB')


def test_memory_mapped_lists_are_on_disk_beside_the_index_without_prefetch_threads(pq_index,
                                                                                 tmp_path):
  import faiss
  run, directory = pq_index
  index = neighbour_index.NeighbourIndex(directory)
  assert index.description['plan']['kind'] == 'ivf_pq'
  lists = neighbour_index.ivf_lists(index.index)
  assert isinstance(lists, faiss.OnDiskInvertedLists)
  assert lists.prefetch_nthread == 0
  assert lists.filename.endswith(neighbour_index.IVFDATA_FILE)
  assert index.count == PQ_ROWS == index.description['count']


def test_collections_that_fit_get_hnsw_with_exact_scores_and_add_rebuilds_its_graph(tmp_path):
  night1 = write_synthetic_run(str(tmp_path / 'night1'), PQ_ROWS, seed=5,
                               dimension=PQ_DIMENSION, clusters=30, shard_rows=3000,
                               finished_at='2026-01-01T00:00:00Z')
  directory = _build(str(tmp_path / 'index'), [night1.directory])
  index = neighbour_index.NeighbourIndex(directory)
  assert (index.kind, index.description['plan']['factory']) == ('hnsw', 'HNSW32,Flat')
  collection = embeddings.load(night1.directory)
  queries = collection.vectors[::700]
  found = index.search(queries, 10)
  assert _recall(found, _exact_top(collection, queries, 10)) >= 0.98
  best = unit_rows(collection.vectors[[collection.uris.index(found[1][0].uri)]])[0]
  assert found[1][0].score == pytest.approx(float(best @ unit_rows(queries[1:2])[0]), abs=1e-5)
  assert index.exact_scores(10, 0) and index.description['probe_recall_at_10'] >= 0.98
  # Night 2 re-embeds rows 10,000.. with other vectors and adds 1,000 more.
  night2 = write_synthetic_run(str(tmp_path / 'night2'), 1500, seed=6, dimension=PQ_DIMENSION,
                               clusters=30, first_row=10_000,
                               finished_at='2026-01-02T00:00:00Z')
  description = index_command.main(['add', '--index', directory, '--runs', night2.directory])
  assert (description['last_add']['added'], description['last_add']['removed']) == (1500, 500)
  index = neighbour_index.NeighbourIndex(directory)
  latest = embeddings.load([night1.directory, night2.directory])
  assert index.count == len(latest.uris) == 11_500
  assert sorted(index.ids.column('uri').to_pylist()) == sorted(latest.uris)
  query = latest.vectors[[latest.uris.index(uri_of(10_200))]]
  assert index.search(query, 1)[0][0].uri == uri_of(10_200)


def test_rerank_reads_the_refine_store_not_the_runs(pq_index, tmp_path):
  """The candidates are rescored from vectors.f16 beside the index: the runs can be gone."""
  run, directory = pq_index
  collection = embeddings.load(run.directory)
  queries = collection.vectors[::500]
  truth = _exact_top(collection, queries, 10, skip_first=True)
  moved = str(tmp_path / 'moved')
  os.rename(run.directory, moved)
  try:
    index = neighbour_index.NeighbourIndex(directory)
    found = index.search(queries, 10, rerank=100,
                         exclude_uris=[[collection.uris[i]] for i in range(0, PQ_ROWS, 500)])
  finally:
    os.rename(moved, run.directory)
  assert _recall(found, truth) >= 0.9
  first = unit_rows(collection.vectors[[collection.uris.index(found[0][0].uri)]])[0]
  assert found[0][0].score == pytest.approx(float(first @ unit_rows(queries[:1])[0]), abs=2e-3)
  assert index.exact_scores(10, 100) and not index.exact_scores(10, 0)


def test_the_pq_plan_searches_the_fewest_lists_reaching_the_recall_target(pq_index):
  """nprobe is chosen at build from the probes' exact neighbours: the curve recorded is what
  `search` gives on the probes (re-ranked, each probe left out), and --nprobe overrides it."""
  _, directory = pq_index
  index = neighbour_index.NeighbourIndex(directory)
  curve = index.description['nprobe_curve']
  target = index.description['recall_target']
  assert [p['nprobe'] for p in curve] == [2 ** n for n in range(len(curve))]
  assert all(p['reranked_recall_at_10'] < target for p in curve[:-1])
  assert curve[-1]['reranked_recall_at_10'] >= target and index.nprobe == curve[-1]['nprobe'] > 1
  probes = np.load(os.path.join(directory, neighbour_index.PROBES_FILE))
  uri_of_id = lambda ids: index.table_rows(index.rows(ids)).column('uri').to_pylist()
  own = [[u] for u in uri_of_id(probes['ids'])]
  truth = [uri_of_id(row[:10]) for row in probes['exact_ids']]
  for nprobe, point in ((None, curve[-1]), (1, curve[0])):
    found = index.search(probes['vectors'], 10, rerank=100, nprobe=nprobe, exclude_uris=own)
    assert _recall(found, truth) == pytest.approx(point['reranked_recall_at_10'])


def test_a_query_decodes_the_record_batches_of_its_results_not_the_ids_table(pq_index):
  """ids.arrow is sorted by id in record batches of IDS_BATCH_ROWS; opening the index and
  searching leave no ids table in memory, and the rows found are the table's rows."""
  _, directory = pq_index
  ids_file = pa.ipc.open_file(os.path.join(directory, neighbour_index.IDS_FILE))
  sizes = [ids_file.get_batch(b).num_rows for b in range(ids_file.num_record_batches)]
  assert sizes[:-1] == [neighbour_index.IDS_BATCH_ROWS] * (len(sizes) - 1) and len(sizes) == 11
  whole = ids_file.read_all()
  assert np.all(np.diff(whole.column('id').to_numpy()) > 0)
  before = pa.total_allocated_bytes()
  index = neighbour_index.NeighbourIndex(directory)
  found = index.search(embeddings.load(pq_index[0].directory).vectors[::1000], 10)
  assert pa.total_allocated_bytes() - before < whole.nbytes / 10
  by_id = {row['id']: row for row in whole.to_pylist()}
  positions = index.rows(np.array([n.metadata['id'] for row in found for n in row]))
  assert len(set(positions // neighbour_index.IDS_BATCH_ROWS)) > 1
  assert all(n.metadata == by_id[n.metadata['id']] for row in found for n in row)


def test_approximate_scores_are_labelled_and_nprobe_is_a_flag(pq_index, capsys):
  run, directory = pq_index
  index = neighbour_index.NeighbourIndex(directory)
  collection = embeddings.load(run.directory)
  query = neighbours.Query(collection.uris[7], collection.vectors[7], None, 'embedded',
                           collection.uris[7])
  approximate = index.search(collection.vectors[7], 5, rerank=0)[0]
  table = neighbours.format_table(query, approximate, index.exact_scores(5, 0))
  assert '~cosine' in table.splitlines()[1] and 'approximate' in table.splitlines()[-1]
  assert '~cosine' not in neighbours.format_table(query, approximate)
  # Every list searched, then re-ranked: exact search's answer.
  lists = index.description['plan']['lists']
  every = index.search(collection.vectors[:5], 10, rerank=200, nprobe=lists)
  assert _recall(every, _exact_top(collection, collection.vectors[:5], 10)) == 1.0
  for bad in (['--index', directory, '--nprobe', '0'], ['--runs', run.directory, '--nprobe', '4']):
    with pytest.raises(SystemExit) as refused:
      neighbours_command.main([*bad, '--query', collection.uris[0]])
    assert refused.value.code == 2
  assert '--nprobe' in capsys.readouterr().err


def test_add_checks_its_health_against_the_build_with_probes_of_each_added_run(pq_index,
                                                                               tmp_path):
  import shutil
  run, built = pq_index
  directory = str(tmp_path / 'index')
  shutil.copytree(built, directory)
  build = neighbour_index.read_description(directory)['build']
  assert build['list_imbalance'] >= 1.0
  same = write_synthetic_run(str(tmp_path / 'night2'), 2_000, seed=4, dimension=PQ_DIMENSION,
                             clusters=40, first_row=PQ_ROWS, finished_at='2026-01-02T00:00:00Z')
  description = index_command.main(['add', '--index', directory, '--runs', same.directory])
  last = description['last_add']
  assert last['added_probes'] == 100 and last['added_probe_recall_at_10'] > 0.6
  assert last['rebuild'] == [] and description['list_imbalance'] >= 1.0
  assert last['added_probe_quantization_error'] < 1.2 * build['probe_quantization_error']
  assert description['directory'] == directory  # the copy's own, not the index it came from
  # Another collection altogether: all of it lands in a few of the lists trained on the first.
  drift = write_synthetic_run(str(tmp_path / 'night3'), 6_000, seed=99, dimension=PQ_DIMENSION,
                              clusters=3, first_row=20_000, finished_at='2026-01-03T00:00:00Z')
  description = index_command.main(['add', '--index', directory, '--runs', drift.directory])
  assert any('from their lists' in reason for reason in description['last_add']['rebuild']), \
      description['last_add']
  assert 'rebuild the index' in index_command.summary_line(description)


def test_build_on_two_workers_merges_the_same_index(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run1'), 900, seed=11, dimension=24, clusters=5,
                            shard_rows=200)
  alone = _build(str(tmp_path / 'alone'), [run.directory])
  pair = _build(str(tmp_path / 'pair'), [run.directory],
                '--direct_running_mode=multi_processing', '--direct_num_workers=2')
  one, two = neighbour_index.NeighbourIndex(alone), neighbour_index.NeighbourIndex(pair)
  assert one.ids.column('id').equals(two.ids.column('id')) and two.count == 900
  assert one.ids.column('uri').equals(two.ids.column('uri'))
  queries = embeddings.load(run.directory).vectors[::90]
  assert ([[n.uri for n in row] for row in one.search(queries, 10)] ==
          [[n.uri for n in row] for row in two.search(queries, 10)])
  assert not os.path.exists(os.path.join(pair, '.pieces'))


def _fail_in_index(run_directory: str, uri: str) -> None:
  """Rewrites the run's index row of `uri` as a decode failure (its shard row stays)."""
  for name in os.listdir(run_directory):
    if name.startswith('index-'):
      path = os.path.join(run_directory, name)
      table = pq.read_table(path)
      outcomes = [('decode' if u == uri else o) for u, o in zip(
          table.column('uri').to_pylist(), table.column('outcome').to_pylist())]
      position = table.schema.get_field_index('outcome')
      table = table.set_column(position, table.schema.field('outcome'),
                               pa.array(outcomes, table.schema.field('outcome').type))
      pq.write_table(table, path)


def test_the_index_follows_loads_rule_deleted_and_failed_files_have_no_vector(tmp_path,
                                                                              monkeypatch):
  """Issue 26 item 1: night 2 lists the same inputs, five files deleted and one failing to
  decode; `build` over both nights and `add` of night 2 (on two workers) hold what `load`
  holds. Issue 28 item 6: the rule is applied by workers, never by the launcher."""
  night1 = write_synthetic_run(str(tmp_path / 'night1'), 400, seed=1, dimension=32, clusters=4,
                               shard_rows=150, finished_at='2026-01-01T00:00:00Z')
  night2 = write_synthetic_run(str(tmp_path / 'night2'), 395, seed=2, dimension=32, clusters=4,
                               shard_rows=150, finished_at='2026-01-02T00:00:00Z')
  _fail_in_index(night2.directory, uri_of(10))
  latest = embeddings.load([night1.directory, night2.directory])
  gone = {uri_of(n) for n in (10, 395, 396, 397, 398, 399)}
  assert not gone & set(latest.uris) and len(latest.uris) == 394
  rule_calls = calls_by_place(monkeypatch, SourceRule, 'decide')
  both = _build(str(tmp_path / 'both'), [night1.directory, night2.directory])
  added = _build(str(tmp_path / 'added'), [night1.directory])
  index_command.main(['add', '--index', added, '--runs', night2.directory,
                      '--direct_running_mode=multi_processing', '--direct_num_workers=2'])
  assert rule_calls['in the launcher'] == 0 and rule_calls['in a bundle'] > 0, rule_calls
  for directory in (both, added):
    index = neighbour_index.NeighbourIndex(directory)
    assert index.count == 394 and sorted(index.ids.column('uri').to_pylist()) == sorted(
        latest.uris)
    found = index.search(latest.vectors, 10)
    assert not gone & {n.uri for row in found for n in row}
    assert [row[0].uri for row in found] == latest.uris  # each vector is the newest run's
    # The lookup files follow the rule too: `add` rewrote them with the rows it kept.
    assert [index.find_row('uri', uri)['id'] for uri in latest.uris] == [
        row[0].metadata['id'] for row in found]
    assert all(index.find_row('uri', uri) is None for uri in gone)
  assert neighbour_index.read_description(both)['probe_recall_at_10'] == 1.0
  assert neighbour_index.read_description(added)['last_add']['added_probe_recall_at_10'] == 1.0


def test_a_kept_file_missing_from_its_runs_shards_is_left_out_with_a_warning(tmp_path, caplog):
  """The rule runs on workers, so what it cannot place is counted there and said after the job
  (as embeddings.load says it): here night 2's index names a file its shards do not hold."""
  night1 = write_synthetic_run(str(tmp_path / 'night1'), 60, seed=1, dimension=8, clusters=2,
                               finished_at='2026-01-01T00:00:00Z')
  night2 = write_synthetic_run(str(tmp_path / 'night2'), 60, seed=2, dimension=8, clusters=2,
                               finished_at='2026-01-02T00:00:00Z')
  [name] = [n for n in os.listdir(night2.directory) if n.startswith('index-')]
  table = pq.read_table(os.path.join(night2.directory, name))
  uris = table.column('uri').to_pylist()
  uris[5] = 'gs://synthetic-photos/ghost.jpg'
  pq.write_table(table.set_column(table.schema.get_field_index('uri'), table.schema.field('uri'),
                                  pa.array(uris, table.schema.field('uri').type)),
                 os.path.join(night2.directory, name))
  with caplog.at_level('WARNING'):
    index = neighbour_index.NeighbourIndex(_build(str(tmp_path / 'index'),
                                                  [night1.directory, night2.directory]))
  assert '1 file(s) are in the index of the run that holds their vector but in none of its ' \
         'shards' in caplog.text
  assert index.count == 59 and index.find_row('uri', 'gs://synthetic-photos/ghost.jpg') is None


def _finds_every_row_by_its_lookup_files(index) -> None:
  """Every URI finds its row, a SHA-256 the first row holding it, a value not held none."""
  whole = index.ids.to_pylist()
  first_of_sha256 = {}
  for row in whole:
    first_of_sha256.setdefault(row['sha256'], row)
  assert len(first_of_sha256) == len(whole) - 5  # the byte copies share their original's
  keys, rows = neighbour_index.open_lookup(index.directory, 'uri')
  assert len(keys) == len(whole) and np.all(keys[1:] >= keys[:-1])
  assert sorted(rows.tolist()) == list(range(len(whole)))
  assert all(index.find_row('uri', row['uri']) == row for row in whole[::7])
  assert all(index.find_row('sha256', sha256) == row for sha256, row in first_of_sha256.items())
  assert index.find_row('uri', 'gs://nowhere/not-an-image.jpg') is None
  assert index.find_row('sha256', '0' * 64) is None
  assert not [name for name in os.listdir(index.directory) if name.startswith('.lookup')]


def test_a_uri_or_sha256_is_found_by_its_lookup_file_even_when_keys_collide(tmp_path,
                                                                            monkeypatch):
  """find_row is a binary search of a sorted key file, not a scan of ids.arrow; with keys that
  collide (300 keys for 1,200 values) the rows' values decide."""
  run = write_synthetic_run(str(tmp_path / 'run1'), 1_200, seed=13, dimension=16, clusters=3,
                            shard_rows=400, exact_duplicates=5)
  monkeypatch.setattr(index_directory, 'LOOKUP_BUFFER_ROWS', 500)  # spilled to buckets mid-shard
  _finds_every_row_by_its_lookup_files(neighbour_index.NeighbourIndex(
      _build(str(tmp_path / 'plain'), [run.directory])))
  monkeypatch.setattr(neighbour_index, 'lookup_key',
                      lambda value: zlib.crc32(value.encode()) % 300 << 54)
  _finds_every_row_by_its_lookup_files(neighbour_index.NeighbourIndex(
      _build(str(tmp_path / 'colliding'), [run.directory])))


def test_probe_count_is_what_the_docs_say(tmp_path):
  """Issue 26 item 9: up to 100 probe vectors, a tenth of a collection below 1,000."""
  run = write_synthetic_run(str(tmp_path / 'run1'), 320, seed=12, dimension=16, clusters=3)
  description = _build(str(tmp_path / 'index'), [run.directory])
  with open(os.path.join(description, neighbour_index.INDEX_FILE)) as f:
    assert json.load(f)['probes'] == 32
  with open(os.path.join(DOCS, 'using-embeddings.md')) as f:
    text = ' '.join(f.read().split())
  assert ('up to 100 vectors held back from training (a tenth of the vectors below 1,000)'
          in text)


def test_the_benchmark_leaves_the_query_out_of_truth_and_results_alike(tmp_path, capsys):
  """Issue 28 item 1: an exhaustive index is exact search, so its recall is 1.000, not 0.9."""
  run = write_synthetic_run(str(tmp_path / 'run1'), 700, seed=13, dimension=24, clusters=4)
  directory = _build(str(tmp_path / 'index'), [run.directory])  # here, not in a subprocess
  capsys.readouterr()
  bench_index.main(['--runs', run.directory, '--index', directory, '--queries', '20'])
  out = capsys.readouterr().out
  assert '\n  this index, depth 1 (its own): recall@10 1.000 without re-rank' in out
  assert '\nplain FAISS IVF1,Flat: build' in out
  assert '\n  plain FAISS, depth 1: recall@10 1.000 without re-rank' in out
