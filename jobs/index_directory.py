"""Writing the index directory (embeddings/neighbour_index.py) in this process, with bounded
memory: the IVF lists merged on disk (FAISS OnDiskInvertedLists.merge_from_multiple over the
pieces' memory-mapped lists, and on `add` the old lists with them), the ids the collection
deleted taken out of them; an HNSW graph built here from the pieces' vectors (it is chosen only
when it fits the memory budget), its deleted ids marked. Every file is written under a
temporary name and renamed when all are complete: a reader never sees half an index, and a
failed `add` leaves the index it started from."""

import json
import os
from typing import List

import numpy as np

from embeddings import faiss_util, neighbour_index
from jobs.index_pieces import FragmentRef, npz_bytes, read_piece
from jobs.index_plan import ivf_of
from jobs.index_quality import BestNeighbours


def _write_json(path: str, content: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=2)
  os.replace(path + '.tmp', path)


class DirectoryWriter:
  """The files of an index directory being written, each under a temporary name until
  finish() renames them all."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self.directory = directory

  def temporary(self, name: str) -> str:
    return os.path.join(self.directory, name + '.tmp')

  def finish(self, index, trained: bytes, probes: dict, description: dict,
             deleted: np.ndarray) -> None:
    """`deleted`: an HNSW index's ids marked deleted (sorted), empty for IVF."""
    faiss = faiss_util.faiss()
    lists = neighbour_index.ivf_lists(index)
    if lists is not None:  # the lists' file is referred to by its final name
      lists.filename = os.path.join(self.directory, neighbour_index.IVFDATA_FILE)
    faiss.write_index(index, self.temporary(neighbour_index.FAISS_FILE))
    with open(self.temporary(neighbour_index.TRAINED_FILE), 'wb') as f:
      f.write(trained)
    with open(self.temporary(neighbour_index.PROBES_FILE), 'wb') as f:
      f.write(npz_bytes(probes))
    names = [neighbour_index.TRAINED_FILE, neighbour_index.PROBES_FILE]
    if lists is None:
      np.ascontiguousarray(deleted, np.int64).tofile(
          self.temporary(neighbour_index.DELETED_FILE))
      names.append(neighbour_index.DELETED_FILE)
    else:
      names.insert(0, neighbour_index.IVFDATA_FILE)
    names.append(neighbour_index.FAISS_FILE)
    for name in names:
      os.replace(self.temporary(name), os.path.join(self.directory, name))
    _write_json(os.path.join(self.directory, neighbour_index.INDEX_FILE), description)


def merge_pieces(index, pieces: str, refs: List[FragmentRef], best: List[BestNeighbours],
                 probe_counts: List[int], kind: str) -> int:
  """Reads the pieces, one at a time: adds HNSW vectors as they come, offers the probes'
  neighbours; returns the vectors the pieces hold. `best`: the probe sets' neighbours, each set
  the next probe_counts rows of the pieces' probes."""
  added = 0
  for ref in sorted(refs, key=lambda r: r.number):
    arrays = read_piece(pieces, ref.number)
    if kind == 'hnsw' and len(arrays['ids']):
      index.add_with_ids(arrays['vectors'].astype(np.float32), arrays['ids'])
    added += len(arrays['ids'])
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
  if merged.totsize:
    # merge_from_multiple grows the file through update_totsize, which records the new space as
    # a free slot, then fills it without allocating (FAISS 1.15.1): the next allocation (a list
    # given its kept entries back, remove_ids) would be placed over the merged lists. Taking
    # that slot leaves the free list empty, as it is.
    merged.allocate_slot(merged.totsize)
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


