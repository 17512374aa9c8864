"""The Beam job behind `python -m embeddings.index`: sample, train, encode on workers, merge.

    shards ─ SampleForTraining ─ Train (one worker: PCA, then on a second, PCA-reduced sample
       │                           when the plan has one, IVF + PQ) ─┐ trained index
       └──────────── EncodeShard (every worker: codes, ids, metadata, the probes' exact
                     neighbours in the shard) ─ one piece file per shard
    then this process merges the pieces, shard by shard, into the index directory.

Workers never hold more than one shard; the pieces (codes and metadata, no vectors) are small
enough to merge on one machine: 72 bytes a vector for the 1M plan plus the ids table.
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

from embeddings import faiss_util, neighbour_index, storage
from embeddings.runs import MixedModelsError, Run
from embeddings.shards import read_shard
from embeddings.similarity import unit_rows

_LOG = logging.getLogger(__name__)
PIECES_DIR = '.pieces'
METRICS_NAMESPACE = 'index'
TRAINING_ITERATIONS = 10
PQ_POINTS_PER_CENTROID = 64


class ShardRef(NamedTuple):
  run: str  # the run directory
  path: str
  number: int  # ids of its rows are number << ROW_BITS | row
  recency: int  # 0: the newest run, which wins a URI held by several


def shard_refs(runs: Sequence[Run], first_number: int = 0) -> List[ShardRef]:
  """Runs newest first (as find_runs gives) -> their shards, numbered from `first_number`."""
  refs = []
  for recency, run in enumerate(runs):
    for path in run.shard_paths():
      refs.append(ShardRef(run.path, path, first_number + len(refs), recency))
  return refs


def _ids(ref: ShardRef, rows: np.ndarray) -> np.ndarray:
  return neighbour_index.shard_id_base(ref.number) + np.asarray(rows, np.int64)


class _SampleShard(beam.DoFn):
  """About `fraction` of a shard's rows as unit vectors (PCA-reduced when given a PCA), written
  to a file whose path is the output: a sample of 4320-d vectors is hundreds of MB, which as
  Beam elements would be copied by every coder and consumer on the way to the trainer."""

  def __init__(self, fraction: float, seed: int, samples: str):
    self._fraction = fraction
    self._seed = seed
    self._samples = samples

  def process(self, ref: ShardRef, pca_bytes: Optional[bytes] = None):
    rows, vectors = faiss_util.sample_rows(ref.path, self._fraction, self._seed + ref.number)
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
  """(probes {'ids', 'vectors'}, training vectors): the probes are held back from training."""
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
  """The trained, empty index; trained on the reduced sample when the plan has a PCA."""
  # The PCA lives in `wrapper`, which this function holds until the index is serialized.
  wrapper = faiss_util.from_bytes(pca_bytes) if pca_bytes is not None else None
  pca = wrapper.chain.at(0) if wrapper is not None else None
  index = neighbour_index.new_index(plan, dimension, pca)
  probes, train = _split_probes(samples, seed)
  if pca is not None:
    reduced_ids, train = _concatenate(reduced)
    train = train[~np.isin(reduced_ids, probes['ids'])]
    _quick_training(index)
    faiss_util.faiss().downcast_index(index.index).train(
        np.ascontiguousarray(train[:plan.train_sample]))
    index.is_trained = True
  else:
    _quick_training(index)
    index.train(np.ascontiguousarray(train[:plan.train_sample]))
  return faiss_util.to_bytes(index)


def _quick_training(index) -> None:
  """Ten k-means iterations for the lists and for each PQ sub-quantizer (FAISS's defaults, 25
  on up to 65k points, take minutes per sub-quantizer count at 1M for no measurable recall)."""
  faiss = faiss_util.faiss()
  ivf = faiss.extract_index_ivf(index)
  ivf.cp.niter = TRAINING_ITERATIONS
  if isinstance(ivf, faiss.IndexIVFPQ):
    ivf.pq.cp.niter = TRAINING_ITERATIONS
    ivf.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID


class _EncodeShard(beam.DoFn):
  """A shard's codes, ids and metadata, and the probes' exact neighbours in it, as a piece file
  (so nothing larger than a shard travels through the runner)."""

  def __init__(self, pieces: str):
    self._pieces = pieces

  def process(self, ref: ShardRef, trained: bytes, probes: Dict[str, np.ndarray]):
    if not hasattr(self, '_index'):
      self._index = faiss_util.from_bytes(trained)
      self._probe_vectors = unit_rows(probes['vectors_full'])
    shard = read_shard(ref.path, ref.run)
    vectors = unit_rows(shard.vectors)
    rows = np.arange(len(vectors))
    ids = _ids(ref, rows)
    codes = self._index.sa_encode(np.ascontiguousarray(vectors))
    scores = self._probe_vectors @ vectors.T
    scores[probes['ids'][:, None] == ids[None, :]] = -np.inf
    keep = min(neighbour_index.PROBE_NEIGHBOURS, len(ids))
    top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep] if keep else np.zeros(
        (len(scores), 0), np.int64)
    metadata = shard.metadata.append_column('id', pa.array(ids)).append_column(
        'shard', pa.array([ref.path] * len(ids), pa.string())).append_column(
            'row', pa.array(rows, pa.int64()))
    write_piece(self._pieces, ref, ids, codes, ids[top], np.take_along_axis(scores, top, 1),
                metadata)
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'encoded').inc(len(ids))
    yield ref.number


def _piece_name(pieces: str, number: int, suffix: str) -> str:
  return storage.join(pieces, f'piece-{number:06d}{suffix}')


def write_piece(pieces: str, ref: ShardRef, ids, codes, probe_ids, probe_scores,
                metadata: pa.Table) -> None:
  arrays = io.BytesIO()
  np.savez(arrays, ids=ids, codes=codes, probe_ids=probe_ids, probe_scores=probe_scores,
           recency=np.array(ref.recency))
  with FileSystems.create(_piece_name(pieces, ref.number, '.npz')) as f:
    f.write(arrays.getvalue())
  sink = pa.BufferOutputStream()
  pq.write_table(metadata, sink)
  with FileSystems.create(_piece_name(pieces, ref.number, '.parquet')) as f:
    f.write(sink.getvalue().to_pybytes())


def read_piece(pieces: str, number: int) -> tuple:
  arrays = np.load(io.BytesIO(storage.read_bytes(_piece_name(pieces, number, '.npz'))))
  metadata = pq.read_table(pa.BufferReader(storage.read_bytes(
      _piece_name(pieces, number, '.parquet'))))
  return dict(arrays), metadata


def _probe_inputs(probes: dict) -> dict:
  return {'ids': probes['ids'], 'vectors_full': probes['vectors']}


def _run_pipeline(refs: List[ShardRef], pieces: str, beam_flags: Sequence[str],
                  train: Optional[dict] = None, trained: Optional[bytes] = None,
                  probes: Optional[dict] = None) -> tuple:
  """Runs the pipeline; returns (trained index bytes, probes) (for `add`: the ones given)."""
  options = PipelineOptions(list(beam_flags))
  results = {}
  with beam.Pipeline(options=options) as pipeline:
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
      probes_side = beam.pvalue.AsSingleton(probe_set | 'ProbeInputs' >> beam.Map(_probe_inputs))
    else:
      trained_side = beam.pvalue.AsSingleton(pipeline | 'Trained' >> beam.Create([trained]))
      probes_side = beam.pvalue.AsSingleton(pipeline | 'ProbeSet' >> beam.Create(
          [_probe_inputs(probes)]))
    _ = shards | 'EncodeShard' >> beam.ParDo(_EncodeShard(pieces), trained_side, probes_side)
  if train is not None:
    results['trained'] = storage.read_bytes(storage.join(pieces, neighbour_index.TRAINED_FILE))
    results['probes'] = dict(np.load(io.BytesIO(storage.read_bytes(
        storage.join(pieces, neighbour_index.PROBES_FILE)))))
  else:
    results = {'trained': trained, 'probes': probes}
  return results['trained'], results['probes']


def _npz(arrays: dict) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _put(path: str, data: bytes) -> None:
  with FileSystems.create(path) as f:
    f.write(data)


def _set_total(index) -> None:
  """After codes were added to the IVF inside: every wrapper's count follows."""
  faiss = faiss_util.faiss()
  total = faiss_util.faiss().extract_index_ivf(index).ntotal
  while True:
    index = faiss.downcast_index(index)
    index.ntotal = total
    if not isinstance(index, faiss.IndexPreTransform):
      return
    index = index.index


