"""`embeddings.neighbours` over an index, a query that is not an image (18.7) or cannot be
decoded, a sheet into a missing folder and --runs with --index (26.5, 26.6, 26.9), cosines never
above 1 and an empty collection's shape (18.20); exact search by blocks for a batch of queries,
float32 and float16 (17.5); query images embedded with one network build a process (26.10)."""

import pathlib

import numpy as np
import pytest

import embeddings
from benchmarks.synthetic_collection import write_synthetic_run
from commands import index as index_command
from commands import neighbours as neighbours_command
from embeddings import neighbours, query as query_module
from embeddings.runs import concatenate, iter_run_vectors
from embeddings.shards import ParquetVectors, Shard
from embeddings.similarity import nearest, nearest_many, unit_rows
from run_format import METADATA_SCHEMA
from tests.png_chunks import png_declaring
from tests.run_writer import rows, write_run

DIMENSION = 40
SAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'sample_images'


def _never_embed(*_):
  raise AssertionError('the network was built')


def test_a_query_that_is_not_an_image_is_refused_before_the_network_is_built(tmp_path,
                                                                           monkeypatch, capsys):
  run = str(tmp_path / 'run')
  write_run(run, rows(['a.jpg', 'b.jpg'], 8, seed=0))
  not_an_image = tmp_path / 'not_an_image.jpg'
  not_an_image.write_text('hello, I am text')
  monkeypatch.setattr(query_module, 'embed_image', _never_embed)
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--runs', run, '--query', str(not_an_image)])
  assert refused.value.code == 2
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and 'not_an_image.jpg: not an image' in error


def test_cosines_are_never_above_one():
  rng = np.random.default_rng(0)
  vectors = rng.random((300, 4320), dtype=np.float32) * rng.random((300, 1), dtype=np.float32)
  self_cosines = np.einsum('ij,ij->i', unit_rows(vectors), unit_rows(vectors))
  assert self_cosines.max() > 1.0  # float32 rounding: the case 18.20 saw
  import pyarrow as pa
  uris = [f'u{i}' for i in range(300)]
  metadata = pa.Table.from_pylist([{'uri': u} for u in uris], METADATA_SCHEMA)
  shard = Shard('s', uris, vectors, metadata)
  worst = int(np.argmax(self_cosines))
  found = nearest([shard], vectors[worst], 3)
  assert found[0].uri == f'u{worst}' and found[0].score == 1.0


def test_an_empty_collection_keeps_the_vector_width():
  empty = concatenate([], 'builtin:test', 4320)
  assert empty.vectors.shape == (0, 4320) and empty.uris == []


def test_neighbours_through_an_index_give_the_table_and_the_exact_ranking(tmp_path, capsys):
  """Local URIs of files that are gone: the query is looked up by URI at once (a synthetic
  gs:// URI would be tried on storage.googleapis.com, 2 minutes of retries here)."""
  run = str(tmp_path / 'run')
  write_run(run, rows([str(tmp_path / 'gone' / f'{i:03d}.jpg') for i in range(300)], DIMENSION,
                      seed=11), output_format='parquet', shard_rows=100)
  directory = str(tmp_path / 'index')
  index_command.main(['build', '--runs', run, '--output', directory])
  collection = embeddings.load(run)
  query_uri = collection.uris[7]
  through_index = neighbours_command.main(['--index', directory, '--query', query_uri, '--k', '5'])
  table = capsys.readouterr().out
  exact = neighbours_command.main(['--runs', run, '--query', query_uri, '--k', '5'])
  assert [n.uri for n in through_index] == [n.uri for n in exact]
  assert [n.score for n in through_index] == pytest.approx([n.score for n in exact], abs=1e-6)
  assert f'query: {query_uri} (embedded)' in table and exact[0].uri in table
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--index', directory, '--query', query_uri, '--model', 'builtin:other'])
  assert refused.value.code == 2
  assert 'builtin:other' in capsys.readouterr().err


