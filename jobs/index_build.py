"""The Beam jobs behind `python -m embeddings.index`: sample, train, encode on workers, merge.

With several runs, a first pipeline decides which rows the index holds, by the collection's rule
(embeddings/collection.py, as `embeddings.load` applies it) over the runs' indexes, grouped by URI
on workers (jobs/collection_sources.py); it writes each shard's kept rows as a file beside the
pieces and counts them, so that no one process holds the collection's URIs. Then:

    shards ─ SampleForTraining ─ Train (one worker: PCA, then on a second, PCA-reduced sample
       │                           when the plan has one, IVF + PQ) ─┐ trained index
       └──────────── EncodeShard (every worker: the rows the collection keeps, as codes in
                     inverted lists, float16 vectors, metadata, and the probes' exact neighbours
                     in the shard) ─ piece files, one set per shard
    then this process streams the pieces, shard by shard, into the index directory.

Workers never hold more than one shard. The merge holds one piece's metadata and vectors at a
time: the IVF lists are merged on disk (FAISS OnDiskInvertedLists.merge_from_multiple over the
pieces' memory-mapped lists), `ids.arrow` and the refine store are written as they come (in
shard order, which is id order), the URI and SHA-256 lookup files are sorted a key range at a
time (_LookupWriter), and the probes keep their 50 best neighbours. An HNSW index is
built in this process (it is chosen only when it fits the memory budget).
"""

import io
import logging
import os
import shutil
from typing import Dict, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import storage
from embeddings import faiss_util, neighbour_index
from storage.run_dirs import MixedModelsError, Run, find_runs
from embeddings.shards import read_shard
from embeddings.similarity import unit_rows
from jobs import work_folder
from jobs.collection_sources import CollectionSources, LocateInShards, warn_of_gaps
from jobs.shard_refs import ShardRef, shard_refs
from pipeline.runners import default_runner
from run_format import utc_now

_LOG = logging.getLogger(__name__)
PIECES_DIR = '.pieces'
METRICS_NAMESPACE = 'index'
TRAINING_ITERATIONS = 10
PQ_POINTS_PER_CENTROID = 64
DEFAULT_RECALL_DROP = 0.05  # recall@10 below the build's by more than this: rebuild
IMBALANCE_GROWTH = 2.0  # lists this much more imbalanced than at build: rebuild
# Added runs' probes this much farther from their lists than the build's probes: rebuild. At 1M
# 4320-d vectors (2026-12-07), samples of 100 from a night of the same collection gave 0.96-1.07
# times the build's; another collection's 3.0.
QUANTIZATION_ERROR_GROWTH = 1.2
RESIDUAL_TABLES_MAX = 256_000_000  # bytes
HNSW_ADD_ROWS = 20_000  # vectors read from the refine store at a time when rebuilding HNSW
LOOKUP_BUCKETS = 256  # key ranges of a lookup file, each sorted alone (1/256 of the rows)
LOOKUP_BUFFER_ROWS = 1 << 20  # keys held before they are appended to their buckets' files


def with_kept_files(refs: Sequence[ShardRef], pieces: str) -> List[ShardRef]:
  """The refs, each naming the file its kept rows are written to (write_kept_files)."""
  return [ref._replace(kept_file=storage.join(pieces, f'kept-{position:06d}.npy'))
          for position, ref in enumerate(refs)]


def kept_rows(ref: ShardRef) -> np.ndarray:
  """The shard's rows the collection keeps, ascending (the ref must name its kept file)."""
  return np.load(io.BytesIO(storage.read_bytes(ref.kept_file)))


class _WriteKeptRows(beam.DoFn):
  """((run, shard number), {'ref': [ShardRef], 'rows': [kept rows]}) -> the ref's kept file,
  written for every shard (empty when the collection keeps none of its rows)."""

  def process(self, keyed):
    _, parts = keyed
    ref, = parts['ref']
    rows = np.sort(np.fromiter(parts['rows'], np.int64))
    buffer = io.BytesIO()
    np.save(buffer, rows)
    _put(ref.kept_file, buffer.getvalue())
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'kept').inc(len(rows))


def write_kept_files(runs: Sequence[Run], refs: Sequence[ShardRef],
                     beam_flags: Sequence[str]) -> int:
  """Writes the kept file of each ref (every shard of `runs`, newest first, as shard_refs
  listed them) by the collection's rule over the runs; returns the rows kept."""
  shard_paths: Dict[str, List[str]] = {run.path: [] for run in runs}
  local = {}
  for ref in refs:
    local[(ref.run, len(shard_paths[ref.run]))] = ref
    shard_paths[ref.run].append(ref.path)
  options = PipelineOptions(list(beam_flags))
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  rows = ((pipeline | 'Sources' >> CollectionSources(runs)).kept
          | 'SourceKeys' >> beam.Keys()
          | 'Locate' >> LocateInShards(shard_paths, every_row=True))
  shards = pipeline | 'ShardRefs' >> beam.Create(sorted(local.items()))
  _ = ({'ref': shards, 'rows': rows}
       | 'ByShard' >> beam.CoGroupByKey()
       | 'WriteKeptRows' >> beam.ParDo(_WriteKeptRows()))
  result = pipeline.run()
  result.wait_until_finish()
  warn_of_gaps(result)
  return work_folder.counter(result, 'kept', METRICS_NAMESPACE, required=True)


def _kept_mask(ref: ShardRef, rows: int) -> np.ndarray:
  if ref.kept_file is None:
    return np.ones(rows, bool)
  keep = np.zeros(rows, bool)
  keep[kept_rows(ref)] = True
  return keep


def _ids(ref: ShardRef, rows: np.ndarray) -> np.ndarray:
  return neighbour_index.shard_id_base(ref.number) + np.asarray(rows, np.int64)


