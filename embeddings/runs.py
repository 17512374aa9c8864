"""Finished runs, newest first, and the rows each owns: the latest finished run wins per URI."""

import argparse
import datetime
import logging
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Union

import numpy as np
import pyarrow as pa

from embeddings import storage
from embeddings.shards import Shard, read_shard
from run_format import (EMBEDDED, EMBEDDINGS_GLOB, INDEX_GLOB, METADATA_SCHEMA,
                        PARQUET_EMBEDDINGS_GLOB, SUMMARY_FILE, TFRECORD_EMBEDDINGS_GLOB,
                        TFRECORD_SUFFIXES, IncompatibleRunError, RunSummary)

_LOG = logging.getLogger(__name__)


class NoRunsError(ValueError):
  """A path or glob names no finished run."""


class MixedModelsError(ValueError):
  """The runs hold embeddings of different models or sizes, which must not be compared."""


# What the commands report as bad --runs (exit 2).
RUN_ERRORS = (NoRunsError, MixedModelsError, IncompatibleRunError)


class Run(NamedTuple):
  path: str  # the run directory
  summary: RunSummary

  @property
  def model(self) -> str:
    return self.summary.model

  @property
  def embedding_size(self) -> int:
    return self.summary.embedding_size

  @property
  def finished_at(self) -> datetime.datetime:
    return self.summary.finished

  @property
  def index_glob(self) -> str:
    return storage.join(self.path, INDEX_GLOB)

  def shard_paths(self) -> List[str]:
    """Parquet shards when the run has them (columnar: fastest to read), else TFRecords."""
    parquet = storage.match(storage.join(self.path, PARQUET_EMBEDDINGS_GLOB))
    if parquet:
      return [f.path for f in parquet]
    return [f.path for f in storage.match(storage.join(self.path, TFRECORD_EMBEDDINGS_GLOB))
            if f.path.endswith(TFRECORD_SUFFIXES)]

  def indexed_uris(self) -> Set[str]:
    """The URIs the run embedded, from its index without reading any vector."""
    import pyarrow.parquet as pq
    uris = set()
    for index in storage.match(self.index_glob):
      with storage.open_file(index.path) as f:
        table = pq.ParquetFile(f).read(columns=['uri', 'outcome']).to_pydict()
      uris.update(u for u, o in zip(table['uri'], table['outcome']) if o == EMBEDDED)
    return uris


class Embeddings(NamedTuple):
  uris: List[str]
  vectors: np.ndarray  # float32 [images, dimension]
  metadata: pa.Table  # one row per URI, in the same order (see run_format.METADATA_SCHEMA)
  model: str


def _run_directories(pattern: str) -> tuple:
  """(finished runs as summary FileInfos, directories holding shards but no summary)."""
  directory = pattern.rstrip('/')
  if storage.basename(directory) == SUMMARY_FILE:
    directory = storage.dirname(directory)
  summaries = storage.match(storage.join(directory, SUMMARY_FILE))
  finished = {storage.dirname(s.path) for s in summaries}
  unfinished = sorted({storage.dirname(f.path)
                       for f in storage.match(storage.join(directory, EMBEDDINGS_GLOB))}
                      - finished)
  return summaries, unfinished


def find_runs(paths_or_globs: Union[str, Sequence[str]], missing_ok: bool = False) -> List[Run]:
  """The finished runs under run directories or globs of them, newest first (by `finished_at`).

  A directory with shards but no run_summary.json (a run still going, or one that failed) is
  skipped with a warning; a path that names no run at all is an error unless `missing_ok` (as for
  --incremental_from before the first run). A summary older than 0.2.0 raises
  run_format.IncompatibleRunError.
  """
  if isinstance(paths_or_globs, str):
    paths_or_globs = [paths_or_globs]
  runs: Dict[str, Run] = {}
  for pattern in paths_or_globs:
    summaries, unfinished = _run_directories(pattern)
    for directory in unfinished:
      _LOG.warning('ignoring %s: it has no %s, so the run is unfinished or failed',
                   directory, SUMMARY_FILE)
    if not summaries and not unfinished and not missing_ok:
      raise NoRunsError(f'{pattern}: no run there (no {SUMMARY_FILE} and no {EMBEDDINGS_GLOB} '
                        'shard)')
    for info in summaries:
      directory = storage.dirname(info.path)
      runs[directory] = Run(directory, RunSummary.from_json(storage.read_bytes(info.path),
                                                            info.path))
  if not runs and not missing_ok:
    raise NoRunsError(f'no finished run in {", ".join(paths_or_globs)}')
  return sorted(runs.values(), key=lambda r: (r.finished_at, r.path), reverse=True)


