"""Near duplicates of collections too large for all pairs: k-means clusters, exact cosine inside.

The Beam job of `pnasnet-embeddings duplicates --method clusters` (the DirectRunner on one
machine, Dataflow for 100M vectors):

  1. the collection's snapshot is read in pieces (a range of rows of one fragment, one worker
     each); a seeded sample of a piece's unit vectors is written to a file (float16);
  2. k-means centroids are trained on the sample files (FAISS), on one worker;
  3. each vector gets a home, its nearest centroid, and visits every other centroid within
     reach of it (below); the rows are spilled, one Parquet file per shard, a row group per
     range of clusters (the shuffle, kept on disk so that memory holds one range at a time),
     and the piece's (sha256, uri) pairs go on;
  4. per range of clusters, every vector that visits a cluster is compared (cosine) with the
     vectors at home there: pairs near or above the threshold are candidates;
  5. candidates and byte copies (same SHA-256) are joined (connected components); the members'
     rows are read again, and inside each component all pairs are compared on the float32
     vectors, as --method all_pairs does: the groups are the ones all pairs would find among
     the pairs the clusters compared.

Reach. SemDeDup and NeMo Curator compare a vector only inside its nearest cluster, so a pair
that a cluster boundary splits is never seen. Here a vector a also visits other clusters: for
unit vectors with cosine >= t, |a - b| <= r = sqrt(2 - 2t), and b lies in the cell of its nearest
centroid c_j (it is nearer c_j than a's own centroid c_i), so a pair can straddle cells i and j
only if a is within r of the plane halfway between c_i and c_j:
(|a - c_j|^2 - |a - c_i|^2) / (2 |c_i - c_j|) <= r. A vector visits the cells within that reach,
nearest plane first, at most MAX_VISITS (home included). When all its cells within reach are
visited, no pair of it is missed whatever the clustering; the others (`capped`, reported) visit
the nearest planes' cells, where a near pair that straddles a boundary almost always is. In 4320-d
features most vectors have more cells within reach than 3, and the benchmark
(benchmarks/bench_duplicates.py) measures what that loses.

Cost: with k clusters of about n/k homes and v visits per vector, compares v n^2 / k pairs
(all pairs: n^2 / 2) plus n k distances to centroids; k = sqrt(n) balances the two.
"""

import functools
import hashlib
import io
import json
import math
import uuid
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsList, AsSingleton, TaggedOutput

import storage
from collection import Collection, open_collection
from embeddings.duplicate_groups import Candidate, Group, Member, components, grouped, sort_groups
from embeddings.shards import embedding_block
from embeddings.similarity import unit_rows
from jobs import work_folder
from pipeline.runners import default_runner
from run_format import EMBEDDING

MAX_CLUSTERS = 4096  # k-means is trained on one worker: 40 x 4096 sample rows
SAMPLE_PER_CLUSTER = 40  # FAISS wants at least 39 training rows per centroid
KMEANS_ITERATIONS = 20
MAX_VISITS = 3  # clusters a vector is compared in, at most (its home included)
CANDIDATES = 64  # nearest centroids looked at for the visits
RANGE_BYTES = 256 << 20  # spilled vectors scored at once, about
REACH_SLACK = 1e-4  # float32 distances to centroids are not exact
# Spilled unit vectors are float16 (half the disk): a cosine from them is within 2^-10 of the
# float32 one (relative rounding 2^-11 per factor, Cauchy-Schwarz), so pairs this much below
# the threshold are candidates, decided on float32 vectors once the candidates are grouped.
FLOAT16_MARGIN = 2e-3
PIECE_ROWS = 16_384  # rows a worker reads at once: 280 MB of float32 at 4320-d
ROW_COLUMNS = ['uri', 'sha256', 'width', 'height', 'size_bytes', EMBEDDING]


class Piece(NamedTuple):
  """Rows `offset` to `offset + rows` of one fragment of one snapshot: what a worker reads."""
  collection: str
  version: int
  fragment_id: int
  offset: int
  rows: int

  @property
  def name(self) -> str:
    return f'{self.fragment_id}-{self.offset}'


def pieces(snapshot: Collection, piece_rows: int = PIECE_ROWS) -> List[Piece]:
  """The snapshot's fragments cut into pieces (from the manifest and deletion files only)."""
  found = []
  for fragment in snapshot.dataset.get_fragments():
    count = fragment.count_rows()
    found += [Piece(snapshot.uri, snapshot.version, fragment.fragment_id, offset,
                    min(piece_rows, count - offset)) for offset in range(0, count, piece_rows)]
  return found


