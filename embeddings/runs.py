"""Finished runs, newest first, and the rows each holds that a collection of them keeps: per URI,
the latest finished run that looked at it decides (embeddings/collection.py).

Only a run whose summary says outcome `finished` is a source (and state for later nights): one
that ended `too_many_failures` (the launcher's exit 3: most often a broken decoder, a wrong model
or unreadable storage) is reported and never read, as is an unfinished one (a claim, no summary).
"""

import argparse
import datetime
import json
import logging
import os
import socket
from typing import (Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple,
                    Union)

import numpy as np
import pyarrow as pa

from embeddings import storage
from embeddings.collection import vector_sources
from embeddings.shards import ParquetVectors, Shard, is_parquet, read_shard
from run_format import (CLAIM_FILE, CLAIM_STALE_SECONDS, EMBEDDINGS_GLOB, FINISHED, INDEX_GLOB,
                        METADATA_SCHEMA, PARQUET_EMBEDDINGS_GLOB, SUMMARY_FILE,
                        TFRECORD_EMBEDDINGS_GLOB, TFRECORD_SUFFIXES, IncompatibleRunError,
                        RunSummary)

_LOG = logging.getLogger(__name__)


class NoRunsError(ValueError):
  """A path or glob names no finished run, or cannot be listed."""


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


class Embeddings(NamedTuple):
  uris: List[str]
  vectors: np.ndarray  # float32 [images, dimension]
  metadata: pa.Table  # one row per URI, in the same order (see run_format.METADATA_SCHEMA)
  model: str


# Runners whose job runs inside the launcher's process (or its children): alive exactly while
# that process is.
LOCAL_RUNNERS = ('DirectRunner', 'SwitchingDirectRunner', 'BundleBasedDirectRunner',
                 'FnApiRunner', 'PrismRunner')