def select_model(runs: Sequence[Run], model: Optional[str] = None) -> List[Run]:
  """The runs of one model: `model`, or the only one the runs hold."""
  if model is not None:
    chosen = [r for r in runs if r.model == model]
    if not chosen:
      raise MixedModelsError(f'no run of model {model!r}; the runs hold '
                             f'{sorted({r.model for r in runs})}')
    skipped = len(runs) - len(chosen)
    if skipped:
      _LOG.info('model %s: leaving out %d run(s) of other models', model, skipped)
    runs = chosen
  kinds = sorted({(r.model, r.embedding_size) for r in runs}, key=str)
  if len(kinds) > 1:
    listing = '; '.join(f'{m} ({s}-d): ' + ', '.join(r.path for r in runs
                                                      if (r.model, r.embedding_size) == (m, s))
                        for m, s in kinds)
    raise MixedModelsError(f'the runs hold embeddings of different models or sizes, whose '
                           f'similarities mean nothing: {listing}. Choose one with model=... '
                           f'(--model on the command line)')
  return list(runs)


def _check_shard(shard: Shard, run: Run) -> None:
  models = set(shard.metadata.column('model').unique().to_pylist()) - {None}
  size = run.embedding_size
  dimension = shard.vectors.shape[1]  # 0 when only metadata columns were read
  if models - {run.model} or (dimension and dimension != size):
    raise MixedModelsError(f'{shard.path} holds {sorted(models)} {dimension}-d '
                           f'embeddings, but its run_summary.json says {run.model} {size}-d')


def iter_run_shards(runs: Sequence[Run], columns: Optional[Sequence[str]] = None
                    ) -> Iterator[Shard]:
  """Each shard's rows that no newer run has: runs must be newest first (as find_runs gives).

  Holds one shard at a time, plus the set of URIs seen so far when there are several runs. A run
  whose index shows nothing left to contribute is not read at all.
  """
  seen: Set[str] = set()
  for number, run in enumerate(runs):
    if number:
      if not run.indexed_uris() - seen:
        _LOG.info('skipping %s: every URI it embedded is in a newer run', run.path)
        continue
    for path in run.shard_paths():
      shard = read_shard(path, run.path, columns)
      _check_shard(shard, run)
      if len(runs) > 1:
        keep = np.array([u not in seen for u in shard.uris], dtype=bool)
        seen.update(shard.uris)
        shard = shard.select(keep) if not keep.all() else shard
      if shard.uris:
        yield shard


def _as_list(paths_or_globs: Union[str, Sequence[str]]) -> List[str]:
  return [paths_or_globs] if isinstance(paths_or_globs, str) else list(paths_or_globs)


def iter_shards(paths_or_globs: Union[str, Sequence[str]], model: Optional[str] = None
                ) -> Iterator[Shard]:
  """Shard by shard (for collections larger than memory): each URI once, from the latest
  finished run that embedded it. Refuses runs of different models unless `model` picks one."""
  return iter_run_shards(select_model(find_runs(_as_list(paths_or_globs)), model))


def concatenate(shards: Iterable[Shard], model: str) -> Embeddings:
  uris, vectors, tables = [], [], []
  for shard in shards:
    uris += shard.uris
    vectors.append(shard.vectors)
    tables.append(shard.metadata)
  if not vectors:
    return Embeddings([], np.zeros((0, 0), np.float32), METADATA_SCHEMA.empty_table(), model)
  return Embeddings(uris, np.concatenate(vectors), pa.concat_tables(tables), model)


def load(paths_or_globs: Union[str, Sequence[str]], model: Optional[str] = None) -> Embeddings:
  """Every URI's latest embedding from one or many runs, in memory."""
  runs = select_model(find_runs(_as_list(paths_or_globs)), model)
  return concatenate(iter_run_shards(runs), runs[0].model)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
  """The options the commands over runs share: --runs and --model; other --flags are Beam's."""
  parser = argparse.ArgumentParser(
      prog=prog, description=description,
      epilog='Other --flags go to Beam\'s FileSystems, e.g. --s3_endpoint_url=URL '
      '--s3_region_name=REGION for s3:// paths.')
  parser.add_argument('--runs', nargs='+', required=True,
                      help='run directories or globs of them (local, gs://, s3://)')
  parser.add_argument('--model', help='the model id to use when the runs hold several')
  return parser


def parse_command(parser: argparse.ArgumentParser,
                  argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parsed options; the flags the parser does not know configure Beam's FileSystems."""
  args, filesystem_flags = parser.parse_known_args(argv)  # Beam warns of any it discards
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
  storage.set_filesystem_options(filesystem_flags)
  return args