def _brute_force(vectors, uris, queries, k, excluded):
  scores = unit_rows(np.asarray(queries, np.float32)) @ unit_rows(vectors).T
  answers = []
  for q, row in enumerate(scores):
    order = [i for i in np.argsort(-row, kind='stable') if uris[i] not in excluded[q]][:k]
    answers.append(([uris[i] for i in order], row[order]))
  return answers


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_a_batch_of_queries_gets_the_exact_neighbours_of_each_in_one_pass(tmp_path, dtype,
                                                                        monkeypatch):
  run = write_synthetic_run(str(tmp_path / 'run'), 1300, seed=3, dimension=DIMENSION,
                            clusters=4, shard_rows=600, embedding_dtype=dtype)
  collection = embeddings.load(run.directory)
  assert collection.vectors.dtype == np.float32
  if dtype == 'float16':  # read back as float32, the stored values exactly
    np.testing.assert_array_equal(collection.vectors,
                                  collection.vectors.astype(np.float16).astype(np.float32))
  queries = np.concatenate([collection.vectors[[0, 650, 1299]],
                            np.random.default_rng(0).random((2, DIMENSION), np.float32)])
  excluded = [{collection.uris[0]}, {collection.uris[650], collection.uris[3]}, set(), set(),
              set()]
  read_rows = []
  original = ParquetVectors.metadata
  monkeypatch.setattr(ParquetVectors, 'metadata',
                      lambda self, rows: read_rows.append(len(rows)) or original(self, rows))
  # Blocks of one row group (the writer's 256 rows): several blocks a shard, and a short last one.
  found = nearest_many(iter_run_vectors(embeddings.find_runs(run.directory)), queries, 6,
                       excluded, block_rows=200)
  for answer, (uris, scores) in zip(found, _brute_force(collection.vectors, collection.uris,
                                                         queries, 6, excluded)):
    assert [n.uri for n in answer] == uris and [n.rank for n in answer] == list(range(1, 7))
    np.testing.assert_allclose([n.score for n in answer], scores, rtol=1e-5, atol=1e-6)
    assert all(n.metadata['uri'] == n.uri and n.metadata['model'] == run.model_id
               for n in answer)
  # Metadata is read for the best rows only: at most k + 2 (the most excluded) per query.
  assert sum(read_rows) <= len(queries) * 8 and len(read_rows) <= 3


def test_search_over_several_runs_keeps_each_uris_latest_vector_and_reads_tfrecords(tmp_path):
  uris = [f'img{i:03d}' for i in range(90)]
  older, newer = str(tmp_path / 'older'), str(tmp_path / 'newer')
  write_run(older, rows(uris, DIMENSION, seed=1), output_format='parquet', shard_rows=40,
            finished_at='2026-01-01T00:00:00Z')
  write_run(newer, rows(uris[30:60], DIMENSION, seed=2), output_format='tfrecord',
            finished_at='2026-01-02T00:00:00Z')
  runs = embeddings.select_model(embeddings.find_runs([older, newer]))
  collection = embeddings.load([older, newer])
  assert len(collection.uris) == 90  # the newer run's 30 vectors replace the older ones
  queries = collection.vectors[[35, 80]] + 0.1
  found = neighbours.search_vectors(runs, queries, 5)
  for answer, (expected, scores) in zip(found, _brute_force(
      collection.vectors, collection.uris, queries, 5, [set(), set()])):
    assert [n.uri for n in answer] == expected
    np.testing.assert_allclose([n.score for n in answer], scores, rtol=1e-5)


def test_a_parquet_shard_of_another_model_is_refused_from_its_footer(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run'), 50, dimension=DIMENSION, clusters=2,
                            model_id='builtin:other@seed1')
  summary_path = tmp_path / 'run' / 'run_summary.json'
  summary_path.write_text(summary_path.read_text().replace('builtin:other@seed1', 'builtin:mine'))
  with pytest.raises(embeddings.MixedModelsError, match='builtin:other@seed1'):
    neighbours.search_vectors(embeddings.find_runs(run.directory),
                              np.ones(DIMENSION, np.float32), 3)