class _Merged(NamedTuple):
  ids: pa.Table
  probe_ids: np.ndarray
  probe_scores: np.ndarray


def _merge_pieces(index, pieces: str, refs: List[ShardRef], probes: dict,
                  skip_uris: Dict[str, int]) -> _Merged:
  """Adds the pieces' codes to `index`, newest run first, each URI once: a row whose URI is
  already in `skip_uris` (uri -> recency of the row that holds it) is left out unless newer."""
  ivf = faiss_util.faiss().extract_index_ivf(index)
  tables, probe_ids, probe_scores = [], [probes['exact_ids']], [probes['exact_scores']]
  dropped = []
  for ref in sorted(refs, key=lambda r: (r.recency, r.number)):
    arrays, metadata = read_piece(pieces, ref.number)
    uris = metadata.column('uri').to_pylist()
    keep = np.array([skip_uris.get(u, len(refs) + 1) > ref.recency for u in uris], bool)
    skip_uris.update((u, ref.recency) for u, k in zip(uris, keep) if k)
    if len(arrays['ids']) and keep.any():
      ivf.add_sa_codes(np.ascontiguousarray(arrays['codes'][keep]), arrays['ids'][keep])
    dropped.append(arrays['ids'][~keep])
    tables.append(metadata.filter(pa.array(keep)))
    probe_ids.append(arrays['probe_ids'])
    probe_scores.append(arrays['probe_scores'])
  _set_total(index)
  ids = pa.concat_tables(tables).sort_by('id') if tables else None
  scores = np.concatenate(probe_scores, axis=1)
  found = np.concatenate(probe_ids, axis=1)
  scores[np.isin(found, np.concatenate(dropped + [np.zeros(0, np.int64)]))] = -np.inf
  return _Merged(ids, found, scores)


