"""The rows each finished run holds that a collection of them keeps: per URI, the latest finished
run that looked at it decides (embeddings/collection.py); the runs themselves are found by
storage/run_dirs.py."""

import logging
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import pyarrow as pa

from embeddings.collection import vector_sources
from embeddings.shards import ParquetVectors, Shard, is_parquet, read_shard
from run_format import METADATA_SCHEMA
from storage.run_dirs import MixedModelsError, Run, find_runs, select_model

_LOG = logging.getLogger(__name__)


class Embeddings(NamedTuple):
  uris: List[str]
  vectors: np.ndarray  # float32 [images, dimension]
  metadata: pa.Table  # one row per URI, in the same order (see run_format.METADATA_SCHEMA)
  model: str


def _check_models(path: str, models: set, dimension: int, run: Run) -> None:
  """`dimension` 0: not known (only metadata columns were read)."""
  size = run.embedding_size
  if models - {None, run.model} or (dimension and dimension != size):
    raise MixedModelsError(f'{path} holds {sorted(models - {None})} {dimension}-d '
                           f'embeddings, but its run_summary.json says {run.model} {size}-d')


def _check_shard(shard: Shard, run: Run) -> None:
  _check_models(shard.path, set(shard.metadata.column('model').unique().to_pylist()),
                shard.vectors.shape[1], run)


def _run_shard_paths(runs: Sequence[Run],
                     history: bool) -> Iterator[Tuple[Run, str, Optional[Set[str]]]]:
  """(run, shard path, the URIs still wanted from the run, or None for all of them): the caller
  removes from that set the URIs it found in the shard."""
  sources = vector_sources(runs, history) if len(runs) > 1 else None
  for run in runs:
    wanted = None if sources is None else sources[run.path]
    if wanted is not None and not wanted:
      _LOG.info('not reading %s: none of its embeddings is the latest of its URI', run.path)
      continue
    for path in run.shard_paths():
      yield run, path, wanted
    if wanted:
      _LOG.warning('%s: %d URI(s) its index says it embedded are in no shard (e.g. %s)',
                   run.path, len(wanted), min(wanted))


def _kept(uris: Sequence[str], wanted: Optional[Set[str]]) -> Optional[np.ndarray]:
  """The rows the collection keeps (None: all), taking them out of `wanted`."""
  if wanted is None:
    return None
  keep = np.array([u in wanted for u in uris], dtype=bool)
  wanted.difference_update(uris)
  return None if keep.all() else keep


def iter_run_shards(runs: Sequence[Run], columns: Optional[Sequence[str]] = None,
                    history: bool = False) -> Iterator[Shard]:
  """The rows of each shard that the collection keeps (embeddings/collection.py; `history`:
  each URI's newest embedding); runs must be newest first, as find_runs gives them.

  Holds one shard at a time, plus, over several runs, the URIs each run supplies (decided from
  the indexes first). A run that supplies none is not read at all.
  """
  for run, path, wanted in _run_shard_paths(runs, history):
    shard = read_shard(path, run.path, columns)
    _check_shard(shard, run)
    keep = _kept(shard.uris, wanted)
    shard = shard.select(keep) if keep is not None else shard
    if shard.uris:
      yield shard


class KeptVectors(NamedTuple):
  """A Parquet shard to read by parts, and the rows of it the collection keeps."""
  shard: ParquetVectors
  keep: Optional[np.ndarray]  # bool per row; None: every row


def iter_run_vectors(runs: Sequence[Run],
                     history: bool = False) -> Iterator[Union[Shard, KeptVectors]]:
  """As iter_run_shards, for search: a Parquet shard is not read but opened (its footer checked),
  and, over several runs, its URI column read to say which rows are kept; a TFRecord shard,
  which can only be read whole, comes as a Shard."""
  for run, path, wanted in _run_shard_paths(runs, history):
    if not is_parquet(path):
      shard = read_shard(path, run.path)
      _check_shard(shard, run)
      keep = _kept(shard.uris, wanted)
      shard = shard.select(keep) if keep is not None else shard
      if shard.uris:
        yield shard
      continue
    vectors = ParquetVectors.open(path, run.path)
    models = vectors.models
    if models is None:
      models = set(read_shard(path, run.path, ['model']).metadata.column('model').unique()
                   .to_pylist())
    _check_models(path, models, vectors.dimension, run)
    keep = None if wanted is None else _kept(read_shard(path, run.path, ['uri']).uris, wanted)
    if vectors.num_rows and (keep is None or keep.any()):
      yield KeptVectors(vectors, keep)


def _as_list(paths_or_globs: Union[str, Sequence[str]]) -> List[str]:
  return [paths_or_globs] if isinstance(paths_or_globs, str) else list(paths_or_globs)


def iter_shards(paths_or_globs: Union[str, Sequence[str]], model: Optional[str] = None,
                history: bool = False) -> Iterator[Shard]:
  """Shard by shard (for collections larger than memory): each URI once, with the vector the
  latest finished run that looked at it decides (none if it failed there or is gone from the
  inputs); `history`: each URI's newest embedding, whatever later runs found. Refuses runs of
  different models unless `model` picks one."""
  return iter_run_shards(select_model(find_runs(_as_list(paths_or_globs)), model),
                         history=history)


def concatenate(shards: Iterable[Shard], model: str, embedding_size: int = 0) -> Embeddings:
  """`embedding_size`: the vectors' width when there is no shard (an empty collection)."""
  uris, vectors, tables = [], [], []
  for shard in shards:
    uris += shard.uris
    vectors.append(shard.vectors)
    tables.append(shard.metadata)
  if not vectors:
    return Embeddings([], np.zeros((0, embedding_size), np.float32),
                      METADATA_SCHEMA.empty_table(), model)
  return Embeddings(uris, np.concatenate(vectors), pa.concat_tables(tables), model)


def load(paths_or_globs: Union[str, Sequence[str]], model: Optional[str] = None,
         history: bool = False) -> Embeddings:
  """The collection of one or many runs, in memory: as iter_shards, at once."""
  runs = select_model(find_runs(_as_list(paths_or_globs)), model)
  return concatenate(iter_run_shards(runs, history=history), runs[0].model,
                     runs[0].embedding_size)