class _SampleShard(beam.DoFn):
  """About `fraction` of a shard's kept rows as unit vectors (PCA-reduced when given a PCA),
  written to a file whose path is the output: a sample of 4320-d vectors is hundreds of MB, which
  as Beam elements would be copied by every coder and consumer on the way to the trainer."""

  def __init__(self, fraction: float, seed: int, samples: str):
    self._fraction = fraction
    self._seed = seed
    self._samples = samples

  def process(self, ref: ShardRef, pca_bytes: Optional[bytes] = None):
    rows, vectors = faiss_util.sample_rows(ref.path, self._fraction, self._seed + ref.number)
    if len(rows) and ref.kept_file is not None:
      keep = np.isin(rows, kept_rows(ref))
      rows, vectors = rows[keep], vectors[keep]
    if not len(rows):
      return
    vectors = unit_rows(vectors)
    if pca_bytes is not None:
      wrapper = faiss_util.from_bytes(pca_bytes)  # owns the PCA: alive while it is applied
      vectors = wrapper.chain.at(0).apply(vectors)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'sampled').inc(len(rows))
    path = storage.join(self._samples, f'sample-{self._seed}-{ref.number:06d}.npz')
    _put(path, _npz({'ids': _ids(ref, rows), 'vectors': vectors}))
    yield path


def _concatenate(sample_files: List[str]) -> tuple:
  """(ids, vectors) of the sample files, in shard order whatever the runner."""
  parts = [np.load(io.BytesIO(storage.read_bytes(path))) for path in sorted(sample_files)]
  return (np.concatenate([part['ids'] for part in parts]),
          np.concatenate([part['vectors'] for part in parts]))


def _split_probes(samples: List[str], seed: int) -> tuple:
  """(probes {'ids', 'vectors'}, training vectors): the probes are held back from training;
  PROBES of them, or a tenth of the sample when it is smaller than 1,000."""
  ids, vectors = _concatenate(samples)
  order = np.random.default_rng(seed).permutation(len(ids))
  probes = order[:min(neighbour_index.PROBES, len(ids) // 10)]
  train = np.sort(order[len(probes):])
  return {'ids': ids[probes], 'vectors': vectors[probes]}, vectors[train]


def _train_pca(samples: List[str], plan: neighbour_index.IndexPlan, dimension: int,
               seed: int) -> bytes:
  faiss = faiss_util.faiss()
  _, train = _split_probes(samples, seed)
  pca = faiss.PCAMatrix(dimension, plan.pca_dimension, 0, True)  # then a random rotation
  pca.train(np.ascontiguousarray(train[:neighbour_index.PCA_SAMPLE]))
  return faiss_util.to_bytes(faiss.IndexPreTransform(_projection_only(pca),
                                                     faiss.IndexFlatL2(plan.pca_dimension)))


def _projection_only(pca):
  """The trained PCA's projection (A, b) alone: a PCAMatrix also stores the full eigenvector
  matrix training needed, dimension^2 floats (75 MB at 4320-d, 75 bytes a vector at 1M)."""
  faiss = faiss_util.faiss()
  projection = faiss.LinearTransform(pca.d_in, pca.d_out, True)
  faiss.copy_array_to_vector(faiss.vector_to_array(pca.A), projection.A)
  faiss.copy_array_to_vector(faiss.vector_to_array(pca.b), projection.b)
  projection.is_trained = True
  return projection


def _train(samples: List[str], reduced: Optional[List[str]], pca_bytes: Optional[bytes],
           plan: neighbour_index.IndexPlan, dimension: int, seed: int) -> bytes:
  """The trained, empty index; trained on the reduced sample when the plan has a PCA. HNSW
  needs no training."""
  # The PCA lives in `wrapper`, which this function holds until the index is serialized.
  wrapper = faiss_util.from_bytes(pca_bytes) if pca_bytes is not None else None
  pca = wrapper.chain.at(0) if wrapper is not None else None
  index = neighbour_index.new_index(plan, dimension, pca)
  if plan.kind == 'hnsw':
    return faiss_util.to_bytes(index)
  probes, train = _split_probes(samples, seed)
  _quick_training(index)
  if pca is not None:
    reduced_ids, train = _concatenate(reduced)
    train = train[~np.isin(reduced_ids, probes['ids'])]
    faiss_util.faiss().downcast_index(index.index).train(
        np.ascontiguousarray(train[:plan.train_sample]))
    index.is_trained = True
  else:
    index.train(np.ascontiguousarray(train[:plan.train_sample]))
  return faiss_util.to_bytes(index)


def _quick_training(index) -> None:
  """Ten k-means iterations for the lists and for each PQ sub-quantizer (FAISS's defaults, 25
  on up to 65k points, take minutes per sub-quantizer count at 1M for no measurable recall);
  no polysemous training (index_factory's default: 30 s for PQ8 on 10k 32-d vectors, for codes
  this index never compares with each other). Codes of the residuals from the list centroid
  (better codes) only while FAISS's precomputed tables for them, lists x m x 256 floats, stay
  under RESIDUAL_TABLES_MAX (they would be 1 GB for the 1M plan): else codes of the vectors,
  one distance table a query, the candidates being re-ranked from the refine store anyway."""
  faiss = faiss_util.faiss()
  ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
  ivf.cp.niter = TRAINING_ITERATIONS
  if isinstance(ivf, faiss.IndexIVFPQ):
    ivf.pq.cp.niter = TRAINING_ITERATIONS
    ivf.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    ivf.do_polysemous_training = False
    ivf.by_residual = ivf.nlist * ivf.pq.M * ivf.pq.ksub * 4 <= RESIDUAL_TABLES_MAX


class _EncodeShard(beam.DoFn):
  """The rows of a shard the collection keeps: their codes in inverted lists (IVF plans), their
  unit vectors in float16, their metadata, and the probes' exact neighbours among them, as piece
  files (so nothing larger than a shard travels through the runner)."""

  def __init__(self, pieces: str, kind: str):
    self._pieces = pieces
    self._kind = kind

  def process(self, ref: ShardRef, trained: bytes, probes: Dict[str, np.ndarray]):
    if not hasattr(self, '_trained'):
      self._trained = trained
      self._probe_vectors = unit_rows(probes['vectors'])
    shard = read_shard(ref.path, ref.run)
    keep = _kept_mask(ref, len(shard.uris))
    rows = np.flatnonzero(keep)
    vectors = unit_rows(shard.vectors[keep])
    ids = _ids(ref, rows)
    lists = b''
    if self._kind != 'hnsw':
      piece = faiss_util.from_bytes(self._trained)  # empty: this shard's lists alone
      ivf = neighbour_index.ivf_of(piece)
      if len(ids):
        ivf.add_sa_codes(piece.sa_encode(np.ascontiguousarray(vectors)), ids)
      lists = _lists_bytes(ivf.invlists)
    scores = self._probe_vectors @ vectors.T
    scores[probes['ids'][:, None] == ids[None, :]] = -np.inf
    keep_best = min(neighbour_index.PROBE_NEIGHBOURS, len(ids))
    top = np.argpartition(-scores, keep_best - 1, axis=1)[:, :keep_best] if keep_best else (
        np.zeros((len(scores), 0), np.int64))
    metadata = shard.metadata.filter(pa.array(keep)).append_column(
        'id', pa.array(ids)).append_column(
            'shard', pa.array([ref.path] * len(ids), pa.string())).append_column(
                'row', pa.array(rows, pa.int64()))
    write_piece(self._pieces, ref.number, lists, vectors.astype(np.float16), ids[top],
                np.take_along_axis(scores, top, 1), metadata)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'encoded').inc(len(ids))
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'superseded').inc(int((~keep).sum()))
    yield ref.number