def _best_neighbours(found: np.ndarray, scores: np.ndarray) -> tuple:
  order = np.argsort(-scores, axis=1, kind='stable')[:, :neighbour_index.PROBE_NEIGHBOURS]
  best_scores = np.take_along_axis(scores, order, 1)
  best_ids = np.where(np.isfinite(best_scores), np.take_along_axis(found, order, 1), -1)
  return best_ids, best_scores


def _probe_file(probes: dict, best_ids: np.ndarray, best_scores: np.ndarray) -> dict:
  return {'ids': probes['ids'], 'vectors': probes['vectors'], 'exact_ids': best_ids,
          'exact_scores': best_scores}


def _covered(refs: List[ShardRef], runs: Sequence[Run]) -> List[dict]:
  covered = []
  for run in runs:
    numbers = [r.number for r in refs if r.run == run.path]
    covered.append(neighbour_index.Covered(run.path, run.finished_at.isoformat(),
                                           min(numbers) if numbers else -1,
                                           len(numbers))._asdict())
  return covered


def _write_directory(directory: str, index, trained: bytes, ids: pa.Table, probes: dict,
                     description: dict) -> None:
  """Every file under a temporary name first, then renamed: a reader never sees half an index."""
  faiss = faiss_util.faiss()
  os.makedirs(directory, exist_ok=True)
  final = {neighbour_index.FAISS_FILE: None, neighbour_index.TRAINED_FILE: None,
           neighbour_index.IDS_FILE: None, neighbour_index.PROBES_FILE: None}
  faiss.write_index(index, os.path.join(directory, neighbour_index.FAISS_FILE + '.tmp'))
  with open(os.path.join(directory, neighbour_index.TRAINED_FILE + '.tmp'), 'wb') as f:
    f.write(trained)
  pq.write_table(ids, os.path.join(directory, neighbour_index.IDS_FILE + '.tmp'))
  with open(os.path.join(directory, neighbour_index.PROBES_FILE + '.tmp'), 'wb') as f:
    f.write(_npz(probes))
  for name in final:
    os.replace(os.path.join(directory, name + '.tmp'), os.path.join(directory, name))
  neighbour_index.write_json(os.path.join(directory, neighbour_index.INDEX_FILE), description)


