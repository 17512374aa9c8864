"""Reading back: a collection's snapshots (embeddings.load / iter_shards, any version), one run
directory (load_run), neighbours, duplicates, contact sheets.

Collections come from `tests.collection_writer` (committed directly, as a night commits) or from
`collection import` of runs; runs from `tests.run_writer` (the output layout written directly)
or `pipeline.launcher.run` with the tiny built-in network.
"""

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import collection
import embeddings
import storage
from benchmarks.near_duplicates import copies_of
from commands import collection as collection_command
from commands import duplicates as duplicates_command
from commands import neighbours as neighbours_command
from commands import runs as runs_command
from embeddings import duplicate_groups, neighbours, sheet
from embeddings.runs import open_snapshot
from embeddings.shards import CorruptShardError, read_shard
from embeddings.similarity import nearest
from pipeline.launcher import run as run_pipeline
from pipeline.options import OptionsError
from tests import collection_writer
from tests.conftest import SAMPLE_IMAGES
from tests.run_writer import RECIPE, rows, write_run, write_summary_of_0_1

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = sorted(n for n in os.listdir(SAMPLE_IMAGES) if not n.endswith('.md'))


def _by_uri(loaded):
  return {uri: loaded.vectors[i] for i, uri in enumerate(loaded.uris)}


@pytest.fixture(scope='module')
def nights(tmp_path_factory):
  """Three nights of a collection: 40 images, then 10 changed and 2 gone, then 5 new."""
  uri = str(tmp_path_factory.mktemp('nights') / 'collection')
  first = collection_writer.rows([f'/p/{i:02d}.jpg' for i in range(40)], 16, seed=1)
  changed = collection_writer.rows([f'/p/{i:02d}.jpg' for i in range(30, 40)], 16, seed=2)
  added = collection_writer.rows([f'/p/{i:02d}.jpg' for i in range(40, 45)], 16, seed=3)
  versions = [collection_writer.commit(uri, first, '/runs/1'),
              collection_writer.commit(uri, changed, '/runs/2', gone=['/p/00.jpg', '/p/01.jpg']),
              collection_writer.commit(uri, added, '/runs/3')]
  expected = [{r.uri: r for r in first}]
  expected.append(dict({u: r for u, r in expected[0].items() if u not in ('/p/00.jpg', '/p/01.jpg')},
                       **{r.uri: r for r in changed}))
  expected.append(dict(expected[1], **{r.uri: r for r in added}))
  return uri, versions, expected


def test_each_version_reads_back_as_it_was_committed_after_later_commits(nights):
  """Time travel: load and iter_shards of version N give version N's rows, whatever came after."""
  uri, versions, expected = nights
  for version, rows_then in zip(versions, expected):
    loaded = embeddings.load(uri, version)
    assert sorted(loaded.uris) == sorted(rows_then)
    for name, vector in _by_uri(loaded).items():
      np.testing.assert_array_equal(vector, rows_then[name].embedding)
    shards = list(embeddings.iter_shards(uri, version, batch_rows=16))
    assert max(len(s.uris) for s in shards) <= 16 and len(shards) >= len(rows_then) // 16
    assert [u for s in shards for u in s.uris] == loaded.uris
    np.testing.assert_array_equal(np.concatenate([s.vectors for s in shards]), loaded.vectors)
  latest = embeddings.load(uri)
  assert latest.uris == embeddings.load(uri, versions[-1]).uris
  table = {r['uri']: r for r in latest.metadata.to_pylist()}
  assert table['/p/35.jpg']['run'] == '/runs/2' and table['/p/02.jpg']['run'] == '/runs/1'
  assert table['/p/35.jpg']['sha256'] == expected[1]['/p/35.jpg'].sha256
  assert latest.vectors.dtype == np.float32 and latest.model == collection_writer.MODEL
  assert latest.metadata.schema == embeddings.METADATA_SCHEMA


