"""The Beam job behind `pnasnet-embeddings compact`: every URI's vector by the load rule over many
runs (embeddings/collection.py), written as one consolidated run, whose summary says what it
consolidated.

The consolidated run is a finished run like a night's: Parquet shards of the vectors `load`
returns, an index (each URI embedded, or decode for a file done as undecodable) and a summary
whose inputs are all the runs' and whose `incremental_runs` are the runs consolidated, so `load`
over it alone returns the same vectors and the next night with `--incremental_from` over the
prefix reads its index alone and skips everything it holds.

    CollectionSources (jobs/collection_sources.py: index files ─ (uri, row) ─ GroupByKey ─ the
       │   SourceRule) ─ ((source run, uri), newest row) ──────────────────┐
       └ shards of the runs that supply a vector ─ ReadVectors ─ ((run, uri), vector) ─ CoGroupByKey
           ─ (shard, row) ─ GroupByKey ─ WriteShard: embeddings-S-of-N.parquet, index-S-of-N.parquet

A worker holds one block of a Parquet shard (about 1,000 rows) or one TFRecord shard while reading,
and one output shard's rows while writing (about `SHARD_ROWS`); nothing gathers the collection on
one machine, so it scales with the workers, as the embedding pipeline does. Undecodable files are
carried as `decode` rows (still done for later nights, no vector); files whose vector is in no
run given are left out (the next night embeds them again).
"""

import dataclasses
import math
import time
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from embeddings.shards import ParquetVectors, is_parquet, read_shard
from jobs.collection_sources import CollectionSources, IndexRow, warn_of_gaps
from pipeline.output_dir import claim_output
from pipeline.runners import default_runner, runner_name
from run_format import (CLAIM_STALE_SECONDS, DECODE, EMBEDDED, EMBEDDING, EMBEDDINGS_PREFIX,
                        FINISHED, INDEX_GLOB, INDEX_PREFIX, INDEX_SCHEMA, METADATA_COLUMNS,
                        PARQUET_SUFFIX, STAGES, SUMMARY_FILE, RunSummary, embeddings_schema,
                        utc_now)
from storage.run_dirs import Run, scan_runs, select_model, warn_of_failed
from transforms.heartbeat import keep_alive

METRICS_NAMESPACE = 'compact'
SHARD_ROWS = 100_000  # about 1.7 GB of 4320-d float32 vectors a shard
_READ_BLOCK_ROWS = 1_000
_WRITE_BATCH_ROWS = 1_000


class _ReadVectors(beam.DoFn):
  """(run, shard path) -> ((run, uri), (metadata row, float32 vector)), a block at a time."""

  def process(self, shard: Tuple[str, str]):
    run, path = shard
    if is_parquet(path):
      vectors = ParquetVectors.open(path, run)
      for first, groups in vectors.blocks(_READ_BLOCK_ROWS):
        block = vectors.vectors(groups)
        metadata = vectors.metadata(np.arange(first, first + len(block)))
        yield from self._rows(run, metadata, block)
    else:
      whole = read_shard(path, run)
      yield from self._rows(run, whole.metadata, whole.vectors)

  @staticmethod
  def _rows(run: str, metadata: pa.Table, vectors: np.ndarray):
    for values, vector in zip(metadata.select(METADATA_COLUMNS).to_pylist(), vectors):
      yield (run, values['uri']), (values, vector)


def shard_of(uri: str, shards: int) -> int:
  return zlib.crc32(uri.encode('utf-8', 'surrogateescape')) % shards


def _index_row(uri: str, row: IndexRow, sha256: Optional[str], outcome: str) -> dict:
  size, modified, content_id, recipe = row.version
  return {'uri': uri, 'size_bytes': size, 'last_modified': modified, 'content_id': content_id,
          'sha256': sha256, 'model': row.model, 'recipe': recipe, 'outcome': outcome,
          'done_outcome': None, 'vector_run': None, 'message': None}


def _joined(keyed, shards: int):
  """((run, uri), {'kept': [row], 'vectors': [(metadata, vector)]}) -> (shard, (index row,
  metadata, vector))."""
  (_, uri), parts = keyed
  kept, vectors = list(parts['kept']), list(parts['vectors'])
  if not kept:
    return
  if not vectors:
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vectors_not_in_shards').inc()
    return
  metadata, vector = vectors[0]
  yield shard_of(uri, shards), (_index_row(uri, kept[0], metadata['sha256'], EMBEDDED),
                                metadata, vector)