@functools.lru_cache(maxsize=4)
def _snapshot(uri: str, version: int, options: Tuple[Tuple[str, str], ...]) -> Collection:
  """One opened snapshot per worker process, whatever the pieces it reads."""
  return open_collection(uri, version, dict(options))


class ShardRows(NamedTuple):
  """One piece's rows, vectors scaled to length 1."""
  path: str
  uris: List[str]
  units: np.ndarray  # float32 [rows, dimension]
  sha256: List[Optional[str]]
  width: List[Optional[int]]
  height: List[Optional[int]]
  size_bytes: List[Optional[int]]

  def candidate(self, row: int) -> Candidate:
    return Candidate(self.uris[row], self.units[row], self.sha256[row], self.width[row],
                     self.height[row], self.size_bytes[row])


class Plan(NamedTuple):
  """The sizes the pipeline works with, decided from the row count before it starts."""
  rows: int
  clusters: int
  sample_rows: int
  ranges: int  # clusters are scored in this many ranges (cluster % ranges)
  threshold: float
  radius: float  # distance between unit vectors at the threshold: sqrt(2 - 2 threshold)
  seed: int
  max_visits: int  # clusters a vector is compared in, at most (its home included)


class Stats(NamedTuple):
  clusters: int
  rows: int
  visits: int  # cluster visits, homes included
  capped: int  # vectors with more cells within reach than they visit

  def __str__(self) -> str:
    return (f'{self.clusters} clusters, {self.visits / max(self.rows, 1):.2f} visits a vector; '
            f'{self.rows - self.capped} of {self.rows} vectors visited every cell within reach '
            f'of the threshold (for them, every pair is found)')


def plan(rows: int, dimension: int, threshold: float, seed: int = 0,
         max_visits: int = MAX_VISITS) -> Plan:
  clusters = max(1, min(MAX_CLUSTERS, round(math.sqrt(rows))))
  ranges = max(1, math.ceil(rows * max_visits * dimension * 2 / RANGE_BYTES))
  return Plan(rows, clusters, min(rows, SAMPLE_PER_CLUSTER * clusters), min(ranges, clusters),
              threshold, math.sqrt(max(0.0, 2 - 2 * threshold)), seed, max_visits)


class Centroids(NamedTuple):
  vectors: np.ndarray  # float32 [clusters, dimension]
  between: np.ndarray  # float32 [clusters, clusters]: their distances to each other


def centroids_of(vectors: np.ndarray) -> Centroids:
  squared = np.einsum('ij,ij->i', vectors, vectors)
  between = squared[:, None] + squared[None, :] - 2 * (vectors @ vectors.T)
  return Centroids(vectors, np.sqrt(np.maximum(between, 0)).astype(np.float32))


def train_centroids(sample: np.ndarray, clusters: int, seed: int) -> Centroids:
  import faiss
  clusters = min(clusters, len(sample))
  kmeans = faiss.Kmeans(sample.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed,
                        verbose=False, max_points_per_centroid=len(sample))
  kmeans.train(np.ascontiguousarray(sample, np.float32))
  return centroids_of(kmeans.centroids)


def visits(units: np.ndarray, centroids: Centroids, radius: float,
           max_visits: int = MAX_VISITS) -> Tuple[np.ndarray, np.ndarray, int]:
  """(clusters [rows, max_visits], home first, then by distance to their cell; the mask of
  those visited; how many rows had more cells within `radius` than they visit)."""
  import faiss
  index = faiss.IndexFlatL2(centroids.vectors.shape[1])
  index.add(centroids.vectors)
  count = len(centroids.vectors)
  nearest = min(CANDIDATES, count)
  squared, clusters = index.search(np.ascontiguousarray(units), nearest)
  squared = np.maximum(squared, 0)
  between = centroids.between[clusters[:, :1], clusters]  # [rows, nearest]
  # Some point within `radius` of the row lies in cluster j's cell only if the row is within
  # `radius` of the plane halfway between its home centroid and centroid j.
  to_cell = (squared - squared[:, :1]) / np.maximum(2 * between, 1e-12)
  to_cell[:, 0] = -1  # home
  order = np.argsort(to_cell, axis=1, kind='stable')[:, :max_visits]
  within = to_cell <= radius + REACH_SLACK
  # The candidates' list is cut too: a centroid beyond it is within reach only if the last
  # candidate is no farther than the home one plus twice the radius (triangle inequality).
  unsure = np.sqrt(squared[:, -1]) - np.sqrt(squared[:, 0]) <= 2 * radius + REACH_SLACK
  capped = int(((within.sum(axis=1) > max_visits) | (unsure & (nearest < count))).sum())
  return (np.take_along_axis(clusters, order, axis=1),
          np.take_along_axis(within, order, axis=1), capped)