def test_run_directories_and_lists_of_them_are_refused_naming_the_import(tmp_path):
  write_run(str(tmp_path / 'runs' / '1'), rows(['a'], 4, seed=1))
  write_run(str(tmp_path / 'runs' / '2'), rows(['b'], 4, seed=2))
  with pytest.raises(embeddings.CollectionNotFoundError,
                     match=r'names run directories.*load_run.*collection import'):
    embeddings.load(str(tmp_path / 'runs' / '1'))
  with pytest.raises(embeddings.NoRunsError, match='not read together.*collection import'):
    embeddings.load([str(tmp_path / 'runs' / '1'), str(tmp_path / 'runs' / '2')])
  with pytest.raises(embeddings.MixedModelsError, match='holds 2 finished runs.*collection import'):
    embeddings.load_run(str(tmp_path / 'runs' / '*'))
  with pytest.raises(embeddings.CollectionNotFoundError, match='no collection at .*nothing'):
    embeddings.load(str(tmp_path / 'nothing'))
  assert embeddings.load_run(str(tmp_path / 'runs' / '2')).uris == ['b']


def test_a_float16_collection_reads_back_as_float32(tmp_path):
  written = collection_writer.rows([f'/h/{i}' for i in range(5)], 12, seed=4)
  collection_writer.commit(str(tmp_path / 'half'), written, '/runs/h', embedding_dtype='float16')
  loaded = embeddings.load(str(tmp_path / 'half'))
  assert loaded.vectors.dtype == np.float32
  np.testing.assert_array_equal(loaded.vectors, np.stack(
      [r.embedding for r in written]).astype(np.float16).astype(np.float32))


def test_a_run_older_than_0_2_is_refused_by_name(tmp_path, capsys):
  old = rows(['a'], 4, seed=1)
  write_run(str(tmp_path / 'old'), old)
  write_run(str(tmp_path / 'new'), rows(['b'], 4, seed=2))
  write_summary_of_0_1(str(tmp_path / 'old'))
  with pytest.raises(embeddings.IncompatibleRunError,
                     match=r'old/run_summary.json: not a run summary of pnasnet-embeddings 0.2.0 '
                     r'or later \(no .*finished_at'):
    embeddings.load_run(str(tmp_path / '*'))
  assert embeddings.load_run(str(tmp_path / 'new')).uris == ['b']
  with pytest.raises(SystemExit) as exit_info:
    collection_command.main(['import', '--runs', str(tmp_path / '*'), '--collection',
                             str(tmp_path / 'collection')])
  assert exit_info.value.code == 2 and '0.2.0 or later' in capsys.readouterr().err


def test_a_summary_of_the_first_0_2_releases_reads_with_the_later_fields_defaulted(tmp_path):
  """Summaries written before --exclude, --jit_compile, --embedding_dtype,
  --max_failed_fraction and the outcome are runs of 0.2.0 all the same."""
  write_run(str(tmp_path / 'early'), rows(['a', 'b'], 4, seed=1))
  path = tmp_path / 'early' / 'run_summary.json'
  summary = json.loads(path.read_text())
  later = ['exclude', 'jit_compile', 'embedding_dtype', 'max_failed_fraction', 'outcome']
  for name in later:
    del summary[name]
  path.write_text(json.dumps(summary))
  run, = embeddings.find_runs(str(tmp_path / 'early'))
  assert (run.summary.exclude, run.summary.embedding_dtype, run.summary.outcome) == (
      [], 'float32', 'finished')
  assert embeddings.load_run(str(tmp_path / 'early')).uris == ['a', 'b']


def test_a_run_without_summary_is_ignored_and_no_run_at_all_is_an_error(tmp_path, caplog):
  write_run(str(tmp_path / 'done'), rows(['a'], 4, seed=1))
  write_run(str(tmp_path / 'running'), rows(['a', 'b'], 4, seed=2), summary=False)
  with caplog.at_level(logging.WARNING):
    assert embeddings.load_run(str(tmp_path / '*')).uris == ['a']
  assert f'ignoring {tmp_path / "running"}' in caplog.text
  with pytest.raises(embeddings.NoRunsError, match='no finished run'):
    embeddings.load_run(str(tmp_path / 'running'))
  with pytest.raises(embeddings.NoRunsError, match='no run there'):
    embeddings.load_run(str(tmp_path / 'nothing'))


def test_runs_of_a_folder_holding_runs_says_to_add_a_glob(tmp_path, capsys):
  """`runs PARENT` named no run and left the user to guess the `/*`."""
  parent = tmp_path / 'embeddings'
  write_run(str(parent / 'night1'), rows(['a'], 4, seed=1))
  assert runs_command.main([str(parent)]) == 2
  assert capsys.readouterr().err.strip().endswith(
      f'{parent} holds run directories: add /* to list them: pnasnet-embeddings runs '
      f'"{parent}/*"')
  assert runs_command.main([f'{parent}/*']) == 0
  assert runs_command.main([str(tmp_path / 'nothing')]) == 2
  assert 'add /*' not in capsys.readouterr().err


