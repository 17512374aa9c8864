"""The Beam jobs behind `pnasnet-embeddings index build|add`: sample, train, encode on workers,
merge; the index follows a collection (collection/), its FAISS ids the collection's row ids.

    fragments ─ SampleForTraining ─ Train (one worker: PCA, then on a second, PCA-reduced sample
       │                           when the plan has one, IVF + PQ) ─┐ trained index
       └──────────── EncodeFragment (every worker: a fragment's rows as codes in inverted lists,
                     or float16 vectors for HNSW, and the probes' exact neighbours among them)
                     ─ piece files, one set per fragment
    then this process merges the pieces, one at a time, into the index directory.

Training: jobs/index_train.py; encoding: jobs/index_encode.py; the pieces and the working folder:
jobs/index_pieces.py; the merge into the directory: jobs/index_directory.py; the probes' measures
(recall, quantization error, lists' imbalance, nprobe): jobs/index_quality.py. Workers never hold
more than one fragment, the merge one piece at a time.

`add` reads only the changes since the version the index covers (jobs/collection_reads.py): the
fragments made since, encoded with the trained quantizers (their rows inserted since), and the
row ids deleted since, taken out of the IVF lists (HNSW: marked deleted, which searches leave
out); then it checks the index's health against the build's and records the new version. It
never reads run directories, and costs the changes whatever the history.
"""

import logging
import os
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from collection import Collection, CollectionError
from embeddings import faiss_util, neighbour_index
from embeddings.similarity import unit_rows
from jobs import index_quality
from jobs.collection_reads import Snapshot, fragments_to_read
from jobs.index_directory import DirectoryWriter, merge_lists, merge_pieces, remove_ids
from jobs.index_encode import EncodeFragment
from jobs.index_pieces import (FragmentRef, fragment_refs, piece_lists, pieces_location,
                               read_training, remove_pieces, save_probes, save_trained)
from jobs.index_plan import choose_plan
from jobs.index_train import SampleFragment, split_probes, train_index, train_pca, training_settings
from pipeline.runners import default_runner
from run_format import utc_now

_LOG = logging.getLogger(__name__)
HNSW_DELETED_SHARE = 0.2  # an HNSW graph with this share of its vectors deleted: rebuild


def _run_pipeline(snapshot: Snapshot, refs: Sequence[FragmentRef], pieces: str,
                  beam_flags: Sequence[str], kind: str, since: Optional[int] = None,
                  train: Optional[dict] = None, trained: Optional[bytes] = None,
                  probes: Optional[dict] = None) -> tuple:
  """Runs the pipeline; returns (trained index bytes, probes) (for `add`: the ones given)."""
  options = PipelineOptions(list(beam_flags))
  with beam.Pipeline(runner=default_runner(options), options=options) as pipeline:
    fragments = pipeline | 'Fragments' >> beam.Create(list(refs)) | 'Spread' >> beam.Reshuffle()
    if train is not None:
      plan, dimension, seed = train['plan'], train['dimension'], train['seed']
      samples = (fragments
                 | 'SampleForTraining' >> beam.ParDo(SampleFragment(snapshot, train['fraction'],
                                                                    seed, pieces))
                 | 'Sample' >> beam.combiners.ToList())
      if plan.pca_dimension:
        pca = samples | 'TrainPCA' >> beam.Map(train_pca, plan, dimension, seed)
        reduced = (fragments
                   | 'SampleReduced' >> beam.ParDo(SampleFragment(
                       snapshot, train['reduced_fraction'], seed + 1, pieces),
                       beam.pvalue.AsSingleton(pca))
                   | 'Reduced' >> beam.combiners.ToList())
        trained_index = samples | 'Train' >> beam.Map(
            train_index, beam.pvalue.AsSingleton(reduced), beam.pvalue.AsSingleton(pca), plan,
            dimension, seed)
      else:
        trained_index = samples | 'Train' >> beam.Map(train_index, None, None, plan, dimension,
                                                      seed)
      probe_set = samples | 'Probes' >> beam.Map(lambda s: split_probes(s, seed)[0])
      _ = trained_index | 'KeepTrained' >> beam.Map(save_trained, pieces)
      _ = probe_set | 'KeepProbes' >> beam.Map(save_probes, pieces)
      trained_side = beam.pvalue.AsSingleton(trained_index)
      probes_side = beam.pvalue.AsSingleton(probe_set)
    else:
      trained_side = beam.pvalue.AsSingleton(pipeline | 'Trained' >> beam.Create([trained]))
      probes_side = beam.pvalue.AsSingleton(pipeline | 'ProbeSet' >> beam.Create([probes]))
    _ = fragments | 'EncodeFragment' >> beam.ParDo(EncodeFragment(snapshot, pieces, kind, since),
                                                   trained_side, probes_side)
  if train is None:
    return trained, probes
  return read_training(pieces)


