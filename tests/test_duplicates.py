"""`pnasnet-embeddings duplicates` over a collection: clustering against all pairs, what the CSV and the summary
say about exact and near copies, checks before any work, and the contact sheet."""

import collections
import csv
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

import embeddings
from benchmarks import synthetic_collection
from benchmarks.synthetic_collection import write_synthetic_run
from commands import duplicates as duplicates_command
from commands.common import parse_size
from embeddings import duplicate_groups, duplicates, sheet
from embeddings.runs import open_snapshot
from embeddings.similarity import unit_rows
from jobs import cluster_dedup
from commands import collection as collection_command
from tests.collection_writer import Row, commit, rows


def _csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _comparable(table):
  """The CSV's groups, each its rows in order, cosines rounded: float32 sums in another order
  differ in the last bits, so two groups of one size and nearly one cosine may be numbered
  either way."""
  groups = collections.defaultdict(list)
  for row in table:
    groups[row['group']].append(tuple(sorted(
        {**row, 'cosine_to_kept': round(float(row['cosine_to_kept']), 4), 'group': ''}.items())))
  return sorted(groups.values())


@pytest.fixture(scope='module')
def planted_runs(tmp_path_factory):
  """A collection imported from two runs of one synthetic collection (64-d, 40 clusters, planted
  near and exact copies): rows 0-2999, and a newer night re-embedding rows 2500-3199."""
  folder = tmp_path_factory.mktemp('planted')
  old = write_synthetic_run(str(folder / 'night1'), 3000, seed=3, dimension=64, clusters=40,
                            shard_rows=700, near_duplicates=60, exact_duplicates=15,
                            finished_at='2026-11-01T00:00:00Z')
  new = write_synthetic_run(str(folder / 'night2'), 700, seed=3, dimension=64, clusters=40,
                            shard_rows=300, near_duplicates=20, first_row=2500,
                            finished_at='2026-11-02T00:00:00Z')
  uri = str(folder / 'collection')
  collection_command.main(['import', '--runs', str(folder / 'night*'), '--collection', uri])
  return uri, (old.planted, new.planted)


def test_clustering_gives_the_groups_all_pairs_gives(planted_runs, tmp_path, monkeypatch,
                                                     capsys):
  pattern, planted = planted_runs
  monkeypatch.setattr(cluster_dedup, 'RANGE_BYTES', 64 << 10)  # several ranges of clusters
  threshold = '0.97'
  exact = duplicates_command.main(['--collection', pattern, '--csv', str(tmp_path / 'all.csv'),
                                   '--threshold', threshold])
  assert 'all pairs' in capsys.readouterr().out  # 3200 64-d vectors fit the default budget
  clustered = duplicates_command.main(['--collection', pattern, '--csv',
                                       str(tmp_path / 'clusters.csv'), '--threshold', threshold,
                                       '--memory_budget', '100KB'])
  assert ', clusters:' in capsys.readouterr().out  # auto: over the budget
  assert _comparable(_csv(tmp_path / 'clusters.csv')) == _comparable(_csv(tmp_path / 'all.csv'))
  assert [g.kind for g in clustered] == [g.kind for g in exact]
  grouped = {m.uri: number for number, g in enumerate(clustered) for m in g.members}
  replaced = {synthetic_collection.uri_of(row) for row in range(2500, 3200)}
  kept_whole = [p for night, pairs in enumerate(planted) for p in pairs
                if night == 1 or not {p.original, p.duplicate} & replaced]
  assert len(kept_whole) > 60
  assert all(grouped.get(p.original, -1) == grouped.get(p.duplicate, -2) for p in kept_whole)


def test_auto_takes_clustering_where_it_is_faster_though_all_pairs_fits():
  """At 100,000 4320-d images all pairs fits 4GB but took 375 s against clustering's 97 s; the
  estimates follow benchmarks/bench_duplicates.py's times at 10,000 and 20,000 (26.11)."""
  budget = parse_size('4GB')
  assert duplicates.all_pairs_bytes(100_000, 4320) <= budget
  assert duplicates.choose_method('auto', 100_000, 4320, budget) == 'clusters'
  assert duplicates.choose_method('auto', 10_000, 4320, budget) == 'all_pairs'  # 28.5 s, 90.3 s
  assert duplicates.choose_method('auto', 20_000, 4320, budget) == 'clusters'  # 128.9 s, 99.1 s
  assert 10_000 < duplicates.all_pairs_faster_below(4320) < 20_000
  assert duplicates.choose_method('auto', 5_000, 4320, parse_size('100MB')) == (
      'clusters')  # memory first
  assert duplicates.choose_method('all_pairs', 100_000, 4320, budget) == 'all_pairs'