def test_values_the_listing_lacked_read_back_as_null(tmp_path):
  """The writer gives an unknown size or modification time a feature with no value."""
  import tensorflow as tf
  from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
  from transforms.embed import Embedding
  from transforms.provenance import Provenance
  from transforms.write import embeddings_to_record_batch
  run_rows = rows(['a', 'b'], 4, seed=1)
  [path] = write_run(str(tmp_path / 'run'), run_rows)
  provenance = Provenance('builtin:test@untrained-seed0', 'untrained', RECIPE, '0.2.0')
  batch = embeddings_to_record_batch(
      [Embedding(r.uri, r.sha256, r.height, r.width, size, None, provenance.model, r.embedding)
       for r, size in zip(run_rows, (None, 99))], provenance)
  with tf.io.TFRecordWriter(path) as writer:
    for example in RecordBatchToExamplesEncoder().encode(batch):
      writer.write(example)
  loaded = embeddings.load_run(str(tmp_path / 'run'))
  assert [(r['uri'], r['size_bytes'], r['last_modified'], r['recipe'])
          for r in loaded.metadata.to_pylist()] == [('a', None, None, RECIPE),
                                                        ('b', 99, None, RECIPE)]
  np.testing.assert_array_equal(loaded.vectors, np.stack([r.embedding for r in run_rows]))


def test_a_truncated_tfrecord_shard_is_reported(tmp_path):
  [path] = write_run(str(tmp_path / 'run'), rows(['a', 'b'], 8, seed=1))
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:-10])
  with pytest.raises(CorruptShardError, match='truncated'):
    embeddings.load_run(str(tmp_path / 'run'))


def test_a_float16_vector_of_an_odd_number_of_bytes_is_reported(tmp_path):
  import tensorflow as tf
  path = str(tmp_path / 'embeddings-00000-of-00001.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for uri, vector in ((b'a', b'\x00\x3c\x00\x40'), (b'b', b'\x00\x3c\x00')):
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          'image/uri': tf.train.Feature(bytes_list=tf.train.BytesList(value=[uri])),
          'embedding/float16': tf.train.Feature(bytes_list=tf.train.BytesList(value=[vector])),
      })).SerializeToString())
  with pytest.raises(CorruptShardError, match='odd number of bytes'):
    read_shard(path, str(tmp_path))


@pytest.fixture(scope='module')
def photo_run(tmp_path_factory):
  """The sample photos, a half-size and a re-encoded copy of each, and a byte-identical copy of
  camera.png, embedded by the pipeline with the tiny seeded network."""
  folder = tmp_path_factory.mktemp('photos')
  for name in PHOTOS:
    data = open(os.path.join(SAMPLE_IMAGES, name), 'rb').read()
    stem, extension = os.path.splitext(name)
    copies = copies_of(data)
    (folder / name).write_bytes(data)
    (folder / f'{stem}_half{extension}').write_bytes(copies['resized'])
    (folder / f'{stem}_q75.jpg').write_bytes(copies['reencoded'])
  shutil.copy(folder / 'camera.png', folder / 'camera_copy.png')
  output = str(tmp_path_factory.mktemp('runs') / 'tiny')
  summary = run_pipeline([f'--input={folder}/*', f'--output={output}', '--num_shards=3',
                          '--model=builtin:pnasnet_tiny'])
  assert summary['embedded'] == 3 * len(PHOTOS) + 1
  uri = str(tmp_path_factory.mktemp('collections') / 'tiny')
  collection_command.main(['import', '--runs', output, '--collection', uri])
  return folder, uri


def _copies(folder, name):
  stem, extension = os.path.splitext(name)
  return {str(folder / f'{stem}_half{extension}'), str(folder / f'{stem}_q75.jpg')}


def test_resized_and_reencoded_copies_are_each_photos_two_nearest(photo_run):
  folder, uri = photo_run
  snapshot = open_snapshot(uri)
  for name in PHOTOS:
    if name == 'camera.png':  # its byte-identical copy comes first, with cosine 1
      continue
    query = neighbours.find_query(snapshot, str(folder / name))
    assert query.source == 'embedded'
    found = neighbours.search(snapshot, query, k=2)
    assert {n.uri for n in found} == _copies(folder, name), name