def _vectors_of(collection: Collection):
  """ids -> their unit vectors, from the collection (what a PQ plan re-ranks by)."""
  return lambda ids: unit_rows(neighbour_index.embedding_rows(collection, ids))


def build_index(collection: Collection, directory: str, memory_budget: int, seed: int,
                beam_flags: Sequence[str],
                recall_target: float = neighbour_index.DEFAULT_RECALL_TARGET) -> dict:
  """Builds a new index over `collection` (a version) into `directory`; a PQ plan's nprobe is the
  smallest reaching `recall_target` on the probes with re-rank."""
  dimension = collection.feature_size
  count = collection.num_rows
  if not count:
    raise neighbour_index.IndexDirectoryError(f'version {collection.version} of '
                                              f'{collection.uri} holds no vector')
  refs = fragment_refs(collection.fragment_ids())
  pieces = pieces_location(directory, beam_flags)
  plan = choose_plan(count, dimension, memory_budget)
  _LOG.info('index plan for %d vectors: %s', count, plan)
  trained, probes = _run_pipeline(Snapshot.of(collection), refs, pieces, beam_flags, plan.kind,
                                  train=training_settings(plan, dimension, seed, count))
  index = faiss_util.from_bytes(trained)
  output = DirectoryWriter(directory)
  best = index_quality.no_neighbours(len(probes['ids']))
  merge_pieces(index, pieces, refs, [best], [len(probes['ids'])], plan.kind)
  if plan.kind != 'hnsw':
    sources = piece_lists(pieces, refs, directory)
    merge_lists(index, sources, output)
    del sources
  probe_file = {'ids': probes['ids'], 'vectors': probes['vectors'], 'exact_ids': best.ids,
                'exact_scores': best.scores}
  curve = None
  if plan.kind == 'ivf_pq':
    nprobe, curve = index_quality.nprobe_curve(index, probe_file, plan.to_json(),
                                               _vectors_of(collection), recall_target)
    plan = plan._replace(nprobe=nprobe)
    _LOG.info('nprobe %d: %s', nprobe, curve)
  health = index_quality.health(index, plan.to_json(), probe_file)
  if plan.kind == 'ivf_pq':  # what `add` compares the added rows' probes with
    health['probe_quantization_error'] = index_quality.quantization_error(
        index, probe_file['vectors'])
  description = {
      'format_version': neighbour_index.FORMAT_VERSION, 'directory': directory,
      'model': collection.model, 'embedding_size': dimension,
      'metric': 'cosine (L2 on unit rows)', 'collection': collection.uri,
      'version': collection.version, 'plan': plan.to_json(), 'count': int(index.ntotal),
      'deleted': 0, 'probes': len(probes['ids']),
      'probe_recall_at_10': health['probe_recall_at_10'],
      'list_imbalance': health['list_imbalance'], 'build': health,
      'built_at': utc_now(), 'faiss_version': faiss_util.faiss().__version__,
      'seed': seed, 'memory_budget': memory_budget, 'recall_target': recall_target,
      'nprobe_curve': curve, 'adds': 0,
  }
  output.finish(index, trained, probe_file, description, np.zeros(0, np.int64))
  remove_pieces(pieces, directory)
  return description


def _deleted_since(collection: Collection, since: int) -> np.ndarray:
  """The row ids deleted after version `since` (ids only: 8 bytes a deletion)."""
  return np.concatenate([np.zeros(0, np.int64)] + [
      ids.to_numpy().astype(np.int64) for ids in collection.changes(since).deleted_row_ids()])


