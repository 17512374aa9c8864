"""The Beam jobs behind `pnasnet-embeddings index build|add`: sample, train, encode on workers, merge.

With several runs, a first pipeline decides which rows the index holds, by the collection's rule
(embeddings/collection.py, as `embeddings.load` applies it) over the runs' indexes, grouped by URI
on workers (jobs/collection_sources.py); it writes each shard's kept rows as a file beside the
pieces and counts them (jobs/index_kept.py). Then, for the plan (jobs/index_plan.py):

    shards ─ SampleForTraining ─ Train (one worker: PCA, then on a second, PCA-reduced sample
       │                           when the plan has one, IVF + PQ) ─┐ trained index
       └──────────── EncodeShard (every worker: the rows the collection keeps, as codes in
                     inverted lists, float16 vectors, metadata, and the probes' exact neighbours
                     in the shard) ─ piece files, one set per shard
    then this process streams the pieces, shard by shard, into the index directory.

Training: jobs/index_train.py; encoding: jobs/index_encode.py; the pieces and the working folder:
jobs/index_pieces.py; the merge into the directory: jobs/index_directory.py; the probes' measures
(recall, quantization error, lists' imbalance, nprobe): jobs/index_quality.py. Workers never hold
more than one shard, the merge one piece's metadata and vectors at a time.

`add` follows the collection's rule over the old and new runs together: it encodes the new runs
with the trained quantizers and removes what they superseded or dropped (IVF: from the on-disk
lists; HNSW: the graph is rebuilt from the refine store, which holds every vector), then checks
the index's health against the build's.
"""

import logging
import os
from typing import List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from embeddings import faiss_util, neighbour_index
from jobs import index_quality
from jobs.index_directory import (DirectoryWriter, copy_old_rows, merge_lists, merge_pieces,
                                  rebuild_hnsw, remove_ids)
from jobs.index_encode import EncodeShard
from jobs.index_kept import KeptOfShard, shard_id_base, with_kept_files, write_kept_files
from jobs.index_pieces import (piece_lists, pieces_location, read_training, remove_pieces,
                               save_probes, save_trained)
from jobs.index_plan import choose_plan
from jobs.index_train import (SampleShard, split_probes, train_index, train_pca,
                              training_settings)
from jobs.shard_refs import ShardRef, shard_refs
from pipeline.runners import default_runner
from run_format import utc_now
from storage.run_dirs import MixedModelsError, Run, find_runs

_LOG = logging.getLogger(__name__)


class Covered(NamedTuple):
  """A run the index holds, and the shard numbers its ids were made from."""
  path: str
  finished_at: str
  first_shard: int
  shards: int