def _tiles(png: bytes, columns: int, rows: int) -> int:
  """Grid cells of a contact sheet holding something other than background."""
  image = np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))
  assert image.shape[:2] == (rows * sheet.CELL_HEIGHT, columns * sheet.CELL_WIDTH)
  return sum((image[r * sheet.CELL_HEIGHT:(r + 1) * sheet.CELL_HEIGHT,
                    c * sheet.CELL_WIDTH:(c + 1) * sheet.CELL_WIDTH] != 255).any()
             for r in range(rows) for c in range(columns))


def test_neighbours_command_embeds_a_new_query_and_draws_the_sheet(photo_run, tmp_path, capsys):
  folder, uri = photo_run
  with Image.open(folder / 'rocket.jpg') as image:
    image.save(tmp_path / 'rocket_q50.jpg', quality=50)  # not in the collection
  png = tmp_path / 'neighbours.png'
  found = neighbours_command.main(['--collection', uri, '--query',
                                   str(tmp_path / 'rocket_q50.jpg'), '--k', '6', '--sheet',
                                   str(png)])
  printed = capsys.readouterr().out
  assert 'embedded now with builtin:pnasnet_tiny@untrained-seed0' in printed
  assert {n.uri for n in found[:3]} == {str(folder / 'rocket.jpg')} | _copies(folder, 'rocket.jpg')
  assert all(n.uri in printed for n in found) and len(found) == 6
  data = png.read_bytes()
  assert data.startswith(b'\x89PNG\r\n\x1a\n')
  Image.open(io.BytesIO(data)).verify()
  assert _tiles(data, columns=4, rows=2) == 7  # the query and six neighbours, 4 + 3


def test_neighbours_command_refuses_an_unknown_query(photo_run, tmp_path, capsys):
  _, uri = photo_run
  with pytest.raises(SystemExit) as exit_info:
    neighbours_command.main(['--collection', uri, '--query', str(tmp_path / 'missing.jpg')])
  assert exit_info.value.code == 2
  assert 'not in ' + uri + ' version' in capsys.readouterr().err


def test_a_new_query_cannot_be_embedded_once_every_run_directory_is_gone(photo_run, tmp_path):
  """The collection still answers for its own images; a new image needs a run's summary."""
  folder, uri = photo_run
  copied = str(tmp_path / 'copy')
  shutil.copytree(uri, copied)
  snapshot = open_snapshot(copied)
  assert neighbours.find_query(snapshot, str(folder / 'coffee.png')).source == 'embedded'
  with Image.open(folder / 'rocket.jpg') as image:
    image.save(tmp_path / 'new.jpg', quality=40)
  gone = snapshot.record(snapshot.version).run
  shutil.move(gone, gone + '.moved')
  try:
    with pytest.raises(neighbours.QueryError, match='cannot be embedded: no run directory'):
      neighbours.find_query(snapshot, str(tmp_path / 'new.jpg'))
  finally:
    shutil.move(gone + '.moved', gone)


def test_duplicates_command_groups_copies_and_identical_bytes(photo_run, tmp_path):
  folder, uri = photo_run
  groups = duplicates_command.main(['--collection', uri, '--csv', str(tmp_path / 'dups.csv'),
                                    '--sheet', str(tmp_path / 'dups.png')])  # tiny's default
  with open(tmp_path / 'dups.csv', newline='') as f:
    table = list(csv.DictReader(f))
  members = {}
  for row in table:
    members.setdefault(row['group'], set()).add(row['uri'])
  expected = [{str(folder / name)} | _copies(folder, name) for name in PHOTOS]
  expected[PHOTOS.index('camera.png')].add(str(folder / 'camera_copy.png'))
  assert sorted(members.values(), key=sorted) == sorted(expected, key=sorted)
  copy = next(r for r in table if r['uri'].endswith('camera_copy.png'))
  camera = next(r for r in table if r['uri'].endswith('/camera.png'))
  assert copy['sha256'] == camera['sha256'] == hashlib.sha256(
      (folder / 'camera.png').read_bytes()).hexdigest()
  assert float(copy['cosine_to_kept']) == pytest.approx(float(camera['cosine_to_kept']), abs=1e-6)
  assert len(groups) == len(PHOTOS)
  assert [g.kind for g in groups] == ['mixed'] + ['near'] * (len(PHOTOS) - 1)  # camera first
  assert copy['kind'] == camera['kind'] == 'exact' and copy['same_bytes_as'] == camera['uri']
  # Groups, largest first, one row each: camera's four images, then three for each other photo.
  assert _tiles((tmp_path / 'dups.png').read_bytes(), columns=4, rows=6) == 4 + 3 * 5