class _WriteShard(beam.DoFn):
  """(shard, rows) -> the paths of embeddings-S-of-N.parquet (if it holds a vector) and
  index-S-of-N.parquet, rows sorted by URI."""

  def __init__(self, output: str, shards: int, dimension: int, embedding_dtype: str):
    self._output = output
    self._shards = shards
    self._dimension = dimension
    self._embedding_dtype = embedding_dtype

  def _path(self, prefix: str, shard: int) -> str:
    return storage.join(self._output,
                        f'{prefix}-{shard:05d}-of-{self._shards:05d}{PARQUET_SUFFIX}')

  def process(self, grouped):
    shard, rows = grouped
    rows = sorted(rows, key=lambda row: row[0]['uri'])
    schema = embeddings_schema(self._dimension, self._embedding_dtype)
    with_vectors = [row for row in rows if row[2] is not None]
    if with_vectors:
      path = self._path(EMBEDDINGS_PREFIX, shard)
      encoded = [name for name in schema.names if name != EMBEDDING]
      with storage.create(path) as f:
        writer = pq.ParquetWriter(f, schema, compression=dict(
            {name: 'snappy' for name in encoded}, **{EMBEDDING: 'none'}),
                                  use_dictionary=encoded, use_compliant_nested_type=False)
        for start in range(0, len(with_vectors), _WRITE_BATCH_ROWS):
          batch = with_vectors[start:start + _WRITE_BATCH_ROWS]
          vectors = np.stack([vector for _, _, vector in batch]).astype(self._embedding_dtype)
          columns = {name: [metadata[name] for _, metadata, _ in batch]
                     for name in METADATA_COLUMNS}
          columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(
              pa.array(vectors.ravel()), self._dimension)
          writer.write_table(pa.Table.from_pydict(columns, schema=schema))
        writer.close()
      yield path
    path = self._path(INDEX_PREFIX, shard)
    with storage.create(path) as f:
      pq.write_table(pa.Table.from_pylist([row[0] for row in rows], INDEX_SCHEMA), f)
    yield path


def build_compaction(pipeline: beam.Pipeline, runs: Sequence[Run], output: str, shards: int,
                     embedding_dtype: str):
  """Runs of one model, newest first (find_runs, select_model) -> the written files' paths."""
  decided = pipeline | 'Sources' >> CollectionSources(runs)
  shard_paths = {run.path: run.shard_paths() for run in runs}
  vectors = (decided.kept
             | 'SourceRuns' >> beam.Map(lambda kv: kv[0][0])
             | 'EachRunOnce' >> beam.Distinct()
             | 'Shards' >> beam.FlatMap(lambda run: [(run, path) for path in shard_paths[run]])
             | 'SpreadShards' >> beam.Reshuffle()
             | 'ReadVectors' >> beam.ParDo(_ReadVectors()))
  with_vectors = ({'kept': decided.kept, 'vectors': vectors}
                  | 'JoinVectors' >> beam.CoGroupByKey()
                  | 'Joined' >> beam.FlatMap(_joined, shards))
  undecodable = decided.decode | 'DecodeRows' >> beam.Map(
      lambda kv: (shard_of(kv[0], shards), (_index_row(kv[0], kv[1], None, DECODE), None, None)))
  dimension = runs[0].embedding_size
  return ((with_vectors, undecodable)
          | 'AllRows' >> beam.Flatten()
          | 'ByShard' >> beam.GroupByKey()
          | 'WriteShards' >> beam.ParDo(_WriteShard(output, shards, dimension, embedding_dtype)))


class CompactError(ValueError):
  """Refused before any work."""


def consolidated_inputs(runs: Sequence[Run]) -> Dict[str, List[str]]:
  """Inputs that cover every run's (collection.Inputs.covers_all): the union of their patterns
  and manifests, the excludes they all share."""
  excludes = set.intersection(*(set(run.summary.exclude) for run in runs))
  return {'input': sorted({p for run in runs for p in run.summary.input}),
          'input_manifest': sorted({m for run in runs for m in run.summary.input_manifest}),
          'exclude': sorted(excludes)}


