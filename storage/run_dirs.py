"""Run directories found under paths or globs: finished (newest first), failed, and unfinished
(still going, or dead by the rule every writer and reader shares: `Unfinished.alive`).

Below both the launcher (pipeline/), which must not claim a live run's directory, and the readers
(embeddings/, jobs/), which read finished runs only. Only a run whose summary says outcome
`finished` is a source (and state for later nights): one that ended `too_many_failures` (the
launcher's exit 3) is reported and never read, as is an unfinished one (a claim, no summary).
"""

import datetime
import json
import logging
import os
import socket
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import storage
from run_format import (CLAIM_FILE, CLAIM_STALE_SECONDS, EMBEDDINGS_GLOB, FINISHED, INDEX_GLOB,
                        PARQUET_EMBEDDINGS_GLOB, SUMMARY_FILE, TFRECORD_EMBEDDINGS_GLOB,
                        TFRECORD_SUFFIXES, TOO_MANY_FAILURES, IncompatibleRunError,
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


# Runners whose job runs inside the launcher's process (or its children): alive exactly while
# that process is. Lower case: Beam reads `--runner direct` or `directrunner` as DirectRunner.
LOCAL_RUNNERS = ('directrunner', 'switchingdirectrunner', 'bundlebaseddirectrunner',
                 'fnapirunner', 'prismrunner')


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

  def _runs_in_its_launcher(self) -> bool:
    """Launched from this host on a local runner: the job is its launcher's process."""
    runner = str(self.claim.get('runner')).lower()
    return ((runner in LOCAL_RUNNERS or runner + 'runner' in LOCAL_RUNNERS) and
            self.claim.get('host') == socket.gethostname())

  def dead_because(self, now: Optional[datetime.datetime] = None) -> Optional[str]:
    """None while the run is alive; else why it counts as dead. A run launched here on a local
    runner lives as long as its launcher process (and not in this one, which is launching
    another); any other while its job keeps rewriting its claim: a sign of life less than
    CLAIM_STALE_SECONDS old (transforms/heartbeat.py). A launch asks Dataflow besides before it
    cleans a Dataflow run found dead here (pipeline/output_dir.py)."""
    if self._runs_in_its_launcher():
      if self.claim.get('pid') == os.getpid():
        return 'launched earlier by this process'
      return None if _process_running(self.claim.get('pid')) else (
          'its launcher is no longer running on this host')
    last = self.last_sign_of_life()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if last is None:
      return 'no sign of life recorded'
    if (now - last).total_seconds() < CLAIM_STALE_SECONDS:
      return None
    return f'no sign of life for {CLAIM_STALE_SECONDS // 60} min or more'

  def alive(self, now: Optional[datetime.datetime] = None) -> bool:
    return self.dead_because(now) is None

  def describe(self, now: Optional[datetime.datetime] = None) -> str:
    """Where, who, and (when its heartbeat decides) how long ago it last showed life."""
    if not self.claim:
      return f'{self.path} (no readable {CLAIM_FILE})'
    last = self.last_sign_of_life()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    age = '' if last is None or self._runs_in_its_launcher() else (
        f', last sign of life {(now - last).total_seconds() / 60:.0f} min ago')
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


def holds_run_directories(folder: str) -> bool:
  """Whether `folder` holds run directories rather than being one (what `folder/*` names)."""
  return any(storage.match(storage.join(storage.join(folder, '*'), name))
             for name in (CLAIM_FILE, SUMMARY_FILE))


def scan_runs(paths_or_globs: Sequence[str]) -> RunScan:
  """Every run under the patterns, sorted into finished, failed and unfinished; a pattern that
  names no run at all is NoRunsError."""
  finished: Dict[str, Run] = {}
  failed: Dict[str, Run] = {}
  unfinished: Dict[str, Unfinished] = {}
  for pattern in paths_or_globs:
    summaries, started = _scan_directory(pattern)
    unfinished.update((u.path, u) for u in started)
    if not summaries and not started:
      below = (f'; it holds run directories: add /* ("{pattern.rstrip("/")}/*")'
               if holds_run_directories(pattern) else '')
      raise NoRunsError(f'{pattern}: no run there (no {SUMMARY_FILE}, {CLAIM_FILE} or '
                        f'{EMBEDDINGS_GLOB} shard){below}')
    for info in summaries:
      directory = storage.dirname(info.path)
      run = Run(directory, RunSummary.from_json(storage.read_bytes(info.path), info.path))
      (finished if run.summary.outcome == FINISHED else failed)[directory] = run
  def newest_first(runs):
    return sorted(runs.values(), key=lambda r: (r.finished_at, r.path), reverse=True)
  return RunScan(newest_first(finished), newest_first(failed),
                 sorted(unfinished.values()))


def warn_of_failed(failed: Sequence[Run]) -> None:
  """One warning per run that ended other than `finished` (too many failures, or its commit to
  the collection refused): never read."""
  for run in failed:
    _LOG.warning('ignoring %s: its run ended with outcome %s%s', run.path, run.summary.outcome,
                 f' (more than --max_failed_fraction {run.summary.max_failed_fraction} of '
                 f'{run.summary.matched} images failed)'
                 if run.summary.outcome == TOO_MANY_FAILURES else '')


def _warn_of_unfinished(runs: Sequence[Unfinished]) -> None:
  for run in runs:
    _LOG.warning('ignoring %s: an unfinished run (no %s: still running, interrupted or '
                 'failed)', run.path, SUMMARY_FILE)


def find_runs(paths_or_globs: Union[str, Sequence[str]]) -> List[Run]:
  """The finished runs under run directories or globs of them, newest first (by `finished_at`).

  A run that ended too_many_failures, or a directory with a claim or shards but no
  run_summary.json (a run still going, or one that was interrupted or failed), is skipped with
  one warning each; a path that names no run at all is an error, and so is finding no finished
  run. A summary older than 0.2.0 raises run_format.IncompatibleRunError.
  """
  if isinstance(paths_or_globs, str):
    paths_or_globs = [paths_or_globs]
  scan = scan_runs(paths_or_globs)
  warn_of_failed(scan.failed)
  _warn_of_unfinished(scan.unfinished)
  if not scan.finished:
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
                           f'similarities mean nothing: {listing}. Choose one with --model '
                           'MODEL_ID')
  return list(runs)
