"""`embeddings.neighbours` over a collection: a query that is not an image (18.7) or cannot be
decoded, a sheet into a missing folder and --collection with --index (26.5, 26.6, 26.9), cosines
never above 1 and an empty collection's shape (18.20); exact search by blocks for a batch of
queries, float32 and float16 (17.5), on one snapshot; query images embedded with one network
build a process (26.10)."""

import pathlib

import numpy as np
import pytest

import collection
import embeddings
from commands import neighbours as neighbours_command
from embeddings import neighbours, query as query_module
from embeddings.runs import concatenate, metadata_of, open_snapshot
from embeddings.shards import Shard
from embeddings.similarity import nearest, nearest_many, unit_rows
from run_format import METADATA_COLUMNS, METADATA_SCHEMA, RUN_COLUMN
from tests import collection_writer
from tests.png_chunks import png_declaring
from tests.run_writer import rows, write_run

DIMENSION = 40
SAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'sample_images'


def _small(tmp_path) -> str:
  uri = str(tmp_path / 'collection')
  collection_writer.commit(uri, collection_writer.rows(['a.jpg', 'b.jpg'], 8, seed=0), '/runs/1')
  return uri


def _never_embed(*_):
  raise AssertionError('the network was built')


def test_a_query_that_is_not_an_image_is_refused_before_the_network_is_built(tmp_path,
                                                                           monkeypatch, capsys):
  uri = _small(tmp_path)
  not_an_image = tmp_path / 'not_an_image.jpg'
  not_an_image.write_text('hello, I am text')
  monkeypatch.setattr(query_module, 'embed_image', _never_embed)
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--collection', uri, '--query', str(not_an_image)])
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


def test_an_empty_collection_keeps_the_vector_width(tmp_path):
  empty = concatenate([], 'builtin:test', 4320)
  assert empty.vectors.shape == (0, 4320) and empty.uris == []
  collection.create(str(tmp_path / 'empty'), 'builtin:test', 4320, 'float32')
  loaded = embeddings.load(str(tmp_path / 'empty'))
  assert loaded.vectors.shape == (0, 4320) and loaded.model == 'builtin:test'
  assert neighbours.search_vectors(open_snapshot(str(tmp_path / 'empty')), np.ones(4320), 3) == [
      []]


def _brute_force(vectors, uris, queries, k, excluded):
  scores = unit_rows(np.asarray(queries, np.float32)) @ unit_rows(vectors).T
  answers = []
  for q, row in enumerate(scores):
    order = [i for i in np.argsort(-row, kind='stable') if uris[i] not in excluded[q]][:k]
    answers.append(([uris[i] for i in order], row[order]))
  return answers


@pytest.fixture(scope='module', params=['float32', 'float16'])
def nights(request, tmp_path_factory):
  """1300 rows over three nights (three fragments), the second replacing 200 of the first."""
  uri = str(tmp_path_factory.mktemp(request.param) / 'collection')
  names = [f'/p/{i:04d}.jpg' for i in range(1300)]
  first = collection_writer.commit(uri, collection_writer.rows(names[:700], DIMENSION, 1),
                                   '/runs/1', embedding_dtype=request.param)
  collection_writer.commit(uri, collection_writer.rows(names[500:1000], DIMENSION, 2), '/runs/2',
                           embedding_dtype=request.param)
  collection_writer.commit(uri, collection_writer.rows(names[1000:], DIMENSION, 3), '/runs/3',
                           embedding_dtype=request.param)
  return uri, first, request.param