def _count_vectors(runs: Sequence[Run]) -> int:
  return sum(run.summary.embedded for run in runs)


def _pieces_location(directory: str, beam_flags: Sequence[str]) -> str:
  """Where workers write their pieces: beside the index for local runners, else under the
  pipeline's --temp_location (which every worker can reach)."""
  temp = PipelineOptions(list(beam_flags)).get_all_options().get('temp_location')
  if temp and storage.is_remote(temp):
    return storage.join(temp, f'embeddings-index-pieces-{os.getpid()}')
  return os.path.join(directory, PIECES_DIR)


def _remove_pieces(pieces: str) -> None:
  if storage.is_remote(pieces):
    matched = [m.path for r in FileSystems.match([storage.join(pieces, '*')])
               for m in r.metadata_list]
    if matched:
      FileSystems.delete(matched)
  else:
    shutil.rmtree(pieces, ignore_errors=True)


def build_index(runs: Sequence[Run], directory: str, memory_budget: int, seed: int,
                beam_flags: Sequence[str]) -> dict:
  """Builds a new index over `runs` (one model, newest first) into `directory`."""
  dimension = runs[0].embedding_size
  count = _count_vectors(runs)
  plan = neighbour_index.choose_plan(count, dimension, memory_budget)
  _LOG.info('index plan for %d vectors: %s', count, plan)
  refs = shard_refs(runs)
  pieces = _pieces_location(directory, beam_flags)
  first_sample = neighbour_index.PCA_SAMPLE if plan.pca_dimension else plan.train_sample
  train = {'plan': plan, 'dimension': dimension, 'seed': seed,
           'fraction': min(1.0, (first_sample + neighbour_index.PROBES) * 1.2 / max(count, 1)),
           'reduced_fraction': min(1.0, plan.train_sample * 1.2 / max(count, 1))}
  trained, probes = _run_pipeline(refs, pieces, beam_flags, train=train)
  index = faiss_util.from_bytes(trained)
  empty = {'exact_ids': np.zeros((len(probes['ids']), 0), np.int64),
           'exact_scores': np.zeros((len(probes['ids']), 0), np.float32)}
  merged = _merge_pieces(index, pieces, refs, dict(probes, **empty), {})
  best_ids, best_scores = _best_neighbours(merged.probe_ids, merged.probe_scores)
  probe_file = _probe_file(probes, best_ids, best_scores)
  recall = neighbour_index.probe_recall(index, probe_file, plan.nprobe)
  description = {
      'format_version': neighbour_index.FORMAT_VERSION, 'directory': directory,
      'model': runs[0].model, 'embedding_size': dimension, 'metric': 'cosine (L2 on unit rows)',
      'plan': plan.to_json(), 'count': index.ntotal, 'runs': _covered(refs, runs),
      'next_shard': len(refs), 'probes': len(probes['ids']), 'probe_recall_at_10': recall,
      'built_at': neighbour_index.utc_now(), 'faiss_version': faiss_util.faiss().__version__,
      'seed': seed, 'memory_budget': memory_budget,
  }
  _write_directory(directory, index, trained, merged.ids, probe_file, description)
  _remove_pieces(pieces)
  return description