def default_shards(runs: Sequence[Run], shard_rows: int) -> int:
  """From the newest run's index rows (its footers): about one collection on a schedule."""
  rows = 0
  for info in storage.match(runs[0].index_glob):
    with storage.open_file(info.path) as f:
      rows += pq.ParquetFile(f).metadata.num_rows
  return max(1, math.ceil(rows / shard_rows))


def _counts(output: str) -> Dict[str, int]:
  counts = {EMBEDDED: 0, DECODE: 0}
  for info in storage.match(storage.join(output, INDEX_GLOB)):
    with storage.open_file(info.path) as f:
      # One thread: a pool thread would still hold the Python file after the read
      # (apache/arrow#34314), which aborts a command ending meanwhile.
      outcomes = pq.read_table(f, columns=['outcome'], use_threads=False).column('outcome')
      for outcome in outcomes.to_pylist():
        counts[outcome] += 1
  return counts


def summary_of(runs: Sequence[Run], output: str, patterns: Sequence[str], runner: str,
               started_at: str, started: float, files: List[str]) -> RunSummary:
  newest = runs[0].summary
  counts = _counts(output)
  return dataclasses.replace(
      newest, **consolidated_inputs(runs), incremental_from=list(patterns),
      incremental_runs=[run.path for run in runs], index_carries_forward=True, source_runs=[],
      output=output, output_format='parquet', max_failed_fraction=1.0, runner=runner,
      started_at=started_at, outcome=FINISHED, matched=counts[EMBEDDED] + counts[DECODE],
      skipped=0, embedded=counts[EMBEDDED], failed=counts[DECODE],
      failed_by_stage=dict(dict.fromkeys(STAGES, 0), **{DECODE: counts[DECODE]}),
      example_failures=[], files=sorted(files), finished_at=utc_now(),
      wall_time_seconds=round(time.monotonic() - started, 3), images_per_second=None)


def runs_to_compact(patterns: Sequence[str], model: Optional[str], output: str,
                    allow_concurrent: bool) -> List[Run]:
  """The finished runs of one model under `patterns`, newest first; CompactError while a run
  among them is still going, unless `allow_concurrent`."""
  scan = scan_runs(list(patterns))
  warn_of_failed(scan.failed)
  live = [u for u in scan.unfinished if u.alive() and u.path != output]
  if live and not allow_concurrent:
    raise CompactError(
        f'{", ".join(u.describe() for u in live)}: a run still going; compacting now would '
        'leave out what it embeds, and deleting older runs after it could lose vectors. Wait '
        f'for it, or add --allow_concurrent (a claim not rewritten for '
        f'{CLAIM_STALE_SECONDS // 60} min counts as dead)')
  runs = [run for run in scan.finished if run.path != output]
  if not runs:
    raise CompactError(f'no finished run in {" ".join(patterns)}')
  return select_model(runs, model)


class CompactionFailed(RuntimeError):
  """The job ended without finishing: the output holds no summary."""


def compact(runs: Sequence[Run], output: str, patterns: Sequence[str], shards: int,
            beam_flags: Sequence[str]) -> RunSummary:
  """Claims `output`, runs the job while beating in its claim (a night launched meanwhile sees
  this run alive, and waits), then writes the summary; OutputExistsError or
  OutputNotWritableError before any work, CompactionFailed after."""
  from apache_beam.options.pipeline_options import PipelineOptions
  options = PipelineOptions(list(beam_flags))
  started_at, started = utc_now(), time.monotonic()
  claim_output(output, {'compact': [run.path for run in runs], 'started_at': started_at,
                        'runner': runner_name(options)}, options)
  pipeline = beam.Pipeline(runner=default_runner(options), options=options)
  build_compaction(pipeline, runs, output, shards, runs[0].summary.embedding_dtype)
  beating = keep_alive(output)
  try:
    result = pipeline.run()
    state = result.wait_until_finish()
  finally:
    beating.stop()
  warn_of_gaps(result)
  if state != 'DONE':
    raise CompactionFailed(f'the compaction job ended in state {state}; {output} holds no '
                           f'{SUMMARY_FILE}')
  found = sorted(info.path for info in storage.match(storage.join(output, '*.parquet')))
  summary = summary_of(runs, output, patterns, runner_name(options), started_at, started, found)
  storage.write_bytes(storage.join(output, SUMMARY_FILE), summary.to_json().encode())
  return summary