def _sampled(uris: Sequence[str], fraction: float, seed: int) -> np.ndarray:
  """A seeded choice of rows that does not depend on the shard layout."""
  keep = [int.from_bytes(hashlib.blake2b(f'{seed}:{u}'.encode(), digest_size=8).digest(), 'big')
          < fraction * 2**64 for u in uris]
  return np.array(keep, dtype=bool)


def read_rows(piece: Piece, options: Tuple[Tuple[str, str], ...]) -> ShardRows:
  """The piece's rows, vectors scaled to length 1; `options`: the store's (collection's
  storage_options, as pairs)."""
  fragment = _snapshot(piece.collection, piece.version, options).dataset.get_fragment(
      piece.fragment_id)
  table = fragment.to_table(columns=ROW_COLUMNS, offset=piece.offset, limit=piece.rows)
  return ShardRows(piece.name, table.column('uri').to_pylist(),
                   unit_rows(embedding_block(table.column(EMBEDDING), piece.collection)),
                   table.column('sha256').to_pylist(), table.column('width').to_pylist(),
                   table.column('height').to_pylist(), table.column('size_bytes').to_pylist())


def write_sample(piece: Piece, options, run_plan: Plan, directory: str) -> Iterator[str]:
  """Piece -> the path of a file holding a seeded sample of its unit vectors (float16). The
  sample goes to the trainer as files: as Beam elements its 0.7 GB at 1M vectors (2.8 GB at
  MAX_CLUSTERS) were copied by every coder and buffer of the runner on the way, in one process
  (7.5 GB peak RSS at 1M)."""
  rows = read_rows(piece, options)
  fraction = min(1.0, 1.1 * run_plan.sample_rows / max(run_plan.rows, 1))
  sample = rows.units[_sampled(rows.uris, fraction, run_plan.seed)].astype(np.float16)
  if not len(sample):
    return
  # Named by its piece: the trainer's order (and a retried write) does not depend on the runner.
  path = storage.join(directory, f'sample-{piece.name}.npy')
  with storage.create(path) as f:
    np.save(f, sample)
  yield path


def _kmeans(sample_files: List[str], run_plan: Plan) -> Centroids:
  """Centroids trained on the sample files in name order, read into one float32 array (no
  second copy of the sample)."""
  parts = []
  for path in sorted(sample_files):
    with storage.open_file(path) as f:
      parts.append(np.load(io.BytesIO(f.read())))
  sample = np.empty((min(run_plan.sample_rows, sum(len(p) for p in parts)), parts[0].shape[1]),
                    np.float32)
  filled = 0
  for part in parts:
    part = part[:len(sample) - filled]
    sample[filled:filled + len(part)] = part
    filled += len(part)
  del parts
  return train_centroids(sample, run_plan.clusters, run_plan.seed)


def _count(name: str, value: int) -> None:
  Metrics.counter('duplicates', name).inc(value)


DIGESTS = 'digests'  # spill's second output: (sha256, uri) of each row that has a digest