def _lists_bytes(lists) -> bytes:
  faiss = faiss_util.faiss()
  writer = faiss.VectorIOWriter()
  faiss.write_InvertedLists(lists, writer)
  return faiss.vector_to_array(writer.data).tobytes()


def _piece_name(pieces: str, number: int, suffix: str) -> str:
  return storage.join(pieces, f'piece-{number:06d}{suffix}')


def write_piece(pieces: str, number: int, lists: bytes, vectors, probe_ids, probe_scores,
                metadata: pa.Table) -> None:
  _put(_piece_name(pieces, number, '.npz'), _npz({
      'vectors': vectors, 'probe_ids': probe_ids, 'probe_scores': probe_scores}))
  if lists:
    _put(_piece_name(pieces, number, '.lists'), lists)
  sink = pa.BufferOutputStream()
  pq.write_table(metadata, sink)
  _put(_piece_name(pieces, number, '.parquet'), sink.getvalue().to_pybytes())


def read_piece(pieces: str, number: int) -> tuple:
  arrays = np.load(io.BytesIO(storage.read_bytes(_piece_name(pieces, number, '.npz'))))
  metadata = pq.read_table(pa.BufferReader(storage.read_bytes(
      _piece_name(pieces, number, '.parquet'))))
  return dict(arrays), metadata


def _run_pipeline(refs: List[ShardRef], pieces: str, beam_flags: Sequence[str], kind: str,
                  train: Optional[dict] = None, trained: Optional[bytes] = None,
                  probes: Optional[dict] = None) -> tuple:
  """Runs the pipeline; returns (trained index bytes, probes) (for `add`: the ones given)."""
  options = PipelineOptions(list(beam_flags))
  with beam.Pipeline(runner=default_runner(options), options=options) as pipeline:
    shards = pipeline | 'Shards' >> beam.Create(refs) | 'Spread' >> beam.Reshuffle()
    if train is not None:
      plan, dimension, seed = train['plan'], train['dimension'], train['seed']
      samples = (shards
                 | 'SampleForTraining' >> beam.ParDo(_SampleShard(train['fraction'], seed,
                                                                 pieces))
                 | 'Sample' >> beam.combiners.ToList())
      if plan.pca_dimension:
        pca = samples | 'TrainPCA' >> beam.Map(_train_pca, plan, dimension, seed)
        reduced = (shards
                   | 'SampleReduced' >> beam.ParDo(_SampleShard(train['reduced_fraction'],
                                                                seed + 1, pieces),
                                                   beam.pvalue.AsSingleton(pca))
                   | 'Reduced' >> beam.combiners.ToList())
        trained_index = samples | 'Train' >> beam.Map(
            _train, beam.pvalue.AsSingleton(reduced), beam.pvalue.AsSingleton(pca), plan,
            dimension, seed)
      else:
        trained_index = samples | 'Train' >> beam.Map(_train, None, None, plan, dimension, seed)
      probe_set = samples | 'Probes' >> beam.Map(lambda s: _split_probes(s, seed)[0])
      _ = trained_index | 'KeepTrained' >> beam.Map(
          lambda data: _put(storage.join(pieces, neighbour_index.TRAINED_FILE), data))
      _ = probe_set | 'KeepProbes' >> beam.Map(lambda p: _put(
          storage.join(pieces, neighbour_index.PROBES_FILE), _npz(p)))
      trained_side = beam.pvalue.AsSingleton(trained_index)
      probes_side = beam.pvalue.AsSingleton(probe_set)
    else:
      trained_side = beam.pvalue.AsSingleton(pipeline | 'Trained' >> beam.Create([trained]))
      probes_side = beam.pvalue.AsSingleton(pipeline | 'ProbeSet' >> beam.Create([probes]))
    _ = shards | 'EncodeShard' >> beam.ParDo(_EncodeShard(pieces, kind), trained_side,
                                             probes_side)
  if train is None:
    return trained, probes
  return (storage.read_bytes(storage.join(pieces, neighbour_index.TRAINED_FILE)),
          dict(np.load(io.BytesIO(storage.read_bytes(
              storage.join(pieces, neighbour_index.PROBES_FILE))))))