def add_changes(directory: str, description: dict, collection: Collection, recall_drop: float,
                beam_flags: Sequence[str]) -> Optional[dict]:
  """Brings the index up to `collection`'s version (the collection it covers, a later version):
  adds the rows inserted since the version it covers, without retraining, and takes out the row
  ids deleted since. None when the index already covers that version."""
  since, plan = description['version'], description['plan']
  if collection.uri != description['collection']:
    raise neighbour_index.IndexDirectoryError(
        f'the index at {directory} covers {description["collection"]}, not {collection.uri}: '
        'build a new index (pnasnet-embeddings index build)')
  if collection.version < since:
    raise neighbour_index.IndexDirectoryError(
        f'the index covers version {since}, newer than version {collection.version}')
  if collection.version == since:
    return None
  try:
    fragment_ids = fragments_to_read(collection, since)
  except CollectionError as exc:
    raise neighbour_index.IndexDirectoryError(
        f'version {since} of {collection.uri}, which the index covers, is no longer kept, so its '
        f'changes since cannot be read ({exc}): build the index again (pnasnet-embeddings index '
        'build)') from exc
  deleted = _deleted_since(collection, since)
  refs = fragment_refs(fragment_ids)
  with open(os.path.join(directory, neighbour_index.TRAINED_FILE), 'rb') as f:
    trained = f.read()
  probes = dict(np.load(os.path.join(directory, neighbour_index.PROBES_FILE)))
  added_probes = index_quality.added_probes(collection, fragment_ids, since,
                                            description['seed'] + description['adds'] + 1)
  all_probes = {'ids': np.concatenate([probes['ids'], added_probes['ids']]),
                'vectors': np.concatenate([probes['vectors'],
                                           added_probes['vectors']]).astype(np.float32)}
  pieces = pieces_location(directory, beam_flags)
  _run_pipeline(Snapshot.of(collection), refs, pieces, beam_flags, plan['kind'], since,
                trained=trained, probes=all_probes)
  output = DirectoryWriter(directory)
  best = index_quality.BestNeighbours(probes['exact_ids'], probes['exact_scores'])
  new_best = index_quality.no_neighbours(len(added_probes['ids']))
  marked = neighbour_index.read_deleted(directory)
  if plan['kind'] == 'hnsw':
    index = neighbour_index.read_index_whole(directory)
  else:
    index = faiss_util.from_bytes(trained)
  added = merge_pieces(index, pieces, refs, [best, new_best],
                       [len(probes['ids']), len(added_probes['ids'])], plan['kind'])
  if plan['kind'] == 'hnsw':
    marked = np.union1d(marked, deleted)
    count = int(index.ntotal) - len(marked)
  else:
    old = neighbour_index.read_index(directory, plan['kind'])
    sources = [neighbour_index.ivf_lists(old)] + piece_lists(pieces, refs, directory)
    merge_lists(index, sources, output)
    del sources, old
    remove_ids(index, deleted)
    count = int(index.ntotal)
  best.drop(deleted)
  alive = ~np.isin(probes['ids'], deleted)  # a probe whose row left the collection goes
  probe_file = {'ids': probes['ids'][alive], 'vectors': probes['vectors'][alive],
                'exact_ids': best.ids[alive], 'exact_scores': best.scores[alive]}
  selector = neighbour_index.not_deleted(marked)
  health = index_quality.health(index, plan, probe_file, selector)
  added_range = ((int(added_probes['ids'].min()), int(added_probes['ids'].max()) + 1)
                 if len(added_probes['ids']) else None)
  added_recall = index_quality.probe_recall(
      index, {'ids': added_probes['ids'], 'vectors': added_probes['vectors'],
              'exact_ids': new_best.ids}, plan, plan['nprobe'], added_range)
  added_error = None
  if plan['kind'] == 'ivf_pq' and len(added_probes['ids']):
    added_error = index_quality.quantization_error(index, added_probes['vectors'])
  reasons = index_quality.rebuild_reasons(health, description['build'], added_error, recall_drop)
  if plan['kind'] == 'hnsw' and len(marked) > HNSW_DELETED_SHARE * index.ntotal:
    reasons.append(f'{len(marked)} of the graph\'s {index.ntotal} vectors are marked deleted '
                   f'(over {HNSW_DELETED_SHARE:.0%}): searches walk past them')
  description = dict(description)
  description.update({
      'directory': directory,  # where it is now (a copy names its own)
      'version': collection.version, 'count': count, 'deleted': int(len(marked)),
      'adds': description['adds'] + 1, 'probes': len(probe_file['ids']),
      'probe_recall_at_10': health['probe_recall_at_10'],
      'list_imbalance': health['list_imbalance'],
      'last_add': {'at': utc_now(), 'since': since, 'version': collection.version,
                   'added': added, 'removed': int(len(deleted)),
                   'added_probes': len(added_probes['ids']),
                   'added_probe_recall_at_10': added_recall,
                   'added_probe_quantization_error': added_error, 'recall_drop': recall_drop,
                   'rebuild': reasons},
  })
  output.finish(index, trained, probe_file, description, marked)
  remove_pieces(pieces, directory)
  return description