def test_exact_duplicates_alone_form_an_exact_group(tmp_path):
  same = collection_writer.rows(['a', 'b'], 8, seed=1)
  same[1] = same[1]._replace(sha256=same[0].sha256)
  collection_writer.commit(str(tmp_path / 'c'), same + collection_writer.rows(['c'], 8, seed=2),
                           '/runs/1')
  groups = duplicate_groups.find_groups(embeddings.load(str(tmp_path / 'c')), threshold=0.999)
  assert [(g.kind, len(g.members)) for g in groups] == [('exact', 2)]
  assert [m.kind for m in groups[0].members] == ['exact', 'exact']
  assert groups[0].members[1].same_bytes_as == groups[0].members[0].uri


def test_the_package_imports_without_beam_or_tensorflow():
  code = ('import sys, embeddings, embeddings.neighbours, embeddings.duplicates, '
          'embeddings.neighbour_index, embeddings.list_runs, embeddings.browse; '
          'print(sorted({"apache_beam", "tensorflow"} & set(sys.modules)))')
  imported = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True, cwd=PROJECT).stdout
  assert imported.strip() == '[]'


def test_a_collection_on_s3_with_the_store_flags(s3_server, capsys):
  s3_server.create_bucket('s3-collection')
  collection.set_store_options(s3_server.options)
  run_rows = collection_writer.rows(['s3://s3-collection/photos/a.jpg',
                                     's3://s3-collection/photos/b.jpg'], 8, seed=6)
  collection_writer.commit('s3://s3-collection/c', run_rows, '/runs/1')
  collection.set_store_options([])  # the command's own flags must reach the server
  found = neighbours_command.main(['--collection', 's3://s3-collection/c', '--query',
                                   run_rows[0].uri, '--k', '1'] + s3_server.options)
  assert [n.uri for n in found] == [run_rows[1].uri]
  assert f'query: {run_rows[0].uri} (embedded)' in capsys.readouterr().out


def test_parquet_output_equals_the_tfrecords_exactly_in_duckdb(image_folder, tmp_path):
  """--output_format both: DuckDB reads the pipeline's Parquet shards as they are, and every
  vector equals its TFRecord twin bit for bit; `load` reads the same from either. The vectors'
  column is written plain (no dictionary, no compression, required elements), the others with
  both."""
  import duckdb
  import tensorflow as tf
  output = str(tmp_path / 'both')
  summary = run_pipeline([f'--input={image_folder}', '--model=builtin:pnasnet_tiny',
                          f'--output={output}', '--output_format=both', '--num_shards=2'])
  from_tfrecord = {}
  for path in tf.io.gfile.glob(f'{output}/embeddings-*.tfrecord'):
    for record in tf.data.TFRecordDataset(path):
      feature = tf.train.Example.FromString(record.numpy()).features.feature
      from_tfrecord[feature['image/uri'].bytes_list.value[0].decode()] = np.asarray(
          feature['embedding'].float_list.value, np.float32)
  table = duckdb.sql(f"SELECT uri, embedding, size_bytes, last_modified, model, recipe "
                     f"FROM '{output}/embeddings-*.parquet'").fetchall()
  assert len(table) == len(from_tfrecord) == summary['embedded']
  for uri, vector, size_bytes, last_modified, model, recipe in table:
    np.testing.assert_array_equal(np.asarray(vector, np.float32), from_tfrecord[uri])
    assert size_bytes == os.path.getsize(uri) and last_modified.tzinfo is not None
    assert (model, recipe) == (summary['model'], summary['recipe'])
  loaded = embeddings.load_run(output)
  for uri, vector in _by_uri(loaded).items():
    np.testing.assert_array_equal(vector, from_tfrecord[uri])
  import pyarrow.parquet as pq
  for path in tf.io.gfile.glob(f'{output}/embeddings-*.parquet'):
    columns = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {columns.column(i).path_in_schema.split('.')[0]: (
        columns.column(i).compression, 'RLE_DICTIONARY' in columns.column(i).encodings)
        for i in range(columns.num_columns)}
    assert codecs.pop('embedding') == ('UNCOMPRESSED', False)  # the vectors plain, fast to read
    # Required elements: Arrow decodes them without definition levels.
    assert not pq.read_schema(path).field('embedding').type.value_field.nullable
    assert codecs['uri'] == ('SNAPPY', True)