def test_the_visits_reach_every_cell_a_near_pair_can_straddle():
  """Two clusters and near pairs planted across the boundary between them: each pair meets in
  a cluster one of its rows visits; rows far from the boundary stay at home."""
  rng = np.random.default_rng(5)
  centres = np.eye(16, dtype=np.float32)[:2] * 3 + 1
  inside = np.concatenate([c + rng.normal(0, 0.2, (300, 16)) for c in centres])
  middle = (centres[0] + centres[1]) / 2 + rng.normal(0, 0.05, (40, 16))
  units = unit_rows(np.concatenate([inside, middle, middle + rng.normal(
      0, 0.01, (40, 16))]).astype(np.float32))
  centroids = cluster_dedup.centroids_of(unit_rows(centres))
  threshold = 0.999
  clusters, visited, capped = cluster_dedup.visits(units, centroids, np.sqrt(2 - 2 * threshold))
  home = clusters[:, 0]
  pairs = [(i, j) for i, j in duplicate_groups.similar_pairs(units, threshold) if i >= 600]
  assert len(pairs) >= 40 and any(home[i] != home[j] for i, j in pairs)
  assert all(home[j] in clusters[i][visited[i]] or home[i] in clusters[j][visited[j]]
             for i, j in pairs)
  assert visited[:600].sum() < 1.1 * 600 and capped == 0


def test_missing_csv_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
  commit(str(tmp_path / 'c'), rows(['a', 'b'], 8, seed=1), '/runs/1')
  monkeypatch.setattr(duplicates_command, 'open_snapshot',
                      lambda *_: pytest.fail('opened the collection first'))
  with pytest.raises(SystemExit) as exit_info:
    duplicates_command.main(['--collection', str(tmp_path / 'c'), '--csv',
                             str(tmp_path / 'missing/x.csv')])
  assert exit_info.value.code == 2
  assert f'the folder {tmp_path / "missing"} does not exist' in capsys.readouterr().err


@pytest.mark.parametrize('threshold', ['2', '0', '-1'])
def test_a_threshold_that_is_no_cosine_is_refused(tmp_path, capsys, threshold):
  commit(str(tmp_path / 'c'), rows(['a', 'b'], 8, seed=1), '/runs/1')
  with pytest.raises(SystemExit) as exit_info:
    duplicates_command.main(['--collection', str(tmp_path / 'c'), '--csv', str(tmp_path / 'x.csv'),
                             '--threshold', threshold])
  assert exit_info.value.code == 2
  assert 'above 0 and at most 1' in capsys.readouterr().err
  assert not (tmp_path / 'x.csv').exists()


def test_byte_identical_copies_beside_a_near_duplicate_are_exact(tmp_path, capsys):
  """The kept image is a larger PNG; two identical JPEGs of it are exact copies of each other."""
  rng = np.random.default_rng(2)
  photo = rng.random(32).astype(np.float32)
  jpeg = hashlib.sha256(b'photo.jpg').hexdigest()
  commit(str(tmp_path / 'c'), [
      Row('photos/photo.png', photo, hashlib.sha256(b'photo.png').hexdigest(), 400, 600, 900000),
      Row('photos/photo.jpg', photo * 0.999 + 0.001, jpeg, 200, 300, 40000),
      Row('backup/photo.jpg', photo * 0.999 + 0.001, jpeg, 200, 300, 40000),
      Row('other.jpg', rng.random(32).astype(np.float32), hashlib.sha256(b'o').hexdigest())],
         '/runs/1')
  groups = duplicates_command.main(['--collection', str(tmp_path / 'c'), '--csv',
                                    str(tmp_path / 'x.csv'), '--threshold', '0.99'])
  table = {row['uri']: row for row in _csv(tmp_path / 'x.csv')}
  assert [(r['role'], r['kind']) for r in table.values()] == [
      ('keep', 'near'), ('duplicate', 'exact'), ('duplicate', 'exact')]
  assert list(table) == ['photos/photo.png', 'backup/photo.jpg', 'photos/photo.jpg']
  assert table['photos/photo.jpg']['same_bytes_as'] == 'backup/photo.jpg'
  assert table['backup/photo.jpg']['same_bytes_as'] == ''
  assert [r['same_bytes_as_kept'] for r in table.values()] == ['1', '0', '0']
  assert groups[0].kind == 'mixed'
  printed = capsys.readouterr().out
  assert '1 groups' not in printed and 'exact copies only: 0' in printed
  assert 'to drop: 2 (byte-identical copies: 1, near duplicates: 1)' in printed