def _timestamp(text) -> Optional[datetime.datetime]:
  try:
    parsed = datetime.datetime.fromisoformat(str(text).replace('Z', '+00:00'))
  except ValueError:
    return None
  return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _process_running(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  except (TypeError, ValueError):
    return False
  return True


class Unfinished(NamedTuple):
  """A directory holding a claim or shards but no summary: a run still going, or a dead one."""
  path: str
  claim: Dict  # the claim's content (the launch record, host, pid, heartbeat_at); {} if none

  def last_sign_of_life(self) -> Optional[datetime.datetime]:
    """The newest of the launch (`started_at`) and the job's last heartbeat (`heartbeat_at`)."""
    times = [t for t in (_timestamp(self.claim.get(name)) for name in ('started_at',
                                                                       'heartbeat_at')) if t]
    return max(times) if times else None

  def alive(self, now: Optional[datetime.datetime] = None) -> bool:
    """A run launched here on a local runner lives as long as its launcher process (and not in
    this one, which is launching another); any other, while its job keeps rewriting its claim:
    a sign of life less than CLAIM_STALE_SECONDS old (transforms/heartbeat.py)."""
    if (self.claim.get('runner') in LOCAL_RUNNERS and
        self.claim.get('host') == socket.gethostname()):
      return self.claim.get('pid') != os.getpid() and _process_running(self.claim.get('pid'))
    last = self.last_sign_of_life()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return last is not None and (now - last).total_seconds() < CLAIM_STALE_SECONDS

  def describe(self, now: Optional[datetime.datetime] = None) -> str:
    if not self.claim:
      return f'{self.path} (no readable {CLAIM_FILE})'
    last = self.last_sign_of_life()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    age = '' if last is None else (f', last sign of life '
                                   f'{(now - last).total_seconds() / 60:.0f} min ago')
    return (f'{self.path} (claimed by {self.claim.get("host", "?")} pid '
            f'{self.claim.get("pid", "?")}, runner {self.claim.get("runner", "?")}{age})')


def _read_claim(directory: str) -> Dict:
  try:
    claim = json.loads(storage.read_bytes(storage.join(directory, CLAIM_FILE)))
  except (OSError, ValueError):
    return {}
  return claim if isinstance(claim, dict) else {}


class RunScan(NamedTuple):
  finished: List[Run]  # outcome "finished", newest first: the sources and the state
  failed: List[Run]  # a summary with another outcome (too_many_failures): never read
  unfinished: List[Unfinished]


def _scan_directory(pattern: str) -> tuple:
  """(summaries as FileInfos, unfinished runs) of one run directory or glob of them; a pattern
  its FileSystem cannot list (no such bucket, no access, no network) is NoRunsError."""
  from apache_beam.io.filesystem import BeamIOError
  directory = pattern.rstrip('/')
  if storage.basename(directory) == SUMMARY_FILE:
    directory = storage.dirname(directory)
  try:
    summaries = storage.match(storage.join(directory, SUMMARY_FILE))
    claims = {storage.dirname(c.path)
              for c in storage.match(storage.join(directory, CLAIM_FILE))}
    shards = storage.match(storage.join(directory, EMBEDDINGS_GLOB))
  except BeamIOError as exc:
    raise NoRunsError(f'{pattern}: cannot be listed ({exc}): check the bucket\'s name, your '
                      f'credentials and the network') from exc
  finished = {storage.dirname(s.path) for s in summaries}
  started = claims | {storage.dirname(f.path) for f in shards}
  return summaries, [Unfinished(path, _read_claim(path) if path in claims else {})
                     for path in sorted(started - finished)]


def scan_runs(paths_or_globs: Sequence[str], missing_ok: bool = False) -> RunScan:
  """Every run under the patterns, sorted into finished, failed and unfinished; a pattern that
  names no run at all is NoRunsError unless `missing_ok`."""
  finished: Dict[str, Run] = {}
  failed: Dict[str, Run] = {}
  unfinished: Dict[str, Unfinished] = {}
  for pattern in paths_or_globs:
    summaries, started = _scan_directory(pattern)
    unfinished.update((u.path, u) for u in started)
    if not summaries and not started and not missing_ok:
      raise NoRunsError(f'{pattern}: no run there (no {SUMMARY_FILE}, {CLAIM_FILE} or '
                        f'{EMBEDDINGS_GLOB} shard)')
    for info in summaries:
      directory = storage.dirname(info.path)
      run = Run(directory, RunSummary.from_json(storage.read_bytes(info.path), info.path))
      (finished if run.summary.outcome == FINISHED else failed)[directory] = run
  def newest_first(runs):
    return sorted(runs.values(), key=lambda r: (r.finished_at, r.path), reverse=True)
  return RunScan(newest_first(finished), newest_first(failed),
                 sorted(unfinished.values()))


def warn_of_failed(failed: Sequence[Run]) -> None:
  """One warning per run that finished over its failure bound: never read."""
  for run in failed:
    _LOG.warning('ignoring %s: its run ended with outcome %s (more than --max_failed_fraction '
                 '%s of %d images failed), so it is neither a source nor state; its images are '
                 'embedded again by the next run', run.path, run.summary.outcome,
                 run.summary.max_failed_fraction, run.summary.matched)


def _warn_of_unfinished(runs: Sequence[Unfinished]) -> None:
  for run in runs:
    _LOG.warning('ignoring %s: an unfinished run (no %s: still running, interrupted or '
                 'failed)', run.path, SUMMARY_FILE)


def find_runs(paths_or_globs: Union[str, Sequence[str]], missing_ok: bool = False) -> List[Run]:
  """The finished runs under run directories or globs of them, newest first (by `finished_at`).

  A run that ended too_many_failures, or a directory with a claim or shards but no
  run_summary.json (a run still going, or one that was interrupted or failed), is skipped with
  one warning each; a path that names no run at all is an error unless `missing_ok` (as for
  --incremental_from before the first run), and so is finding no finished run. A summary older
  than 0.2.0 raises run_format.IncompatibleRunError.
  """
  if isinstance(paths_or_globs, str):
    paths_or_globs = [paths_or_globs]
  scan = scan_runs(paths_or_globs, missing_ok)
  warn_of_failed(scan.failed)
  _warn_of_unfinished(scan.unfinished)
  if not scan.finished and not missing_ok:
    held = [f'{u.path} holds an unfinished run (no {SUMMARY_FILE}: still running, interrupted '
            'or failed)' for u in scan.unfinished] + [
                f'{r.path} ended {r.summary.outcome}' for r in scan.failed]
    raise NoRunsError(f'no finished run in {", ".join(paths_or_globs)}'
                      + (f': {"; ".join(held)}' if held else ''))
  return scan.finished


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


def command_parser(prog: str, description: str,
                   runs_required: bool = True) -> argparse.ArgumentParser:
  """The options the commands over runs share: --runs and --model; other --flags are Beam's."""
  parser = argparse.ArgumentParser(
      prog=prog, description=description,
      epilog='Other --flags go to Beam\'s FileSystems, e.g. --s3_endpoint_url=URL '
      '--s3_region_name=REGION for s3:// paths.')
  parser.add_argument('--runs', nargs='+', required=runs_required,
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


def parse_job_command(parser: argparse.ArgumentParser,
                      argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[str]]:
  """(parsed options, the other flags) of a command that runs a Beam job: those other flags go to
  Beam, which drops what it does not know, so a misspelt one is refused here, with a suggestion."""
  args, beam_flags = parser.parse_known_args(argv)
  from pipeline.options import OptionsError, check_known_flags
  try:
    check_known_flags(beam_flags, parser.prog,
                      [o for a in parser._actions for o in a.option_strings])  # pylint: disable=protected-access
  except OptionsError as exc:
    parser.error(str(exc))
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
  storage.set_filesystem_options(beam_flags)
  return args, beam_flags