def test_queries_of_the_wrong_width_are_refused(tmp_path):
  run = write_synthetic_run(str(tmp_path / 'run'), 20, dimension=DIMENSION, clusters=2)
  with pytest.raises(ValueError, match='queries of 7 values'):
    neighbours.search_vectors(embeddings.find_runs(run.directory), np.ones(7), 3)


def _undecodable(kind: str) -> bytes:
  jpeg = (SAMPLES / 'rocket.jpg').read_bytes()
  return {'truncated.jpg': jpeg[:len(jpeg) // 2],
          'bomb.png': png_declaring(10_000, 10_000),  # 1e8 pixels: Pillow warns, then decodes
          'notes.jpg': b'hello, I am text'}[kind]


@pytest.mark.parametrize('name', ['truncated.jpg', 'bomb.png', 'notes.jpg'])
def test_a_query_that_cannot_be_decoded_is_refused_in_one_line_naming_it(tmp_path, monkeypatch,
                                                                         capsys, name):
  run = str(tmp_path / 'run')
  write_run(run, rows(['a.jpg', 'b.jpg'], 8, seed=0))
  query = tmp_path / name
  query.write_bytes(_undecodable(name))
  monkeypatch.setattr(query_module, 'embed_image', _never_embed)
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--runs', run, '--query', str(query)])
  assert refused.value.code == 2
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and error.startswith(f'error: --query {query}: ')
  assert 'BytesIO' not in error and 'Warning' not in error
  assert {'truncated.jpg': 'truncated', 'bomb.png': 'over the limit of 89478485',
          'notes.jpg': "not an image that can be read (16 bytes, starting b'hello, I am text')"
          }[name] in error


def test_the_query_pixel_limit_is_the_pipelines_default():
  from transforms.decode import DEFAULT_MAX_IMAGE_PIXELS
  assert neighbours.MAX_QUERY_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def test_a_sheet_into_a_missing_folder_is_refused_before_the_search(tmp_path, monkeypatch,
                                                                    capsys):
  run = str(tmp_path / 'run')
  write_run(run, rows(['a.jpg', 'b.jpg'], 8, seed=0))
  monkeypatch.setattr(neighbours_command, 'find_runs', lambda _: pytest.fail('read the runs first'))
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--runs', run, '--query', 'a.jpg', '--sheet',
                     str(tmp_path / 'missing' / 'n.png')])
  assert refused.value.code == 2
  assert f'the folder {tmp_path / "missing"} does not exist' in capsys.readouterr().err


def test_runs_and_an_index_together_are_refused_as_not_both(tmp_path, capsys):
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--runs', str(tmp_path), '--index', str(tmp_path), '--query', 'a.jpg'])
  assert refused.value.code == 2
  assert 'give --runs or --index, not both' in capsys.readouterr().err


def test_embedding_query_images_builds_the_network_once_a_process(tmp_path):
  """A second image, or an undecodable one (refused before any build), costs no build."""
  from storage.run_dirs import find_runs
  run = str(tmp_path / 'run')
  write_run(run, rows(['a.jpg'], 8, seed=0), model='builtin:pnasnet_tiny@untrained-seed0')
  [tiny_run] = find_runs(run)
  query_module._embedding_model.cache_clear()
  with pytest.raises(query_module.UndecodableImage, match='truncated JPEG'):
    query_module.embed_image(_undecodable('truncated.jpg'), tiny_run)
  assert query_module._embedding_model.cache_info().misses == 0
  first = query_module.embed_image((SAMPLES / 'rocket.jpg').read_bytes(), tiny_run)
  again = query_module.embed_image((SAMPLES / 'rocket.jpg').read_bytes(), tiny_run)
  other = query_module.embed_image((SAMPLES / 'chelsea.png').read_bytes(), tiny_run)
  assert first.ndim == 1 and np.array_equal(first, again)
  assert not np.array_equal(first, other)
  info = query_module._embedding_model.cache_info()
  assert (info.misses, info.hits) == (1, 2)