def spill(piece: Piece, options, centroids: Centroids, run_plan: Plan, directory: str):
  """Piece -> the spill file's path: each row once per cluster it visits, ordered by
  range of clusters, one row group per range (listed in the file's metadata); and on DIGESTS
  the rows' (sha256, uri). Reads the piece itself: a stage waiting for a side input holds its
  whole main input, so that must be pieces, not rows."""
  rows = read_rows(piece, options)
  for digest, uri in zip(rows.sha256, rows.uris):
    if digest:
      yield TaggedOutput(DIGESTS, (digest, uri))
  clusters, within, capped = visits(rows.units, centroids, run_plan.radius,
                                    run_plan.max_visits)
  row_numbers = np.nonzero(within)[0].astype(np.int32)
  cluster = clusters[within].astype(np.int32)
  home = np.zeros(within.shape, bool)
  home[:, 0] = True
  home = home[within]
  order = np.lexsort((cluster, cluster % run_plan.ranges))
  row_numbers, cluster, home = row_numbers[order], cluster[order], home[order]
  _count('rows', len(rows.uris))
  _count('visits', len(cluster))
  _count('capped', capped)
  dimension = rows.units.shape[1]
  units = rows.units.astype(np.float16)[row_numbers]
  table = pa.table({
      'cluster': cluster, 'home': home,
      'uri': [rows.uris[i] for i in row_numbers.tolist()],
      'unit': pa.FixedSizeBinaryArray.from_buffers(
          pa.binary(dimension * 2), len(units), [None, pa.py_buffer(units)])})
  ranges = cluster % run_plan.ranges
  bounds = np.searchsorted(ranges, np.arange(run_plan.ranges + 1))
  groups = {}
  path = storage.join(directory, f'spill-{uuid.uuid4().hex}.parquet')
  with storage.create(path) as f, pq.ParquetWriter(
      f, table.schema, compression='none', use_dictionary=['uri'],
      write_statistics=False) as writer:
    for number in range(run_plan.ranges):
      if bounds[number + 1] > bounds[number]:
        groups[str(number)] = len(groups)
        writer.write_table(table.slice(bounds[number], bounds[number + 1] - bounds[number]),
                           row_group_size=1 << 30)
    writer.add_key_value_metadata({'ranges': json.dumps(groups)})
  yield path


def _spill_range(path: str, number: int) -> Optional[pa.Table]:
  with storage.open_file(path) as f:
    parquet = pq.ParquetFile(f)
    groups = json.loads(parquet.metadata.metadata[b'ranges'])
    if str(number) not in groups:
      return None
    return parquet.read_row_group(groups[str(number)])