def _sample_run(tmp_path, name, *flags):
  return run_pipeline([f'--input={SAMPLE_IMAGES}/*.png', f'--input={SAMPLE_IMAGES}/*.jpg',
                       '--model=builtin:pnasnet_tiny', f'--output={tmp_path / name}', *flags])


def test_float16_runs_in_both_formats_read_back_as_the_float32_run_rounded(tmp_path, capsys):
  """--embedding_dtype float16: Parquet holds halffloat, TFRecord the half floats' bytes; load,
  iter_shards, neighbours and DuckDB give float32 arrays equal to the float32 run's vectors
  rounded to float16; the summary and every row's recipe say so."""
  import duckdb
  import tensorflow as tf
  reference = _sample_run(tmp_path, 'float32', '--output_format=both')
  half_parquet = _sample_run(tmp_path, 'parquet16', '--output_format=parquet',
                             '--embedding_dtype=float16')
  half_tfrecord = _sample_run(tmp_path, 'tfrecord16', '--embedding_dtype=float16',
                              '--compression=gzip')
  assert reference['embedding_dtype'] == 'float32' and ';embedding_dtype' not in reference['recipe']
  for summary in (half_parquet, half_tfrecord):
    assert summary['embedding_dtype'] == 'float16'
    assert summary['recipe'] == reference['recipe'] + ';embedding_dtype=float16'
  assert half_tfrecord['embedded'] == reference['embedded']
  expected = {uri: vector.astype(np.float16).astype(np.float32)
              for uri, vector in _by_uri(embeddings.load_run(str(tmp_path / 'float32'))).items()}
  parquet_shards = storage.match(str(tmp_path / 'parquet16' / 'embeddings-*.parquet'))
  assert pq.read_schema(parquet_shards[0].path).field('embedding').type == pa.list_(
      pa.field('element', pa.float16(), nullable=False), reference['embedding_size'])

  for name, summary in (('parquet16', half_parquet), ('tfrecord16', half_tfrecord)):
    run = str(tmp_path / name)
    loaded = embeddings.load_run(run)
    assert loaded.vectors.dtype == np.float32 and sorted(loaded.uris) == sorted(expected)
    for uri, vector in _by_uri(loaded).items():
      np.testing.assert_array_equal(vector, expected[uri])
    assert set(loaded.metadata.column('recipe').to_pylist()) == {summary['recipe']}
    shards = list(embeddings.iter_run_shards(run))
    assert all(shard.vectors.dtype == np.float32 for shard in shards)
    np.testing.assert_array_equal(np.concatenate([s.vectors for s in shards]), loaded.vectors)
    # Imported, the float16 vectors are stored as they are and read back the same.
    imported = str(tmp_path / f'{name}-collection')
    collection_command.main(['import', '--runs', run, '--collection', imported])
    assert collection.open_collection(imported).embedding_dtype == 'float16'
    collection_vectors = _by_uri(embeddings.load(imported))
    assert sorted(collection_vectors) == sorted(expected)
    for uri, vector in collection_vectors.items():
      np.testing.assert_array_equal(vector, expected[uri])
    query = loaded.uris[0]
    found = neighbours_command.main(['--collection', imported, '--query', query, '--k', '3'])
    assert f'query: {query} (embedded)' in capsys.readouterr().out
    units = loaded.vectors / np.linalg.norm(loaded.vectors, axis=1, keepdims=True)
    cosines = np.delete(units @ units[0], 0)
    np.testing.assert_allclose([n.score for n in found], np.sort(cosines)[::-1][:3], atol=1e-6)

  rows = duckdb.sql(f"SELECT uri, embedding FROM '{tmp_path}/parquet16/embeddings-*.parquet'"
                    ).fetchall()
  assert len(rows) == len(expected)
  for uri, vector in rows:
    np.testing.assert_array_equal(np.asarray(vector, np.float32), expected[uri])
  # The TensorFlow recipe of docs/output-format.md: the bytes feature, decoded as float16.
  spec = {'image/uri': tf.io.FixedLenFeature([], tf.string),
          'embedding/float16': tf.io.FixedLenFeature([], tf.string)}
  files = tf.io.gfile.glob(f'{tmp_path}/tfrecord16/embeddings-*.tfrecord*')
  decoded = 0
  for record in tf.data.TFRecordDataset(files, compression_type='GZIP'):
    example = tf.io.parse_single_example(record, spec)
    vector = tf.cast(tf.io.decode_raw(example['embedding/float16'], tf.float16), tf.float32)
    np.testing.assert_array_equal(vector.numpy(), expected[example['image/uri'].numpy().decode()])
    decoded += 1
  assert decoded == len(expected)