def _png16(path):
  """A 16-bit grey gradient PNG: values up to 65535, which an 8-bit conversion clips to white."""
  values = np.linspace(0, 65535, 64 * 96).reshape(64, 96).astype(np.uint16)
  Image.fromarray(values).save(path)
  return path


def test_a_sixteen_bit_png_thumbnail_shows_its_picture(tmp_path):
  thumbnail = np.asarray(sheet.thumbnail(open(_png16(tmp_path / 'deep.png'), 'rb').read()))
  assert thumbnail.min() < 10 and thumbnail.max() > 245  # black to white, not blank white
  assert abs(float(thumbnail.mean()) - 127.5) < 5


def _label_pixels(text):
  tile = sheet.Tile(None, ['', text])
  image = sheet.draw_sheet([[tile]], 1)
  top = sheet.PADDING + sheet.THUMBNAIL + 4 + sheet.LINE_HEIGHT
  return np.asarray(image.convert('L'))[top:top + sheet.LINE_HEIGHT]


def test_non_ascii_names_are_drawn_with_their_letters():
  box = _label_pixels('\U0010fffd')  # no font has it: drawn as the font's missing-glyph box
  letters = {c for name in ('été_Ωμέγα.jpg', 'Москва.png', 'Tiếng_Việt.jpg') for c in name
             if not c.isascii()}
  assert [c for c in sorted(letters) if np.array_equal(_label_pixels(c), box)] == []


def test_sheet_rows_say_how_many_more_and_keep_the_folder(tmp_path):
  """A group larger than a row, of files all named inside.png in different folders."""
  vector = np.ones(8, np.float32)
  members = []
  for number in range(duplicates.SHEET_MEMBERS + 3):
    folder = tmp_path / f'album{number}'
    folder.mkdir()
    members.append(Row(str(_png16(folder / 'inside.png')), vector + number * 1e-4,
                       hashlib.sha256(bytes([number])).hexdigest()))
  commit(str(tmp_path / 'c'), members, '/runs/1')
  groups = duplicate_groups.find_groups(embeddings.load(str(tmp_path / 'c')), threshold=0.99)
  [row] = duplicates.sheet_tiles(groups)
  assert len(row) == duplicates.SHEET_MEMBERS
  assert row[-1].lines[-1] == '+3 more in the CSV'
  names = [tile.lines[2] for tile in row]
  assert len(set(names)) == len(names) and all(n.endswith('/inside.png') for n in names)
  assert all(tile.image is not None and np.asarray(tile.image).min() < 10 for tile in row)
  png = io.BytesIO()
  duplicates.draw(groups).save(png, format='PNG')
  assert Image.open(png).size == (duplicates.SHEET_MEMBERS * sheet.CELL_WIDTH, sheet.CELL_HEIGHT)


