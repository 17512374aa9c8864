"""Between matching and reading: skip the files that earlier finished runs already handled.

The nightly state is the index itself. Every run's index has one row for each file it matched, and
the row of a file it skipped carries the version an earlier run finished with (`done_outcome`:
embedded, or decode when the file could not be decoded) and the run that holds its vector
(`vector_run`), so the newest finished run's index is the state of everything that run matched.
A run therefore reads only the earlier runs that no newer one superseded (`state_runs`): on a
nightly schedule over the same inputs, last night's index, about one collection's rows however
many nights there were. Only runs with outcome `finished` are state (storage.run_dirs.scan_runs);
a done row whose `vector_run` is not among the finished runs --incremental_from names (deleted by
a retention rule, say) is not done: its file is embedded again. Rows are filtered as Arrow batches
(this model and recipe, a done outcome) before any Python object is made, and the listing joins
them in one shuffle on the URI, which also keeps one of each URI the inputs named more than once.

A file is unchanged when its size and content identity match the done version (GCS crc32c, S3
ETag: a metadata edit or a storage-class rewrite changes neither); where the store gives no content
identity (local disks), size and modification time must match.
"""

from typing import Iterable, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from run_format import DECODE, EMBEDDED, INCREMENTAL_COLUMNS, SKIPPED
from run_format.patterns import Inputs
from transforms.provenance import Provenance

METRICS_NAMESPACE = 'incremental'
_BATCH_ROWS = 65_536


class DoneVersion(NamedTuple):
  """A file version an earlier run finished with."""
  size_bytes: Optional[int]
  last_modified: Optional[int]  # microseconds since the Unix epoch, UTC
  content_id: Optional[str]
  outcome: str  # EMBEDDED or DECODE
  vector_run: Optional[str]  # EMBEDDED: the run directory holding the vector (None: an index
  # older than vector_run, which cannot say)


class SkippedFile(NamedTuple):
  ref: object  # the FileRef of this run's listing
  done_outcome: str  # what the earlier run did with it
  vector_run: Optional[str] = None  # where its vector is (done_outcome EMBEDDED)


def state_runs(runs: Iterable, model: str, recipe: str) -> List:
  """The earlier finished runs (storage.run_dirs.Run) a run must read: of those with this model and
  recipe (no other can make a file skippable), newest first, each that no newer one superseded.

  A run supersedes a run it read itself (and, through it, what that one superseded) only when
  its inputs cover the other's whole (collection.Inputs.covers_all): its index then carried
  forward every done file the other held. A narrow backfill or a delta manifest supersedes
  nothing, so the next full night still reads the wide run it read."""
  same = sorted((run for run in runs if run.summary.model == model and
                 run.summary.recipe == recipe), key=lambda run: run.summary.started_at,
                reverse=True)
  by_path = {run.path: run for run in same}
  superseded, chosen = set(), []
  for run in same:
    if run.path not in superseded:
      chosen.append(run)
    if run.summary.index_carries_forward:
      inputs = Inputs.of(run.summary)
      for read in run.summary.incremental_runs:
        earlier = by_path.get(read.rstrip('/'))
        if earlier is not None and inputs.covers_all(Inputs.of(earlier.summary)):
          superseded.add(earlier.path)
  return sorted(chosen, key=lambda run: run.path)


def _done_mask(batch: pa.RecordBatch, provenance: Provenance, outcomes: Sequence[str]):
  done = pc.is_in(batch.column('outcome'), pa.array(outcomes))
  carried = pc.and_(pc.equal(batch.column('outcome'), SKIPPED),
                    pc.is_in(batch.column('done_outcome'), pa.array(outcomes)))
  return pc.and_(pc.and_(pc.equal(batch.column('model'), provenance.model),
                         pc.equal(batch.column('recipe'), provenance.recipe)),
                 pc.fill_null(pc.or_(done, carried), False))


def _with_every_column(batch: pa.RecordBatch) -> pa.RecordBatch:
  """Indexes of 0.2 have no content_id or done_outcome, of 0.3 no vector_run: nulls."""
  for name in ('content_id', 'done_outcome', 'vector_run'):
    if name not in batch.schema.names:
      batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
  return batch