def score_range(number: int, spills: Sequence[str], threshold: float
                ) -> Iterator[Tuple[str, str]]:
  """A range number -> candidate (uri, uri) pairs in its clusters (FLOAT16_MARGIN below the
  threshold, from the float16 spill)."""
  tables = [t for t in (_spill_range(p, number) for p in spills) if t is not None]
  if not tables:
    return
  table = pa.concat_tables(tables)
  cluster = table.column('cluster').to_numpy()
  home = table.column('home').to_numpy(zero_copy_only=False)
  uris = table.column('uri').to_pylist()
  unit = table.column('unit').combine_chunks()
  units = np.frombuffer(unit.buffers()[1], np.float16, offset=unit.offset * unit.type.byte_width,
                        count=len(unit) * unit.type.byte_width // 2).reshape(len(unit), -1)
  del table, tables
  order = np.argsort(cluster, kind='stable')
  starts = np.flatnonzero(np.r_[True, np.diff(cluster[order]) != 0])
  pairs = 0
  for begin, end in zip(starts, np.r_[starts[1:], len(order)]):
    members = order[begin:end]
    homes = members[home[members]]
    if len(members) < 2 or not len(homes):
      continue
    home_ids = [uris[i] for i in homes]
    at_home = frozenset(home_ids)
    scores = units[members].astype(np.float32) @ units[homes].astype(np.float32).T
    rows, columns = np.nonzero(scores >= threshold - FLOAT16_MARGIN)
    for row, column in zip(rows.tolist(), columns.tolist()):
      visitor, resident = uris[members[row]], home_ids[column]
      # A pair of two homes is found twice: keep one; a visitor meets each home once here.
      if visitor != resident and (visitor not in at_home or visitor < resident):
        pairs += 1
        yield visitor, resident
  _count('pairs', pairs)


def _byte_copy_pairs(keyed: Tuple[str, Iterable[str]]) -> Iterator[Tuple[str, str]]:
  _, uris = keyed
  uris = sorted(set(uris))
  for other in uris[1:]:
    yield uris[0], other


def _membership(pairs: List[Tuple[str, str]]) -> Dict[str, int]:
  """URI -> component number, for every URI in a pair (one worker: pairs are few)."""
  names = sorted({u for pair in pairs for u in pair})
  number = {u: i for i, u in enumerate(names)}
  found = components(len(names), ((number[a], number[b]) for a, b in pairs))
  return {names[i]: component for component, members in enumerate(found) for i in members}


def _members(piece: Piece, options, membership: Dict[str, int]
             ) -> Iterator[Tuple[int, Candidate]]:
  rows = read_rows(piece, options)
  for row, uri in enumerate(rows.uris):
    if uri in membership:
      yield membership[uri], rows.candidate(row)


def _groups_json(keyed, threshold: float) -> Iterator[str]:
  """A component of candidate pairs -> its groups by exact float32 cosines, as JSON lines."""
  _, members = keyed
  members = sorted(members, key=lambda c: c.uri)
  units = np.stack([m.unit for m in members])
  for group in grouped(units, [m.sha256 for m in members], threshold, members.__getitem__):
    yield json.dumps({'kind': group.kind, 'members': [m._asdict() for m in group.members]})


def build(root, snapshot: Collection, run_plan: Plan, work_directory: str,
          piece_rows: int = PIECE_ROWS):
  """The pipeline on `root` (a Pipeline) -> the groups (duplicate_groups.Group) as JSON lines.
  Reads the snapshot's pieces three times (sample, spill, members), so that no stage holds more
  than a piece or a range of clusters; vectors cross stages as files in `work_directory` only."""
  options = tuple(sorted(snapshot.storage_options.items()))
  parts = (root | 'Pieces' >> beam.Create(pieces(snapshot, piece_rows))
           | 'Spread' >> beam.Reshuffle())
  centroids = (parts
               | 'Sample' >> beam.FlatMap(write_sample, options, run_plan, work_directory)
               | 'AllSamples' >> beam.combiners.ToList()
               | 'KMeans' >> beam.Map(_kmeans, run_plan))
  spilled = parts | 'Spill' >> beam.FlatMap(spill, options, AsSingleton(centroids), run_plan,
                                             work_directory).with_outputs(DIGESTS, main='spills')
  near = (root
          | 'Ranges' >> beam.Create(list(range(run_plan.ranges)))
          | 'Score' >> beam.FlatMap(score_range, AsList(spilled.spills), run_plan.threshold))
  same_bytes = (spilled[DIGESTS]
                | 'ByDigest' >> beam.GroupByKey()
                | 'BytePairs' >> beam.FlatMap(_byte_copy_pairs))
  membership = ((near, same_bytes) | 'Pairs' >> beam.Flatten()
                | 'AllPairs' >> beam.combiners.ToList()
                | 'Components' >> beam.Map(_membership))
  return (parts
          | 'Members' >> beam.FlatMap(_members, options, AsSingleton(membership))
          | 'ByComponent' >> beam.GroupByKey()
          | 'Groups' >> beam.FlatMap(_groups_json, run_plan.threshold))


WorkDirectoryError = work_folder.WorkDirectoryError


def _counter(result, name: str) -> int:
  return work_folder.counter(result, name, 'duplicates')


def check_options(beam_flags: Sequence[str]) -> None:
  work_folder.check_options(beam_flags, 'the sample and spill files')


def find_groups(snapshot: Collection, threshold: float, beam_flags: Sequence[str] = (),
                seed: int = 0, max_visits: int = MAX_VISITS, piece_rows: int = PIECE_ROWS
                ) -> Tuple[List[Group], Stats]:
  """Groups of two or more, largest first, as duplicate_groups.find_groups gives, by clustering
  one snapshot of a collection."""
  run_plan = plan(max(snapshot.num_rows, 1), snapshot.feature_size or 1, threshold, seed,
                  max_visits)
  options = PipelineOptions(list(beam_flags))
  directory, local = work_folder.work_directory(options, 'duplicates')
  try:
    pipeline = beam.Pipeline(runner=default_runner(options), options=options)
    _ = (build(pipeline, snapshot, run_plan, directory, piece_rows)
         | 'WriteGroups' >> beam.io.WriteToText(storage.join(directory, 'groups'),
                                                file_name_suffix='.jsonl'))
    result = pipeline.run()
    result.wait_until_finish()
    groups = []
    for info in storage.match(storage.join(directory, 'groups*.jsonl')):
      for line in storage.read_bytes(info.path).decode().splitlines():
        record = json.loads(line)
        groups.append(Group(record['kind'], [Member(**m) for m in record['members']]))
    stats = Stats(run_plan.clusters, _counter(result, 'rows'), _counter(result, 'visits'),
                  _counter(result, 'capped'))
  finally:
    work_folder.remove(directory, local)
  return sort_groups(groups), stats
