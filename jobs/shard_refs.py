"""The shards a Beam job over runs works on, as its elements name them: a path and which rows
the collection keeps, so that each worker reads its shard itself (the index build, the
duplicates by clustering)."""

from typing import FrozenSet, List, NamedTuple, Optional, Sequence

from storage.run_dirs import Run


class ShardRef(NamedTuple):
  """A shard of a run and the rows of it the collection keeps (the rule `embeddings.load`
  follows), said as its job decides them: a file of row numbers (the index) or the URIs (the
  duplicates); neither: every row."""
  run: str  # the run directory
  path: str
  number: Optional[int] = None  # its place in shard_refs; the index's ids: number << ROW_BITS | row
  kept_file: Optional[str] = None  # the rows the collection keeps (an .npy)
  vector_uris: Optional[FrozenSet[str]] = None  # the URIs whose vector is this run's


def shard_refs(runs: Sequence[Run]) -> List[ShardRef]:
  """Runs -> their shards, numbered from 0 (listed once: every later step takes these)."""
  refs = []
  for run in runs:
    for path in run.shard_paths():
      refs.append(ShardRef(run.path, path, len(refs)))
  return refs
