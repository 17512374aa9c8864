"""Finished runs, newest first, and the rows each owns: the latest finished run wins per URI."""

import argparse
import datetime
import json
import logging
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Union

import numpy as np
import pyarrow as pa

from embeddings import storage
from embeddings.shards import METADATA_SCHEMA, Shard, read_shard

SUMMARY_FILE = 'run_summary.json'
_LOG = logging.getLogger(__name__)


class NoRunsError(ValueError):
  """A path or glob names no finished run."""


class MixedModelsError(ValueError):
  """The runs hold embeddings of different models or sizes, which must not be compared."""


class Run(NamedTuple):
  path: str  # the run directory
  summary: dict
  finished_at: datetime.datetime  # UTC: `finished_at`, else the summary file's modification time

  @property
  def model(self) -> str:
    return self.summary.get('model', '')

  @property
  def embedding_size(self) -> Optional[int]:
    return self.summary.get('embedding_size')

  def shard_paths(self) -> List[str]:
    """Parquet shards when the run has them (columnar: fastest to read), else TFRecords."""
    parquet = storage.match(storage.join(self.path, 'embeddings-*.parquet'))
    if parquet:
      return [f.path for f in parquet]
    return [f.path for f in storage.match(storage.join(self.path, 'embeddings-*.tfrecord*'))
            if f.path.endswith(('.tfrecord', '.tfrecord.gz'))]

  def indexed_uris(self) -> Optional[Set[str]]:
    """The URIs the run embedded, from its index-*.parquet without reading any vector; None
    when the run has no index."""
    indexes = storage.match(storage.join(self.path, 'index-*.parquet'))
    if not indexes:
      return None
    import pyarrow.parquet as pq
    uris = set()
    for index in indexes:
      with storage.open_file(index.path) as f:
        table = pq.ParquetFile(f).read(columns=['uri', 'outcome']).to_pydict()
      uris.update(u for u, o in zip(table['uri'], table['outcome']) if o == 'embedded')
    return uris


class Embeddings(NamedTuple):
  uris: List[str]
  vectors: np.ndarray  # float32 [images, dimension]
  metadata: pa.Table  # one row per URI, in the same order (see shards.METADATA_SCHEMA)
  model: str


def _parse_time(text: str) -> datetime.datetime:
  parsed = datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))
  return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _run_directories(pattern: str) -> tuple:
  """(finished runs as summary FileInfos, directories holding shards but no summary)."""
  directory = pattern.rstrip('/')
  if storage.basename(directory) == SUMMARY_FILE:
    directory = storage.dirname(directory)
  summaries = storage.match(storage.join(directory, SUMMARY_FILE))
  finished = {storage.dirname(s.path) for s in summaries}
  unfinished = sorted({storage.dirname(f.path)
                       for f in storage.match(storage.join(directory, 'embeddings-*'))}
                      - finished)
  return summaries, unfinished


def find_runs(paths_or_globs: Union[str, Sequence[str]]) -> List[Run]:
  """The finished runs under run directories or globs of them, newest first.

  A directory with shards but no run_summary.json (a run still going, or one that failed) is
  skipped with a warning; a path that names no run at all is an error.
  """
  if isinstance(paths_or_globs, str):
    paths_or_globs = [paths_or_globs]
  runs: Dict[str, Run] = {}
  for pattern in paths_or_globs:
    summaries, unfinished = _run_directories(pattern)
    for directory in unfinished:
      _LOG.warning('ignoring %s: it has no %s, so the run is unfinished or failed',
                   directory, SUMMARY_FILE)
    if not summaries and not unfinished:
      raise NoRunsError(f'{pattern}: no run there (no {SUMMARY_FILE} and no embeddings-* shard)')
    for info in summaries:
      summary = json.loads(storage.read_bytes(info.path))
      finished = summary.get('finished_at')
      directory = storage.dirname(info.path)
      runs[directory] = Run(directory, summary,
                            _parse_time(finished) if finished else info.modified)
  if not runs:
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
  if models - {run.model} or (size is not None and dimension and dimension != size):
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
      indexed = run.indexed_uris()
      if indexed is not None and not indexed - seen:
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
