"""The rows the neighbour index holds: which rows of each shard the collection keeps, by its rule
over the runs (decided in Beam, written as one kept file a shard, so that no one process holds
the collection's URIs), and the ids the index gives them."""

import io
from typing import Dict, List, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

import storage
from jobs import work_folder
from jobs.collection_sources import CollectionSources, LocateInShards, warn_of_gaps
from jobs.index_pieces import METRICS_NAMESPACE, put_file
from jobs.shard_refs import ShardRef
from pipeline.runners import default_runner
from storage.run_dirs import Run

ROW_BITS = 24  # ids are shard number << ROW_BITS | row: up to 16M rows a shard


def shard_id_base(number: int) -> int:
  return number << ROW_BITS


def row_ids(ref: ShardRef, rows: np.ndarray) -> np.ndarray:
  """The index's ids of the shard's `rows`."""
  return shard_id_base(ref.number) + np.asarray(rows, np.int64)


def with_kept_files(refs: Sequence[ShardRef], pieces: str) -> List[ShardRef]:
  """The refs, each naming the file its kept rows are written to (write_kept_files)."""
  return [ref._replace(kept_file=storage.join(pieces, f'kept-{position:06d}.npy'))
          for position, ref in enumerate(refs)]


def kept_rows(ref: ShardRef) -> np.ndarray:
  """The shard's rows the collection keeps, ascending (the ref must name its kept file)."""
  return np.load(io.BytesIO(storage.read_bytes(ref.kept_file)))


def kept_mask(ref: ShardRef, rows: int) -> np.ndarray:
  """Which of the shard's `rows` rows the collection keeps (all when the ref names no kept
  file: one run)."""
  if ref.kept_file is None:
    return np.ones(rows, bool)
  keep = np.zeros(rows, bool)
  keep[kept_rows(ref)] = True
  return keep


class _WriteKeptRows(beam.DoFn):
  """((run, shard number), {'ref': [ShardRef], 'rows': [kept rows]}) -> the ref's kept file,
  written for every shard (empty when the collection keeps none of its rows)."""

  def process(self, keyed):
    _, parts = keyed
    ref, = parts['ref']
    rows = np.sort(np.fromiter(parts['rows'], np.int64))
    buffer = io.BytesIO()
    np.save(buffer, rows)
    put_file(ref.kept_file, buffer.getvalue())
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


class KeptOfShard:
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