def test_sheet_labels_keep_their_words_and_shorten_only_file_names(tmp_path):
  """`group 1 (exact): same bytes as img_001.jpg` was cut in its middle to fit a tile (26.9)."""
  vector, other = np.eye(8, dtype=np.float32)[:2]
  long_name = 'holiday_in_the_mountains_with_the_whole_family_2026_img_001.jpg'
  sha256 = hashlib.sha256(b'same').hexdigest()
  commit(str(tmp_path / 'c'), [
      Row('photos/img_001.jpg', vector, sha256, 400, 600, 900),
      Row('backup/img_001.jpg', vector, sha256, 400, 600, 900),
      Row(f'photos/{long_name}', other, hashlib.sha256(b'long').hexdigest(), 500, 600, 900),
      Row('backup/copy.jpg', other, hashlib.sha256(b'long').hexdigest(), 400, 600, 900)],
         '/runs/1')
  groups = duplicate_groups.find_groups(embeddings.load(str(tmp_path / 'c')), threshold=0.99)
  font = sheet._font()
  drawn = [sheet.fitted_lines(tile, font) for row in duplicates.sheet_tiles(groups) for tile in row]
  assert all(font.getlength(line) <= sheet.THUMBNAIL for lines in drawn for line in lines)
  roles = {lines[1] for lines in drawn}
  assert {lines[0] for lines in drawn} == {'group 1 (exact)', 'group 2 (exact)'}
  assert 'keep' in roles and 'same bytes as img_001.jpg' in roles
  [shortened] = [r for r in roles if r.startswith('same bytes as …')]
  assert '…' in shortened and shortened.endswith('001.jpg')


def test_clustering_on_a_remote_runner_needs_a_temp_location(tmp_path, capsys):
  commit(str(tmp_path / 'c'), rows(['a', 'b'], 8, seed=1), '/runs/1')
  with pytest.raises(SystemExit) as exit_info:
    duplicates_command.main(['--collection', str(tmp_path / 'c'), '--csv', str(tmp_path / 'x.csv'),
                             '--method', 'clusters', '--runner', 'DataflowRunner'])
  assert exit_info.value.code == 2
  assert 'needs --temp_location' in capsys.readouterr().err


def test_clustering_removes_its_work_files_under_the_temp_location_and_nothing_else(
    planted_runs, tmp_path):
  """The sample, spill and group files go under --temp_location (where Dataflow's workers share
  them) and are deleted afterwards; a file already there is left alone."""
  pattern, _ = planted_runs
  work = tmp_path / 'tmp'
  work.mkdir()
  (work / 'someone-elses.txt').write_text('keep me')
  groups = duplicates_command.main(['--collection', pattern, '--csv',
                                    str(tmp_path / 'clusters.csv'), '--threshold', '0.97',
                                    '--method', 'clusters', '--temp_location', str(work)])
  assert groups
  left = sorted(str(p.relative_to(work)) for p in work.rglob('*') if p.is_file())
  assert left == ['someone-elses.txt']
  assert (work / 'someone-elses.txt').read_text() == 'keep me'


def test_a_mistyped_flag_is_refused_before_the_work(tmp_path, capsys):
  """Flags the command does not know go to Beam, which would drop a typo silently."""
  with pytest.raises(SystemExit) as exit_info:
    duplicates_command.main(['--collection', str(tmp_path / 'c'), '--csv', str(tmp_path / 'x.csv'),
                             '--metod', 'clusters'])
  assert exit_info.value.code == 2
  assert 'unknown flag --metod; did you mean --method?' in capsys.readouterr().err
  assert not (tmp_path / 'x.csv').exists()


def test_the_pieces_of_fragments_with_deleted_rows_read_every_row_once(tmp_path):
  """Clustering's workers read a snapshot in pieces (offsets among a fragment's live rows)."""
  uri = str(tmp_path / 'c')
  commit(uri, rows([f'/u/{i:03d}' for i in range(100)], 4, seed=1), '/runs/1')
  commit(uri, rows([f'/u/{i:03d}' for i in range(10, 30)], 4, seed=2), '/runs/2',
         gone=['/u/050', '/u/051'])
  snapshot = open_snapshot(uri)
  pieces = cluster_dedup.pieces(snapshot, 16)
  assert [(p.offset, p.rows) for p in pieces if p.fragment_id == pieces[0].fragment_id] == [
      (0, 16), (16, 16), (32, 16), (48, 16), (64, 14)]  # 100 rows, 22 replaced or gone
  read = [cluster_dedup.read_rows(piece, ()) for piece in pieces]
  uris = [u for rows_read in read for u in rows_read.uris]
  loaded = embeddings.load(uri)
  assert sorted(uris) == sorted(loaded.uris) and len(uris) == 98
  units = {u: v for rows_read in read for u, v in zip(rows_read.uris, rows_read.units)}
  np.testing.assert_allclose(units['/u/020'], unit_rows(loaded.vectors)[loaded.uris.index(
      '/u/020')], rtol=1e-6)
