"""Writing the index directory (embeddings/neighbour_index.py) in this process, with bounded
memory: the pieces streamed in shard (= id) order into the ids table and the refine store, one
piece's metadata and vectors at a time; the URI and SHA-256 lookup files sorted a key range at a
time (_LookupWriter); the IVF lists merged on disk (FAISS OnDiskInvertedLists.merge_from_multiple
over the pieces' memory-mapped lists), and on `add` the old rows the collection no longer keeps
taken out; an HNSW graph built here (it is chosen only when it fits the memory budget)."""

import json
import os
import shutil
from typing import List, NamedTuple, Optional

import numpy as np
import pyarrow as pa

from embeddings import faiss_util, neighbour_index
from jobs.index_kept import KeptOfShard
from jobs.index_pieces import npz_bytes, read_piece
from jobs.index_plan import ivf_of
from jobs.index_quality import BestNeighbours
from jobs.shard_refs import ShardRef

LOOKUP_BUCKETS = 256  # key ranges of a lookup file, each sorted alone (1/256 of the rows)
LOOKUP_BUFFER_ROWS = 1 << 20  # keys held before they are appended to their buckets' files
HNSW_ADD_ROWS = 20_000  # vectors read from the refine store at a time when rebuilding HNSW


def _write_json(path: str, content: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=2)
  os.replace(path + '.tmp', path)


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


class DirectoryWriter:
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
      f.write(npz_bytes(probes))
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
    _write_json(os.path.join(self.directory, neighbour_index.INDEX_FILE), description)


def merge_pieces(index, pieces: str, refs: List[ShardRef], directory: DirectoryWriter,
                 best: List[BestNeighbours], probe_counts: List[int], kind: str) -> int:
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


def merge_lists(index, sources: list, directory: DirectoryWriter) -> int:
  """The IVF lists of `sources` (InvertedLists) merged on disk into the index's new lists file;
  returns the vectors merged."""
  faiss = faiss_util.faiss()
  ivf = ivf_of(index)
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


def _set_total(index, total: int) -> None:
  """After lists were put in the IVF inside: every wrapper's count follows."""
  faiss = faiss_util.faiss()
  while True:
    index = faiss.downcast_index(index)
    index.ntotal = total
    if not isinstance(index, faiss.IndexPreTransform):
      return
    index = index.index


def remove_ids(index, removed: np.ndarray) -> None:
  """Takes the `removed` ids out of the index's on-disk IVF lists."""
  if len(removed):
    with neighbour_index.quiet_stdout():  # a list given its kept entries back may grow the file
      count = _remove_from_lists(neighbour_index.ivf_lists(index), removed)
    _set_total(index, ivf_of(index).ntotal - count)


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


class OldRows(NamedTuple):
  """What copy_old_rows left out of the ids table, and what it kept."""
  removed: np.ndarray  # ids the collection no longer keeps
  kept_ids: np.ndarray  # for an HNSW rebuild: the kept ids, and their rows in the refine store
  kept_vector_rows: np.ndarray


def copy_old_rows(directory: str, kept_of_shard: KeptOfShard, output: DirectoryWriter,
                  hnsw: bool) -> OldRows:
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
  return OldRows(np.concatenate(removed), np.concatenate(kept_ids),
                 np.concatenate(kept_vector_rows))


def rebuild_hnsw(index, old: OldRows, stored: np.ndarray) -> None:
  """Adds the kept old vectors to a new HNSW graph, from the refine store, HNSW_ADD_ROWS at a
  time (HNSW cannot remove a vector)."""
  for start in range(0, len(old.kept_ids), HNSW_ADD_ROWS):
    part = slice(start, start + HNSW_ADD_ROWS)
    index.add_with_ids(np.asarray(stored[old.kept_vector_rows[part]], np.float32),
                       old.kept_ids[part])