def _covered(refs: List[ShardRef], runs: Sequence[Run]) -> List[dict]:
  covered = []
  for run in runs:
    numbers = [r.number for r in refs if r.run == run.path]
    covered.append(Covered(run.path, run.finished_at.isoformat(),
                           min(numbers) if numbers else -1, len(numbers))._asdict())
  return covered


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
                 | 'SampleForTraining' >> beam.ParDo(SampleShard(train['fraction'], seed,
                                                                 pieces))
                 | 'Sample' >> beam.combiners.ToList())
      if plan.pca_dimension:
        pca = samples | 'TrainPCA' >> beam.Map(train_pca, plan, dimension, seed)
        reduced = (shards
                   | 'SampleReduced' >> beam.ParDo(SampleShard(train['reduced_fraction'],
                                                                seed + 1, pieces),
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
    _ = shards | 'EncodeShard' >> beam.ParDo(EncodeShard(pieces, kind), trained_side,
                                             probes_side)
  if train is None:
    return trained, probes
  return read_training(pieces)


def build_index(runs: Sequence[Run], directory: str, memory_budget: int, seed: int,
                beam_flags: Sequence[str],
                recall_target: float = neighbour_index.DEFAULT_RECALL_TARGET) -> dict:
  """Builds a new index over `runs` (one model, newest first) into `directory`; a PQ plan's
  nprobe is the smallest reaching `recall_target` on the probes with re-rank."""
  dimension = runs[0].embedding_size
  refs = shard_refs(runs)
  pieces = pieces_location(directory, beam_flags)
  if len(runs) > 1:
    refs = with_kept_files(refs, pieces)
    count = write_kept_files(runs, refs, beam_flags)
  else:
    count = runs[0].summary.embedded
  plan = choose_plan(count, dimension, memory_budget)
  _LOG.info('index plan for %d vectors: %s', count, plan)
  trained, probes = _run_pipeline(refs, pieces, beam_flags, plan.kind,
                                  train=training_settings(plan, dimension, seed, count))
  index = faiss_util.from_bytes(trained)
  output = DirectoryWriter(directory, dimension)
  best = index_quality.no_neighbours(len(probes['ids']))
  merge_pieces(index, pieces, refs, output, [best], [len(probes['ids'])], plan.kind)
  if plan.kind != 'hnsw':
    sources = piece_lists(pieces, refs, directory)
    merge_lists(index, sources, output)
    del sources
  probe_file = {'ids': probes['ids'], 'vectors': probes['vectors'], 'exact_ids': best.ids,
                'exact_scores': best.scores}
  curve = None
  if plan.kind == 'ivf_pq':
    nprobe, curve = index_quality.nprobe_curve(index, probe_file, plan.to_json(),
                                               output.refine_vectors, recall_target)
    plan = plan._replace(nprobe=nprobe)
    _LOG.info('nprobe %d: %s', nprobe, curve)
  health = index_quality.health(index, plan.to_json(), probe_file)
  if plan.kind == 'ivf_pq':  # what `add` compares the added runs' probes with
    health['probe_quantization_error'] = index_quality.quantization_error(
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
  remove_pieces(pieces, directory)
  return description


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
      _LOG.warning('%s: already in the index, left as is', run.path)
  if not new:
    raise neighbour_index.IndexDirectoryError('no run to add: every run given is already in the '
                                              'index')
  every_run = find_runs(sorted(covered) + [r.path for r in new])
  pieces = pieces_location(directory, beam_flags)
  every_shard = with_kept_files(shard_refs(every_run), pieces)
  write_kept_files(every_run, every_shard, beam_flags)
  kept_of_shard = KeptOfShard(every_shard)
  refs = [ref._replace(number=description['next_shard'] + number) for number, ref in enumerate(
      ref for run in new for ref in every_shard if ref.run == run.path)]
  with open(os.path.join(directory, neighbour_index.TRAINED_FILE), 'rb') as f:
    trained = f.read()
  probes = dict(np.load(os.path.join(directory, neighbour_index.PROBES_FILE)))
  added_probes = index_quality.added_run_probes(new, refs,
                                                description['seed'] + len(description['runs']))
  all_probes = {'ids': np.concatenate([probes['ids'], added_probes['ids']]),
                'vectors': np.concatenate([probes['vectors'],
                                           added_probes['vectors']]).astype(np.float32)}
  _run_pipeline(refs, pieces, beam_flags, plan['kind'], trained=trained, probes=all_probes)
  output = DirectoryWriter(directory, description['embedding_size'],
                           neighbour_index.open_ids(directory).schema)
  index = faiss_util.from_bytes(trained)
  old_rows = copy_old_rows(directory, kept_of_shard, output, plan['kind'] == 'hnsw')
  if plan['kind'] == 'hnsw':
    rebuild_hnsw(index, old_rows, neighbour_index.open_vectors(
        directory, description['embedding_size']))
  best = index_quality.BestNeighbours(probes['exact_ids'], probes['exact_scores'])
  new_best = index_quality.no_neighbours(len(added_probes['ids']))
  added = merge_pieces(index, pieces, refs, output, [best, new_best],
                       [len(probes['ids']), len(added_probes['ids'])], plan['kind'])
  removed = old_rows.removed
  if plan['kind'] != 'hnsw':
    old = neighbour_index.read_index(directory, plan['kind'])
    sources = [neighbour_index.ivf_lists(old)] + piece_lists(pieces, refs, directory)
    merge_lists(index, sources, output)
    del sources, old
    remove_ids(index, removed)
  best.drop(removed)
  alive = ~np.isin(probes['ids'], removed)  # a probe whose vector left the collection goes
  probe_file = {'ids': probes['ids'][alive], 'vectors': probes['vectors'][alive],
                'exact_ids': best.ids[alive], 'exact_scores': best.scores[alive]}
  health = index_quality.health(index, plan, probe_file)
  added_range = (shard_id_base(description['next_shard']),
                 shard_id_base(description['next_shard'] + len(refs)))
  added_recall = index_quality.probe_recall(
      index, {'ids': added_probes['ids'], 'vectors': added_probes['vectors'],
              'exact_ids': new_best.ids}, plan, plan['nprobe'], added_range)
  added_error = None
  if plan['kind'] == 'ivf_pq' and len(added_probes['ids']):
    added_error = index_quality.quantization_error(index, added_probes['vectors'])
  reasons = index_quality.rebuild_reasons(health, description['build'], added_error, recall_drop)
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
  remove_pieces(pieces, directory)
  return description
