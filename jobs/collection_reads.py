"""The collection read by a Beam job's workers, a fragment each, for the followers (the export,
the neighbour index): every row of a version, or only the rows inserted after the version a
follower last applied, and the row ids deleted since. No process holds the collection, and a
sync reads what changed, however long the history.

Which fragments can hold rows inserted after version `since`: those the version read has and
`since` had not. Fragments are never rewritten in place (a night adds new ones and deletion
files), so a night's rows are in its new fragments; a compaction's new fragments hold old rows,
which the filter on each row's creation version leaves out (its rows keep their ids: nothing to
apply).
"""

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from collection import Collection, open_collection

METRICS_NAMESPACE = 'collection'
ROWS_READ = 'rows_read'  # what a sync's cost is counted in
IDS_READ = 'ids_read'  # rows of which only the ids were read
BATCH_ROWS = 1_024  # a batch of 4320-d float32 vectors: 17 MB
DELETE_BATCH = 1_000


class Snapshot(NamedTuple):
  """What a worker needs to open the version the job reads (picklable)."""
  uri: str
  version: int
  options: Dict[str, str]

  @classmethod
  def of(cls, collection: Collection) -> 'Snapshot':
    return cls(collection.uri, collection.version, dict(collection.storage_options))

  def open(self) -> Collection:
    return open_collection(self.uri, self.version, self.options)


def fragments_to_read(collection: Collection, since: Optional[int] = None) -> List[int]:
  """The fragment ids whose rows a job reads: all of them, or those that can hold rows inserted
  after version `since` (CollectionError when `since` was cleaned up)."""
  if since is None:
    return collection.fragment_ids()
  before = set(open_collection(collection.uri, since, collection.storage_options).fragment_ids())
  return [number for number in collection.fragment_ids() if number not in before]


def inserted_filter(since: Optional[int]) -> Optional[str]:
  return None if since is None else f'_row_created_at_version > {int(since)}'


def read_fragment(collection: Collection, fragment_id: int, columns: Sequence[str],
                  since: Optional[int] = None,
                  batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
  """A fragment's rows (those inserted after `since`, if given) with their `_rowid`."""
  fragment = collection.dataset.get_fragment(fragment_id)
  for batch in fragment.to_batches(columns=list(columns), batch_size=batch_rows,
                                   filter=inserted_filter(since), with_row_id=True):
    if batch.num_rows:
      yield batch


class RecordBatchCoder(beam.coders.Coder):
  """Arrow record batches between stages in Arrow's IPC stream form. Beam samples the size of a
  stage's outputs through its coder: this one gives the batch's buffers' size, where pickling a
  batch of 4320-d vectors to measure it took 30 ms."""

  def encode(self, batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
      writer.write_batch(batch)
    return sink.getvalue().to_pybytes()

  def decode(self, encoded: bytes) -> pa.RecordBatch:
    return pa.ipc.open_stream(encoded).read_next_batch()

  def estimate_size(self, batch: pa.RecordBatch) -> int:
    return batch.nbytes

  def is_deterministic(self) -> bool:
    return False

  def to_type_hint(self):
    return pa.RecordBatch


beam.coders.registry.register_coder(pa.RecordBatch, RecordBatchCoder)


@beam.typehints.with_output_types(pa.RecordBatch)
class ReadFragments(beam.DoFn):
  """Fragment id -> record batches of its rows (`columns` and `_rowid`); counts the rows read
  (IDS_READ when no column is read)."""

  def __init__(self, snapshot: Snapshot, columns: Sequence[str], since: Optional[int] = None):
    self._snapshot = snapshot
    self._columns = list(columns)
    self._since = since

  def setup(self):
    self._collection = self._snapshot.open()
    self._read = beam.metrics.Metrics.counter(METRICS_NAMESPACE,
                                              ROWS_READ if self._columns else IDS_READ)

  def process(self, fragment_id: int):
    for batch in read_fragment(self._collection, fragment_id, self._columns, self._since):
      self._read.inc(batch.num_rows)
      yield batch


class DeletedIds(beam.DoFn):
  """(anything) -> the row ids deleted after version `since`, in int64 arrays of DELETE_BATCH,
  streamed by the one worker that reads them."""

  def __init__(self, snapshot: Snapshot, since: int):
    self._snapshot = snapshot
    self._since = since

  def process(self, _):
    for ids in self._snapshot.open().changes(self._since).deleted_row_ids():
      ids = ids.to_numpy().astype(np.int64)
      for start in range(0, len(ids), DELETE_BATCH):
        yield ids[start:start + DELETE_BATCH]


def row_ids(batch: pa.RecordBatch) -> np.ndarray:
  """The batch's `_rowid` as int64: what followers key rows by (ids stay far below 2^63)."""
  return batch.column('_rowid').to_numpy().astype(np.int64)


def vectors(batch: pa.RecordBatch, column: str = 'embedding') -> np.ndarray:
  """The batch's embeddings as float32 [rows, dimension] (float16 collections widened)."""
  array = batch.column(column)
  if isinstance(array, pa.ChunkedArray):
    array = array.combine_chunks()
  flat = array.flatten().to_numpy(zero_copy_only=False)
  return flat.reshape(len(array), -1).astype(np.float32)