def test_float16_examples_decode_to_the_half_floats_written():
  """The TFRecord float16 layout alone: 1.0, 2.0, -0.5 and 65504 as little-endian half floats."""
  from tfx_bsl.coders.example_coder import (ExamplesToRecordBatchDecoder,
                                            RecordBatchToExamplesEncoder)
  from run_format import example_vectors
  from transforms.embed import Embedding
  from transforms.provenance import Provenance
  from transforms.write import embeddings_to_record_batch
  vectors = np.array([[1.0, 2.0, -0.5, 65504.0], [0.1, 0.2, 0.3, 1e-3]], np.float32)
  batch = embeddings_to_record_batch(
      [Embedding(f'u{i}', '0' * 64, 1, 1, 1, None, 'm', v) for i, v in enumerate(vectors)],
      Provenance('m', 'w', 'r', 'v'), 'float16')
  assert 'embedding' not in batch.schema.names
  assert batch.column('embedding/float16')[0].as_py() == [b'\x00\x3c\x00\x40\x00\xb8\xff\x7b']
  decoded = ExamplesToRecordBatchDecoder().DecodeBatch(RecordBatchToExamplesEncoder().encode(batch))
  values, sizes = example_vectors(decoded)
  assert sizes.to_pylist() == [4, 4]
  np.testing.assert_array_equal(values.to_numpy().reshape(2, 4),
                                vectors.astype(np.float16))


def test_an_unknown_embedding_dtype_is_refused_before_any_work(tmp_path):
  with pytest.raises(OptionsError, match="--embedding_dtype: invalid choice: 'float64'"):
    _sample_run(tmp_path, 'out', '--embedding_dtype=float64')
  assert not (tmp_path / 'out').exists()


def test_shards_with_optional_embedding_elements_read_as_the_required_ones(tmp_path):
  """Parquet shards of earlier builds (the embedding a list of optional floats) read and search
  exactly as the ones written now (required floats)."""
  written = rows([f'gs://b/{i}.jpg' for i in range(40)], 24, seed=5)
  write_run(str(tmp_path / 'now'), written, output_format='parquet', shard_rows=16)
  shutil.copytree(tmp_path / 'now', tmp_path / 'before')
  for path in (tmp_path / 'before').glob('embeddings-*.parquet'):
    table = pq.read_table(path)
    where = table.schema.get_field_index('embedding')
    assert not table.schema.field(where).type.value_field.nullable
    table = table.set_column(where, 'embedding',
                             table.column(where).cast(pa.list_(pa.float32(), 24)))
    pq.write_table(table, path)
    assert pq.read_schema(path).field('embedding').type.value_field.nullable
  now = embeddings.load_run(str(tmp_path / 'now'))
  before = embeddings.load_run(str(tmp_path / 'before'))
  assert now.uris == before.uris
  np.testing.assert_array_equal(now.vectors, before.vectors)
  found = [nearest(embeddings.iter_run_shards(str(tmp_path / name)), written[0].embedding, 5)
           for name in ('now', 'before')]
  assert [n.uri for n in found[0]] == [n.uri for n in found[1]]
  assert found[0][0].uri == written[0].uri


def test_every_verb_over_runs_says_to_add_a_glob_to_a_folder_of_runs(tmp_path, capsys):
  parent = tmp_path / 'embeddings'
  write_run(str(parent / 'night1'), rows(['a'], 4, seed=1))
  with pytest.raises(SystemExit) as refused:
    collection_command.main(['import', '--runs', str(parent), '--collection',
                             str(tmp_path / 'collection')])
  assert refused.value.code == 2
  assert capsys.readouterr().err.strip().endswith(
      f'it holds run directories: add /* ("{parent}/*")')
  with pytest.raises(embeddings.NoRunsError, match='no run there') as nothing:
    embeddings.load_run(str(tmp_path / 'nothing'))
  assert 'add /*' not in str(nothing.value)
