"""`embeddings.neighbours` over an index, a query that is not an image (18.7), cosines never
above 1 and an empty collection's shape (18.20)."""

import numpy as np
import pytest

import embeddings
from benchmarks.synthetic_collection import write_synthetic_run
from embeddings import index as neighbour_index
from embeddings import neighbours, query as query_module
from embeddings.runs import concatenate
from embeddings.similarity import nearest, unit_rows
from embeddings.shards import Shard
from run_format import METADATA_SCHEMA
from tests.run_writer import rows, write_run

DIMENSION = 40


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
    neighbours.main(['--runs', run, '--query', str(not_an_image)])
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
  run = write_synthetic_run(str(tmp_path / 'run'), 300, seed=11, dimension=DIMENSION,
                            clusters=3, shard_rows=100)
  directory = str(tmp_path / 'index')
  neighbour_index.main(['build', '--runs', run.directory, '--output', directory])
  collection = embeddings.load(run.directory)
  query_uri = collection.uris[7]
  through_index = neighbours.main(['--index', directory, '--query', query_uri, '--k', '5'])
  table = capsys.readouterr().out
  exact = neighbours.main(['--runs', run.directory, '--query', query_uri, '--k', '5'])
  assert [n.uri for n in through_index] == [n.uri for n in exact]
  assert [n.score for n in through_index] == pytest.approx([n.score for n in exact], abs=1e-6)
  assert f'query: {query_uri} (embedded)' in table and exact[0].uri in table
  with pytest.raises(SystemExit) as refused:
    neighbours.main(['--index', directory, '--query', query_uri, '--model', 'builtin:other'])
  assert refused.value.code == 2
  assert 'builtin:other' in capsys.readouterr().err
