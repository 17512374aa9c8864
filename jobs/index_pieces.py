"""The index build's working folder: what its workers write there (training samples, the trained
index and probes, a set of pieces a fragment of the collection) for this process to read, where
the folder is, and its removal. Written through Beam's FileSystems: with a remote runner the folder
is under --temp_location, which every worker can reach."""

import io
import os
import shutil
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import storage
from embeddings import faiss_util, neighbour_index

PIECES_DIR = '.pieces'
METRICS_NAMESPACE = 'index'  # the workers' counters


class FragmentRef(NamedTuple):
  """A fragment of the collection as the index job's elements name it: its place in the job
  (`number`: its pieces' and samples' names, its sample's seed) and its id in the collection."""
  number: int
  fragment_id: int


def fragment_refs(fragment_ids: Sequence[int], first: int = 0) -> List[FragmentRef]:
  return [FragmentRef(first + number, fragment_id)
          for number, fragment_id in enumerate(fragment_ids)]


def pieces_location(directory: str, beam_flags: Sequence[str]) -> str:
  """Where workers write their pieces: beside the index for local runners, else under the
  pipeline's --temp_location (which every worker can reach)."""
  temp = PipelineOptions(list(beam_flags)).get_all_options().get('temp_location')
  if temp and storage.is_remote(temp):
    return storage.join(temp, f'embeddings-index-pieces-{os.getpid()}')
  return os.path.join(directory, PIECES_DIR)


def remove_pieces(pieces: str, directory: str) -> None:
  if storage.is_remote(pieces):
    matched = [m.path for r in FileSystems.match([storage.join(pieces, '*')])
               for m in r.metadata_list]
    if matched:
      FileSystems.delete(matched)
  else:
    shutil.rmtree(pieces, ignore_errors=True)
  shutil.rmtree(os.path.join(directory, PIECES_DIR + '-lists'), ignore_errors=True)


def npz_bytes(arrays: dict) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def put_file(path: str, data: bytes) -> None:
  with FileSystems.create(path) as f:
    f.write(data)


def save_trained(trained: bytes, pieces: str) -> None:
  """The trained index, kept for this process by the worker that trained it."""
  put_file(storage.join(pieces, neighbour_index.TRAINED_FILE), trained)


def save_probes(probes: dict, pieces: str) -> None:
  put_file(storage.join(pieces, neighbour_index.PROBES_FILE), npz_bytes(probes))


def read_training(pieces: str) -> tuple:
  """(the trained index's bytes, the probes) the training kept."""
  return (storage.read_bytes(storage.join(pieces, neighbour_index.TRAINED_FILE)),
          dict(np.load(io.BytesIO(storage.read_bytes(
              storage.join(pieces, neighbour_index.PROBES_FILE))))))


def _piece_name(pieces: str, number: int, suffix: str) -> str:
  return storage.join(pieces, f'piece-{number:06d}{suffix}')


def write_piece(pieces: str, number: int, lists: bytes, ids, vectors, probe_ids,
                probe_scores) -> None:
  """`vectors`: float16 unit vectors for an HNSW plan (this process adds them to the graph),
  else empty (the codes are in `lists`)."""
  put_file(_piece_name(pieces, number, '.npz'), npz_bytes({
      'ids': ids, 'vectors': vectors, 'probe_ids': probe_ids, 'probe_scores': probe_scores}))
  if lists:
    put_file(_piece_name(pieces, number, '.lists'), lists)


def read_piece(pieces: str, number: int) -> dict:
  return dict(np.load(io.BytesIO(storage.read_bytes(_piece_name(pieces, number, '.npz')))))


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


def piece_lists(pieces: str, refs: List[FragmentRef], directory: str) -> list:
  """The pieces' IVF lists (InvertedLists), memory-mapped from the local disk."""
  faiss = faiss_util.faiss()
  local = os.path.join(directory, PIECES_DIR + '-lists')
  paths = [p for p in (_local_lists(pieces, r.number, local) for r in refs) if p]
  return [faiss.read_InvertedLists(faiss.FileIOReader(path), faiss.IO_FLAG_MMAP)
          for path in paths]