def test_a_batch_of_queries_gets_the_exact_neighbours_of_each_in_one_pass(nights):
  uri, _, dtype = nights
  loaded = embeddings.load(uri)
  assert loaded.vectors.dtype == np.float32 and len(loaded.uris) == 1300
  if dtype == 'float16':  # read back as float32, the stored values exactly
    np.testing.assert_array_equal(loaded.vectors,
                                  loaded.vectors.astype(np.float16).astype(np.float32))
  queries = np.concatenate([loaded.vectors[[0, 650, 1299]],
                            np.random.default_rng(0).random((2, DIMENSION), np.float32)])
  excluded = [{loaded.uris[0]}, {loaded.uris[650], loaded.uris[3]}, set(), set(), set()]
  snapshot = open_snapshot(uri)
  taken = []

  def metadata(ids):
    taken.append(len(ids))
    return metadata_of(snapshot.take(ids.tolist(), METADATA_COLUMNS + [RUN_COLUMN]))

  # Blocks of 200 rows: several a fragment, and a short last one.
  found = nearest_many(neighbours.vector_blocks(snapshot, 200), queries, 6, excluded, metadata)
  for answer, (uris, scores) in zip(found, _brute_force(loaded.vectors, loaded.uris, queries, 6,
                                                         excluded)):
    assert [n.uri for n in answer] == uris and [n.rank for n in answer] == list(range(1, 7))
    np.testing.assert_allclose([n.score for n in answer], scores, rtol=1e-5, atol=1e-6)
    assert all(n.metadata['uri'] == n.uri and n.metadata['model'] == collection_writer.MODEL
               for n in answer)
  # Metadata is read for the best rows only, once: at most k + 2 (the most excluded) per query.
  assert taken and sum(taken) <= len(queries) * 8 and len(taken) == 1


def test_search_answers_from_the_snapshot_it_opened(nights):
  """Version 1's vectors of the rows night 2 replaced, not the latest ones."""
  uri, first, _ = nights
  then = embeddings.load(uri, first)
  queries = then.vectors[[550, 600]] + 0.01
  for version, reference in ((first, then), (None, embeddings.load(uri))):
    found = neighbours.search_vectors(open_snapshot(uri, version), queries, 4)
    for answer, (uris, scores) in zip(found, _brute_force(reference.vectors, reference.uris,
                                                           queries, 4, [set(), set()])):
      assert [n.uri for n in answer] == uris
      np.testing.assert_allclose([n.score for n in answer], scores, rtol=1e-5, atol=1e-6)
  assert neighbours.search_vectors(open_snapshot(uri, first), queries, 1)[0][0].metadata[
      'run'] == '/runs/1'


def test_queries_of_the_wrong_width_are_refused(tmp_path):
  with pytest.raises(ValueError, match='queries of 7 values'):
    neighbours.search_vectors(open_snapshot(_small(tmp_path)), np.ones(7), 3)


def _undecodable(kind: str) -> bytes:
  jpeg = (SAMPLES / 'rocket.jpg').read_bytes()
  return {'truncated.jpg': jpeg[:len(jpeg) // 2],
          'bomb.png': png_declaring(10_000, 10_000),  # 1e8 pixels: Pillow warns, then decodes
          'notes.jpg': b'hello, I am text'}[kind]


@pytest.mark.parametrize('name', ['truncated.jpg', 'bomb.png', 'notes.jpg'])
def test_a_query_that_cannot_be_decoded_is_refused_in_one_line_naming_it(tmp_path, monkeypatch,
                                                                         capsys, name):
  uri = _small(tmp_path)
  query = tmp_path / name
  query.write_bytes(_undecodable(name))
  monkeypatch.setattr(query_module, 'embed_image', _never_embed)
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--collection', uri, '--query', str(query)])
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
  uri = _small(tmp_path)
  monkeypatch.setattr(neighbours_command, 'open_snapshot',
                      lambda *_: pytest.fail('opened the collection first'))
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(['--collection', uri, '--query', 'a.jpg', '--sheet',
                             str(tmp_path / 'missing' / 'n.png')])
  assert refused.value.code == 2
  assert f'the folder {tmp_path / "missing"} does not exist' in capsys.readouterr().err


@pytest.mark.parametrize('flags', [['--collection', 'c', '--index', 'i'], [],
                                   ['--index', 'i', '--version', '3']])
def test_a_collection_or_an_index_exactly_and_a_version_only_of_a_collection(capsys, flags):
  with pytest.raises(SystemExit) as refused:
    neighbours_command.main(flags + ['--query', 'a.jpg'])
  assert refused.value.code == 2
  error = capsys.readouterr().err
  assert ('--version: a version of --collection' if '--version' in flags else
          'give --collection or --index (one of them)') in error


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