def _npz(arrays: dict) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _put(path: str, data: bytes) -> None:
  with FileSystems.create(path) as f:
    f.write(data)


def _set_total(index, total: int) -> None:
  """After lists were put in the IVF inside: every wrapper's count follows."""
  faiss = faiss_util.faiss()
  while True:
    index = faiss.downcast_index(index)
    index.ntotal = total
    if not isinstance(index, faiss.IndexPreTransform):
      return
    index = index.index


class _BestNeighbours:
  """The probes' PROBE_NEIGHBOURS best exact neighbours, as pieces come."""

  def __init__(self, ids: np.ndarray, scores: np.ndarray):
    self.ids, self.scores = ids, scores

  def offer(self, ids: np.ndarray, scores: np.ndarray) -> None:
    found = np.concatenate([self.ids, ids], axis=1)
    scores = np.concatenate([self.scores, scores], axis=1)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :neighbour_index.PROBE_NEIGHBOURS]
    self.scores = np.take_along_axis(scores, order, 1)
    self.ids = np.where(np.isfinite(self.scores), np.take_along_axis(found, order, 1), -1)

  def drop(self, removed: np.ndarray) -> None:
    gone = np.isin(self.ids, removed)
    self.scores = np.where(gone, -np.inf, self.scores)
    self.offer(np.zeros((len(self.ids), 0), np.int64), np.zeros((len(self.ids), 0), np.float32))


class _LookupWriter:
  """One column's lookup file (neighbour_index.open_lookup) written with bounded memory: each
  value's key and ids-table row are appended, by the key's top byte, to one of LOOKUP_BUCKETS
  bucket files as rows come; at the end each bucket is sorted alone into its place in the file
  (the buckets are key ranges in order, so the file is sorted whole)."""

  def __init__(self, directory: str, column: str):
    self.column = column
    self._buckets = os.path.join(directory, f'.lookup-{column}')
    shutil.rmtree(self._buckets, ignore_errors=True)  # an interrupted build's
    os.makedirs(self._buckets)
    self._keys: List[np.ndarray] = []  # buffered, as arrays: 16 bytes a value
    self._rows: List[np.ndarray] = []
    self._buffered = 0
    self.count = 0

  def add(self, values: list, first_row: int) -> None:
    """`values`: the column of ids-table rows first_row, first_row + 1, ... (None: no key)."""
    present = [offset for offset, value in enumerate(values) if value is not None]
    self._keys.append(np.fromiter((neighbour_index.lookup_key(values[offset])
                                   for offset in present), np.uint64, len(present)))
    self._rows.append(first_row + np.array(present, np.int64))
    self._buffered += len(present)
    if self._buffered >= LOOKUP_BUFFER_ROWS:
      self._spill()

  def _bucket(self, number: int) -> str:
    return os.path.join(self._buckets, f'{number:03d}')

  def _spill(self) -> None:
    keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.uint64)
    rows = np.concatenate(self._rows) if self._rows else np.zeros(0, np.int64)
    self._keys, self._rows, self._buffered = [], [], 0
    buckets = (keys >> np.uint64(56)).astype(np.int64)
    order = np.argsort(buckets, kind='stable')
    bounds = np.searchsorted(buckets[order], np.arange(LOOKUP_BUCKETS + 1))
    for number in np.flatnonzero(np.diff(bounds)):
      mine = order[bounds[number]:bounds[number + 1]]
      with open(self._bucket(number), 'ab') as f:
        f.write(np.stack([keys[mine], rows[mine].view(np.uint64)], axis=1).tobytes())
    self.count += len(keys)

  def finish(self, path: str) -> None:
    """Writes the sorted keys, then their rows, to `path`."""
    self._spill()
    with open(path, 'wb') as f:
      f.truncate(16 * self.count)
    if self.count:
      both = np.memmap(path, np.uint64, 'r+', shape=(2 * self.count,))
      start = 0
      for number in range(LOOKUP_BUCKETS):
        if not os.path.exists(self._bucket(number)):
          continue
        pairs = np.fromfile(self._bucket(number), np.uint64).reshape(-1, 2)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # by key, then row: the first row first
        both[start:start + len(pairs)] = pairs[order, 0]
        both[self.count + start:self.count + start + len(pairs)] = pairs[order, 1]
        start += len(pairs)
      both.flush()
      del both
    shutil.rmtree(self._buckets)