def add_runs(directory: str, description: dict, runs: Sequence[Run], min_recall: float,
             beam_flags: Sequence[str]) -> dict:
  """Adds runs newer than (or beside) the index's, without retraining; URIs embedded again take
  the newer vector."""
  model = description['model']
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
    raise neighbour_index.IndexError_('no run to add: every run given is already in the index')
  refs = shard_refs(new, description['next_shard'])
  faiss = faiss_util.faiss()
  with open(os.path.join(directory, neighbour_index.TRAINED_FILE), 'rb') as f:
    trained = f.read()
  probes = dict(np.load(os.path.join(directory, neighbour_index.PROBES_FILE)))
  pieces = _pieces_location(directory, beam_flags)
  _run_pipeline(refs, pieces, beam_flags, trained=trained, probes=probes)
  index = faiss.read_index(os.path.join(directory, neighbour_index.FAISS_FILE))
  old_ids = pq.read_table(os.path.join(directory, neighbour_index.IDS_FILE))
  finished = {c['path']: c['finished_at'] for c in description['runs']}
  for run in new:
    finished[run.path] = run.finished_at.isoformat()
  # Recency among old and new runs together: a new run older than the run holding a URI does
  # not replace that URI's vector.
  order = sorted(finished, key=lambda p: finished[p], reverse=True)
  rank = {path: number for number, path in enumerate(order)}
  refs = [r._replace(recency=rank[r.run]) for r in refs]
  holders = dict(zip(old_ids.column('uri').to_pylist(),
                     (rank[p] for p in old_ids.column('run').to_pylist())))
  merged = _merge_pieces(index, pieces, refs, probes, holders)
  new_uris = set(merged.ids.column('uri').to_pylist())
  replaced_mask = np.array([u in new_uris for u in old_ids.column('uri').to_pylist()], bool)
  replaced_ids = old_ids.column('id').to_numpy()[replaced_mask]
  if len(replaced_ids):
    faiss.extract_index_ivf(index).remove_ids(faiss.IDSelectorBatch(replaced_ids))
    _set_total(index)
  ids = pa.concat_tables([old_ids.filter(pa.array(~replaced_mask)),
                          merged.ids.select(old_ids.column_names)]).sort_by('id')
  scores = merged.probe_scores
  scores[np.isin(merged.probe_ids, replaced_ids)] = -np.inf
  best_ids, best_scores = _best_neighbours(merged.probe_ids, scores)
  probe_ids = probes['ids'].copy()
  replaced_uris = dict(zip(old_ids.column('id').to_numpy()[replaced_mask].tolist(),
                           old_ids.column('uri').to_numpy(zero_copy_only=False)[replaced_mask]))
  new_id_of = dict(zip(merged.ids.column('uri').to_pylist(),
                       merged.ids.column('id').to_pylist()))
  for number, probe in enumerate(probe_ids):
    if int(probe) in replaced_uris:
      probe_ids[number] = new_id_of[replaced_uris[int(probe)]]
  probe_file = _probe_file(dict(probes, ids=probe_ids), best_ids, best_scores)
  recall = neighbour_index.probe_recall(index, probe_file, description['plan']['nprobe'])
  description = dict(description)
  description.update({
      'count': index.ntotal, 'runs': description['runs'] + _covered(refs, new),
      'next_shard': description['next_shard'] + len(refs), 'probe_recall_at_10': recall,
      'last_add': {'at': neighbour_index.utc_now(), 'runs': [r.path for r in new],
                   'added': merged.ids.num_rows, 'replaced': int(len(replaced_ids)),
                   'min_recall': min_recall, 'rebuild': bool(recall < min_recall)},
  })
  _write_directory(directory, index, trained, ids, probe_file, description)
  _remove_pieces(pieces)
  return description