class _ReadDone(beam.DoFn):
  """One index file -> (uri, DoneVersion) of the files done with this model and recipe, whose
  vector (if embedded) is in one of `vector_runs`: a row naming another run is not done."""

  def __init__(self, provenance: Provenance, retry_failed: bool, vector_runs: Sequence[str]):
    self._provenance = provenance
    self._outcomes = [EMBEDDED] if retry_failed else [EMBEDDED, DECODE]
    self._vector_runs = frozenset(run.rstrip('/') for run in vector_runs)
    self._rows = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'index_rows_read')
    self._bytes = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'index_bytes_read')
    self._kept = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'index_rows_done')
    self._lost = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'vector_run_missing')

  def process(self, path: str):
    run = path.rsplit('/', 1)[0]
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      parquet = pq.ParquetFile(f)
      present = [c for c in INCREMENTAL_COLUMNS if c in parquet.schema_arrow.names]
      self._bytes.inc(sum(parquet.metadata.row_group(i).total_byte_size
                          for i in range(parquet.num_row_groups)))
      for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=present):
        self._rows.inc(batch.num_rows)
        batch = _with_every_column(batch)
        kept = batch.filter(_done_mask(batch, self._provenance, self._outcomes))
        self._kept.inc(kept.num_rows)
        outcome = pc.if_else(pc.equal(kept.column('outcome'), SKIPPED),
                             kept.column('done_outcome'), kept.column('outcome'))
        columns = [kept.column('uri'), kept.column('size_bytes'),
                   kept.column('last_modified').cast(pa.int64()), kept.column('content_id'),
                   outcome, kept.column('outcome'), kept.column('vector_run')]
        for uri, size, modified, content, done, own, vector_run in zip(
            *(c.to_pylist() for c in columns)):
          if done == EMBEDDED:
            vector_run = run if own == EMBEDDED else vector_run
            if vector_run is not None and vector_run.rstrip('/') not in self._vector_runs:
              self._lost.inc()
              continue
          else:
            vector_run = None
          yield uri, DoneVersion(size, modified, content, done, vector_run)


def _same_version(ref, done: DoneVersion) -> bool:
  if ref.size_bytes is None or ref.size_bytes != done.size_bytes:
    return False
  if ref.content_id and done.content_id:
    return ref.content_id == done.content_id
  return ref.last_modified == done.last_modified


class _NewOrChanged(beam.DoFn):
  """One URI: this run's listing of it (once, however often it was named) against what earlier
  runs did. Read and inference failures are always retried: they say nothing about the file."""

  def __init__(self):
    self._skipped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, 'skipped')

  def process(self, joined):
    _, grouped = joined
    ref = next(iter(grouped['current']), None)
    if ref is None:  # done earlier, not matched now
      return
    done = next((d for d in grouped['done'] if _same_version(ref, d)), None)
    if done is None:
      yield ref
    else:
      self._skipped.inc()
      yield beam.pvalue.TaggedOutput('skipped', SkippedFile(ref, done.outcome, done.vector_run))


class SkipUnchanged(beam.PTransform):
  """FileRef (repeats allowed) -> FileRef to embed (main) and SkippedFile (tag 'skipped'), each
  URI once. `vector_runs`: the run directories whose vectors count (default: those of the
  indexes)."""

  def __init__(self, index_globs: Sequence[str], provenance: Provenance,
               retry_failed: bool = False, vector_runs: Optional[Sequence[str]] = None):
    super().__init__()
    self._index_globs = list(index_globs)
    self._provenance = provenance
    self._retry_failed = retry_failed
    self._vector_runs = list(vector_runs if vector_runs is not None else
                             (glob.rsplit('/', 1)[0] for glob in self._index_globs))

  def expand(self, refs):
    done = (refs.pipeline
            | 'Indexes' >> beam.Create(self._index_globs)
            | 'IndexFiles' >> beam.FlatMap(
                lambda glob: [m.path for m in FileSystems.match([glob])[0].metadata_list])
            | 'SpreadIndexFiles' >> beam.Reshuffle()
            | 'ReadDone' >> beam.ParDo(_ReadDone(self._provenance, self._retry_failed,
                                              self._vector_runs)))
    current = refs | 'KeyByUri' >> beam.Map(lambda ref: (ref.uri, ref))
    return ({'current': current, 'done': done}
            | 'JoinOnUri' >> beam.CoGroupByKey()
            | 'NewOrChanged' >> beam.ParDo(_NewOrChanged()).with_outputs('skipped', main='new'))