class _Directory:
  """The files of an index directory being written: each under a temporary name, renamed when
  all are complete (a reader never sees half an index); the refine store is appended to. The ids
  table is written in id order in record batches of IDS_BATCH_ROWS rows, its ids and refine-store
  rows beside it as raw int64 files (what a reader memory-maps to find a result's row)."""

  def __init__(self, directory: str, dimension: int, ids_schema: Optional[pa.Schema] = None):
    """`ids_schema`: the existing ids table's, to append to the refine store (`add`); None
    for a new index, whose refine store starts empty."""
    os.makedirs(directory, exist_ok=True)
    self.directory = directory
    self.dimension = dimension
    self._ids_writer = None
    self._ids_schema = ids_schema
    self._pending: List[pa.Table] = []  # ids rows not yet a full record batch
    self._last_id = -1
    self._ids_written = 0
    self._lookups = [_LookupWriter(directory, column)
                     for column in neighbour_index.LOOKUP_COLUMNS]
    self._faiss_ids = open(self.temporary(neighbour_index.FAISS_IDS_FILE), 'wb')
    self._vector_rows_file = open(self.temporary(neighbour_index.VECTOR_ROWS_FILE), 'wb')
    path = os.path.join(directory, neighbour_index.VECTORS_FILE)
    if ids_schema is None or not os.path.exists(path):
      open(path, 'wb').close()
    self._vectors = open(path, 'r+b')
    self.vector_rows = os.path.getsize(path) // (2 * dimension)  # a torn tail is overwritten
    self._vectors.seek(self.vector_rows * 2 * dimension)

  def temporary(self, name: str) -> str:
    return os.path.join(self.directory, name + '.tmp')

  def write_ids(self, table: pa.Table) -> None:
    """Appends rows to the ids table; their ids must follow the rows written before."""
    ids = table.column('id').to_numpy()
    if len(ids) and (ids[0] <= self._last_id or np.any(np.diff(ids) <= 0)):
      raise neighbour_index.IndexDirectoryError('ids table rows out of id order')
    if self._ids_writer is None:
      self._ids_schema = self._ids_schema or table.schema
      self._ids_writer = pa.ipc.new_file(self.temporary(neighbour_index.IDS_FILE),
                                         self._ids_schema)
    self._last_id = ids[-1] if len(ids) else self._last_id
    self._faiss_ids.write(np.ascontiguousarray(ids, np.int64).tobytes())
    self._vector_rows_file.write(np.ascontiguousarray(
        table.column('vector_row').to_numpy(), np.int64).tobytes())
    for lookup in self._lookups:
      lookup.add(table.column(lookup.column).to_pylist(), self._ids_written)
    self._ids_written += table.num_rows
    self._pending.append(table.select(self._ids_schema.names).cast(self._ids_schema))
    self._write_batches(final=False)

  def _write_batches(self, final: bool) -> None:
    pending = pa.concat_tables(self._pending) if self._pending else None
    if pending is None:
      return
    whole = pending.num_rows if final else (
        pending.num_rows // neighbour_index.IDS_BATCH_ROWS * neighbour_index.IDS_BATCH_ROWS)
    if whole:  # one chunk: write_table cuts batches at chunk boundaries too
      self._ids_writer.write_table(pending.slice(0, whole).combine_chunks(),
                                   max_chunksize=neighbour_index.IDS_BATCH_ROWS)
    self._pending = [pending.slice(whole)] if whole < pending.num_rows else []

  def append_vectors(self, vectors: np.ndarray) -> np.ndarray:
    """Writes float16 rows to the refine store; returns their row numbers."""
    self._vectors.write(np.ascontiguousarray(vectors, np.float16).tobytes())
    rows = np.arange(self.vector_rows, self.vector_rows + len(vectors), dtype=np.int64)
    self.vector_rows += len(vectors)
    return rows

  def refine_vectors(self, ids: np.ndarray) -> np.ndarray:
    """The unit vectors of ids written so far, from the refine store (to choose nprobe)."""
    for f in (self._vectors, self._faiss_ids, self._vector_rows_file):
      f.flush()
    faiss_ids = neighbour_index.open_int64(self.temporary(neighbour_index.FAISS_IDS_FILE))
    rows = neighbour_index.open_int64(self.temporary(neighbour_index.VECTOR_ROWS_FILE))
    stored = neighbour_index.open_vectors(self.directory, self.dimension)
    return neighbour_index.gather_rows(stored, rows[np.searchsorted(faiss_ids, ids)])

  def finish(self, index, trained: bytes, probes: dict, description: dict) -> None:
    faiss = faiss_util.faiss()
    self._vectors.truncate()
    self._vectors.close()
    self._faiss_ids.close()
    self._vector_rows_file.close()
    if self._ids_writer is None:
      raise neighbour_index.IndexDirectoryError('the runs hold no vector the collection keeps')
    self._write_batches(final=True)
    self._ids_writer.close()
    lists = neighbour_index.ivf_lists(index)
    if lists is not None:  # the lists' file is referred to by its final name
      lists.filename = os.path.join(self.directory, neighbour_index.IVFDATA_FILE)
    faiss.write_index(index, self.temporary(neighbour_index.FAISS_FILE))
    with open(self.temporary(neighbour_index.TRAINED_FILE), 'wb') as f:
      f.write(trained)
    with open(self.temporary(neighbour_index.PROBES_FILE), 'wb') as f:
      f.write(_npz(probes))
    lookup_names = [neighbour_index.lookup_file(lookup.column) for lookup in self._lookups]
    for lookup, name in zip(self._lookups, lookup_names):
      lookup.finish(self.temporary(name))
    names = [neighbour_index.IDS_FILE, neighbour_index.FAISS_IDS_FILE,
             neighbour_index.VECTOR_ROWS_FILE, *lookup_names, neighbour_index.TRAINED_FILE,
             neighbour_index.PROBES_FILE, neighbour_index.FAISS_FILE]
    if lists is not None:
      names.insert(0, neighbour_index.IVFDATA_FILE)
    for name in names:
      os.replace(self.temporary(name), os.path.join(self.directory, name))
    neighbour_index.write_json(os.path.join(self.directory, neighbour_index.INDEX_FILE),
                               description)


def _local_lists(pieces: str, number: int, local: str) -> Optional[str]:
  """The piece's lists file on the local disk (copied there when the pieces are remote)."""
  path = _piece_name(pieces, number, '.lists')
  if not storage.is_remote(pieces):
    return path if os.path.exists(path) else None
  if not FileSystems.exists(path):
    return None
  os.makedirs(local, exist_ok=True)
  copy = os.path.join(local, os.path.basename(path))
  with FileSystems.open(path) as source, open(copy, 'wb') as target:
    shutil.copyfileobj(source, target)
  return copy


def _merge_lists(index, sources: list, directory: _Directory) -> int:
  """The IVF lists of `sources` (InvertedLists) merged on disk into the index's new lists file;
  returns the vectors merged."""
  faiss = faiss_util.faiss()
  ivf = neighbour_index.ivf_of(index)
  merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size,
                                     directory.temporary(neighbour_index.IVFDATA_FILE))
  pointers = faiss.InvertedListsPtrVector()
  for lists in sources:
    pointers.push_back(lists)
  with neighbour_index.quiet_stdout():
    total = merged.merge_from_multiple(pointers.data(), pointers.size()) if sources else 0
  ivf.replace_invlists(merged, True)
  merged.this.disown()
  _set_total(index, total)
  return total


def _remove_from_lists(lists, removed: np.ndarray) -> int:
  """Removes the `removed` ids from on-disk lists; returns how many were there. Not FAISS's
  remove_ids: on OnDiskInvertedLists it shrinks a list into a slot at the same offset with its
  ids moved, which garbles them (FAISS 1.15.1); here a list losing entries is emptied, then
  given its kept entries back in a new slot."""
  faiss = faiss_util.faiss()
  removed = np.sort(np.asarray(removed, np.int64))
  count = 0
  for number in range(lists.nlist):
    size = lists.list_size(number)
    if not size:
      continue
    ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
    keep = ~np.isin(ids, removed, assume_unique=False)
    if keep.all():
      continue
    codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).copy()
    codes = np.ascontiguousarray(codes.reshape(size, lists.code_size)[keep])
    ids = np.ascontiguousarray(ids[keep])  # held while FAISS reads them
    count += size - len(ids)
    lists.resize(number, 0)
    if len(ids):
      lists.add_entries(number, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
  return count


def _open_lists(paths: List[str]) -> list:
  faiss = faiss_util.faiss()
  return [faiss.read_InvertedLists(faiss.FileIOReader(path), faiss.IO_FLAG_MMAP)
          for path in paths]


def _merge_pieces(index, pieces: str, refs: List[ShardRef], directory: _Directory,
                  best: List[_BestNeighbours], probe_counts: List[int], kind: str) -> int:
  """Streams the pieces, in shard (= id) order, into the ids table and the refine store, adds
  HNSW vectors as they come; returns the vectors added. `best`: the probe sets' neighbours,
  each set the next probe_counts rows of the pieces' probes."""
  added = 0
  for ref in sorted(refs, key=lambda r: r.number):
    arrays, metadata = read_piece(pieces, ref.number)
    rows = directory.append_vectors(arrays['vectors'])
    if kind == 'hnsw' and len(rows):
      index.add_with_ids(arrays['vectors'].astype(np.float32), metadata.column('id').to_numpy())
    if metadata.num_rows:
      directory.write_ids(metadata.append_column('vector_row', pa.array(rows)))
    added += metadata.num_rows
    start = 0
    for probes, count in zip(best, probe_counts):
      probes.offer(arrays['probe_ids'][start:start + count],
                   arrays['probe_scores'][start:start + count])
      start += count
  return added


def _lists_of_pieces(pieces: str, refs: List[ShardRef], directory: str) -> list:
  local = os.path.join(directory, PIECES_DIR + '-lists')
  paths = [p for p in (_local_lists(pieces, r.number, local) for r in refs) if p]
  return _open_lists(paths)


def _covered(refs: List[ShardRef], runs: Sequence[Run]) -> List[dict]:
  covered = []
  for run in runs:
    numbers = [r.number for r in refs if r.run == run.path]
    covered.append(neighbour_index.Covered(run.path, run.finished_at.isoformat(),
                                           min(numbers) if numbers else -1,
                                           len(numbers))._asdict())
  return covered


def _pieces_location(directory: str, beam_flags: Sequence[str]) -> str:
  """Where workers write their pieces: beside the index for local runners, else under the
  pipeline's --temp_location (which every worker can reach)."""
  temp = PipelineOptions(list(beam_flags)).get_all_options().get('temp_location')
  if temp and storage.is_remote(temp):
    return storage.join(temp, f'embeddings-index-pieces-{os.getpid()}')
  return os.path.join(directory, PIECES_DIR)


def _remove_pieces(pieces: str, directory: str) -> None:
  if storage.is_remote(pieces):
    matched = [m.path for r in FileSystems.match([storage.join(pieces, '*')])
               for m in r.metadata_list]
    if matched:
      FileSystems.delete(matched)
  else:
    shutil.rmtree(pieces, ignore_errors=True)
  shutil.rmtree(os.path.join(directory, PIECES_DIR + '-lists'), ignore_errors=True)


def _no_neighbours(count: int) -> _BestNeighbours:
  return _BestNeighbours(np.zeros((count, 0), np.int64), np.zeros((count, 0), np.float32))


def _health(index, plan: dict, probe_file: dict) -> dict:
  return {'probe_recall_at_10': neighbour_index.probe_recall(index, probe_file, plan,
                                                             plan['nprobe']),
          'list_imbalance': neighbour_index.list_imbalance(index)}


def build_index(runs: Sequence[Run], directory: str, memory_budget: int, seed: int,
                beam_flags: Sequence[str],
                recall_target: float = neighbour_index.DEFAULT_RECALL_TARGET) -> dict:
  """Builds a new index over `runs` (one model, newest first) into `directory`; a PQ plan's
  nprobe is the smallest reaching `recall_target` on the probes with re-rank."""
  dimension = runs[0].embedding_size
  refs = shard_refs(runs)
  pieces = _pieces_location(directory, beam_flags)
  if len(runs) > 1:
    refs = with_kept_files(refs, pieces)
    count = write_kept_files(runs, refs, beam_flags)
  else:
    count = runs[0].summary.embedded
  plan = neighbour_index.choose_plan(count, dimension, memory_budget)
  _LOG.info('index plan for %d vectors: %s', count, plan)
  first_sample = neighbour_index.PCA_SAMPLE if plan.pca_dimension else plan.train_sample
  first_sample = max(first_sample, 20 * neighbour_index.PROBES)  # probes: a tenth at most
  train = {'plan': plan, 'dimension': dimension, 'seed': seed,
           'fraction': min(1.0, (first_sample + neighbour_index.PROBES) * 1.2 / max(count, 1)),
           'reduced_fraction': min(1.0, plan.train_sample * 1.2 / max(count, 1))}
  trained, probes = _run_pipeline(refs, pieces, beam_flags, plan.kind, train=train)
  index = faiss_util.from_bytes(trained)
  output = _Directory(directory, dimension)
  best = _no_neighbours(len(probes['ids']))
  _merge_pieces(index, pieces, refs, output, [best], [len(probes['ids'])], plan.kind)
  if plan.kind != 'hnsw':
    sources = _lists_of_pieces(pieces, refs, directory)
    _merge_lists(index, sources, output)
    del sources
  probe_file = {'ids': probes['ids'], 'vectors': probes['vectors'], 'exact_ids': best.ids,
                'exact_scores': best.scores}
  curve = None
  if plan.kind == 'ivf_pq':
    nprobe, curve = neighbour_index.nprobe_curve(index, probe_file, plan.to_json(),
                                                 output.refine_vectors, recall_target)
    plan = plan._replace(nprobe=nprobe)
    _LOG.info('nprobe %d: %s', nprobe, curve)
  health = _health(index, plan.to_json(), probe_file)
  if plan.kind == 'ivf_pq':  # what `add` compares the added runs' probes with
    health['probe_quantization_error'] = neighbour_index.quantization_error(
        index, probe_file['vectors'])
  description = {
      'format_version': neighbour_index.FORMAT_VERSION, 'directory': directory,
      'model': runs[0].model, 'embedding_size': dimension, 'metric': 'cosine (L2 on unit rows)',
      'plan': plan.to_json(), 'count': index.ntotal, 'runs': _covered(refs, runs),
      'next_shard': len(refs), 'probes': len(probes['ids']),
      'probe_recall_at_10': health['probe_recall_at_10'],
      'list_imbalance': health['list_imbalance'], 'build': health,
      'built_at': utc_now(), 'faiss_version': faiss_util.faiss().__version__,
      'seed': seed, 'memory_budget': memory_budget, 'recall_target': recall_target,
      'nprobe_curve': curve,
  }
  output.finish(index, trained, probe_file, description)
  _remove_pieces(pieces, directory)
  return description


def _added_run_probes(new: Sequence[Run], refs: List[ShardRef], seed: int) -> dict:
  """Up to PROBES_PER_ADDED_RUN vectors the collection keeps from each added run (a tenth of
  them when fewer than 1,000), drawn uniformly: the kept files say which rows are kept, then
  only the row groups holding the chosen rows are read."""
  rng = np.random.default_rng(seed)
  ids, vectors = [], []
  for run in new:
    candidates = [(ref, kept_rows(ref)) for ref in refs if ref.run == run.path]
    kept = sum(len(rows) for _, rows in candidates)
    chosen = np.sort(rng.permutation(kept)[:min(neighbour_index.PROBES_PER_ADDED_RUN,
                                                kept // 10)])
    start = 0
    for ref, rows in candidates:
      mine = rows[chosen[(chosen >= start) & (chosen < start + len(rows))] - start]
      start += len(rows)
      if len(mine):
        ids.append(_ids(ref, mine))
        vectors.append(unit_rows(faiss_util.read_rows(ref.path, mine)))
  dimension = new[0].embedding_size
  return {'ids': np.concatenate(ids) if ids else np.zeros(0, np.int64),
          'vectors': np.concatenate(vectors) if vectors else np.zeros((0, dimension),
                                                                      np.float32)}


class _OldRows(NamedTuple):
  removed: np.ndarray  # ids the collection no longer keeps
  kept_ids: np.ndarray  # for an HNSW rebuild: the kept ids, and their rows in the refine store
  kept_vector_rows: np.ndarray


class _KeptOfShard:
  """A shard path -> its kept rows, by the kept files of the runs' shards (a shard of a run no
  longer among them keeps none); the last shard's are held, the ids table coming shard by
  shard."""

  def __init__(self, refs: Sequence[ShardRef]):
    self.refs = {ref.path: ref for ref in refs}
    self._path, self._rows = None, None

  def __call__(self, path: str) -> np.ndarray:
    if path != self._path:
      ref = self.refs.get(path)
      self._path, self._rows = path, kept_rows(ref) if ref else np.zeros(0, np.int64)
    return self._rows


def _copy_old_rows(directory: str, kept_of_shard: _KeptOfShard, output: _Directory,
                   hnsw: bool) -> _OldRows:
  """Streams the old ids table into the new one, leaving out the rows the collection no longer
  keeps (each row names its shard and its row there)."""
  table = neighbour_index.open_ids(directory)
  removed, kept_ids, kept_vector_rows = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [
      np.zeros(0, np.int64)]
  for batch in (table.get_batch(b) for b in range(table.num_record_batches)):
    shards = np.array(batch.column('shard').to_pylist(), object)
    rows = batch.column('row').to_numpy()
    keep = np.zeros(batch.num_rows, bool)
    for path in dict.fromkeys(shards):
      here = shards == path
      keep[here] = np.isin(rows[here], kept_of_shard(path))
    ids = batch.column('id').to_numpy()
    removed.append(ids[~keep])
    kept = pa.Table.from_batches([batch]).filter(pa.array(keep))
    if kept.num_rows:
      output.write_ids(kept)
      if hnsw:
        kept_ids.append(ids[keep])
        kept_vector_rows.append(kept.column('vector_row').to_numpy())
  return _OldRows(np.concatenate(removed), np.concatenate(kept_ids),
                  np.concatenate(kept_vector_rows))


def _rebuild_hnsw(index, old: _OldRows, stored: np.ndarray) -> None:
  """Adds the kept old vectors to a new HNSW graph, from the refine store, HNSW_ADD_ROWS at a
  time (HNSW cannot remove a vector)."""
  for start in range(0, len(old.kept_ids), HNSW_ADD_ROWS):
    part = slice(start, start + HNSW_ADD_ROWS)
    index.add_with_ids(np.asarray(stored[old.kept_vector_rows[part]], np.float32),
                       old.kept_ids[part])


def add_runs(directory: str, description: dict, runs: Sequence[Run], recall_drop: float,
             beam_flags: Sequence[str]) -> dict:
  """Adds runs to the index without retraining, following the collection's rule over the old
  and new runs together: a URI a newer run embedded again takes the newer vector, one a newer
  run did not match (deleted) or failed on has none."""
  model = description['model']
  plan = description['plan']
  other = [r for r in runs if r.model != model or r.embedding_size != description[
      'embedding_size']]
  if other:
    raise MixedModelsError(f'the index holds {model} embeddings; these runs hold others: ' +
                           ', '.join(f'{r.path} ({r.model})' for r in other))
  covered = {c['path'] for c in description['runs']}
  new = [r for r in runs if r.path not in covered]
  for run in runs:
    if run.path in covered:
      print(f'{run.path}: already in the index, left as is')
  if not new:
    raise neighbour_index.IndexDirectoryError('no run to add: every run given is already in the index')
  every_run = find_runs(sorted(covered) + [r.path for r in new])
  pieces = _pieces_location(directory, beam_flags)
  every_shard = with_kept_files(shard_refs(every_run), pieces)
  write_kept_files(every_run, every_shard, beam_flags)
  kept_of_shard = _KeptOfShard(every_shard)
  refs = [ref._replace(number=description['next_shard'] + number) for number, ref in enumerate(
      ref for run in new for ref in every_shard if ref.run == run.path)]
  with open(os.path.join(directory, neighbour_index.TRAINED_FILE), 'rb') as f:
    trained = f.read()
  probes = dict(np.load(os.path.join(directory, neighbour_index.PROBES_FILE)))
  added_probes = _added_run_probes(new, refs, description['seed'] + len(description['runs']))
  all_probes = {'ids': np.concatenate([probes['ids'], added_probes['ids']]),
                'vectors': np.concatenate([probes['vectors'],
                                           added_probes['vectors']]).astype(np.float32)}
  _run_pipeline(refs, pieces, beam_flags, plan['kind'], trained=trained, probes=all_probes)
  output = _Directory(directory, description['embedding_size'],
                      neighbour_index.open_ids(directory).schema)
  index = faiss_util.from_bytes(trained)
  old_rows = _copy_old_rows(directory, kept_of_shard, output, plan['kind'] == 'hnsw')
  if plan['kind'] == 'hnsw':
    _rebuild_hnsw(index, old_rows, neighbour_index.open_vectors(
        directory, description['embedding_size']))
  best = _BestNeighbours(probes['exact_ids'], probes['exact_scores'])
  new_best = _no_neighbours(len(added_probes['ids']))
  added = _merge_pieces(index, pieces, refs, output, [best, new_best],
                         [len(probes['ids']), len(added_probes['ids'])], plan['kind'])
  removed = old_rows.removed
  if plan['kind'] != 'hnsw':
    old = neighbour_index.read_index(directory, plan['kind'])
    sources = [neighbour_index.ivf_lists(old)] + _lists_of_pieces(pieces, refs, directory)
    _merge_lists(index, sources, output)
    del sources, old
    if len(removed):
      _set_total(index, neighbour_index.ivf_of(index).ntotal - _remove_from_lists(
          neighbour_index.ivf_lists(index), removed))
  best.drop(removed)
  alive = ~np.isin(probes['ids'], removed)  # a probe whose vector left the collection goes
  probe_file = {'ids': probes['ids'][alive], 'vectors': probes['vectors'][alive],
                'exact_ids': best.ids[alive], 'exact_scores': best.scores[alive]}
  health = _health(index, plan, probe_file)
  added_range = (neighbour_index.shard_id_base(description['next_shard']),
                 neighbour_index.shard_id_base(description['next_shard'] + len(refs)))
  added_recall = neighbour_index.probe_recall(
      index, {'ids': added_probes['ids'], 'vectors': added_probes['vectors'],
              'exact_ids': new_best.ids}, plan, plan['nprobe'], added_range)
  build = description['build']
  reasons = []
  if health['probe_recall_at_10'] < build['probe_recall_at_10'] - recall_drop:
    reasons.append(f'recall@10 on the build\'s probes {health["probe_recall_at_10"]:.3f}, below '
                   f'the build\'s {build["probe_recall_at_10"]:.3f} by more than {recall_drop}')
  added_error = None
  if plan['kind'] == 'ivf_pq' and len(added_probes['ids']):
    added_error = neighbour_index.quantization_error(index, added_probes['vectors'])
    if added_error > QUANTIZATION_ERROR_GROWTH * build['probe_quantization_error']:
      reasons.append(f'the added runs\' probes are {added_error:.3f} from their lists (squared '
                     f'distance), over {QUANTIZATION_ERROR_GROWTH}x the build\'s probes\' '
                     f'{build["probe_quantization_error"]:.3f}: the lists and the PCA were '
                     f'trained on other vectors')
  if health['list_imbalance'] and health['list_imbalance'] > IMBALANCE_GROWTH * build[
      'list_imbalance']:
    reasons.append(f'list imbalance {health["list_imbalance"]:.2f}, over {IMBALANCE_GROWTH}x '
                   f'the build\'s {build["list_imbalance"]:.2f}')
  description = dict(description)
  description.update({
      'directory': directory,  # where it is now (a copy names its own)
      'count': index.ntotal, 'runs': description['runs'] + _covered(refs, new),
      'next_shard': description['next_shard'] + len(refs), 'probes': len(probe_file['ids']),
      'probe_recall_at_10': health['probe_recall_at_10'],
      'list_imbalance': health['list_imbalance'],
      'last_add': {'at': utc_now(), 'runs': [r.path for r in new],
                   'added': added, 'removed': int(len(removed)),
                   'added_probes': len(added_probes['ids']),
                   'added_probe_recall_at_10': added_recall,
                   'added_probe_quantization_error': added_error, 'recall_drop': recall_drop,
                   'rebuild': reasons},
  })
  output.finish(index, trained, probe_file, description)
  _remove_pieces(pieces, directory)
  return description
