"""File names, globs and outcomes of a run directory."""

import re
from typing import Optional, Pattern

CLAIM_FILE = 'run_claim.json'  # created atomically before any work: one run per directory
SUMMARY_FILE = 'run_summary.json'  # written last, by the job: the run finished
# The job rewrites its claim (same content, plus `heartbeat_at`) every HEARTBEAT_SECONDS while it
# runs: a claim without a summary whose `started_at` and `heartbeat_at` are both more than
# CLAIM_STALE_SECONDS old belongs to a dead run (transforms/heartbeat.py, storage/run_dirs.py),
# a Dataflow one once Dataflow says its job has ended (pipeline/dataflow_jobs.py).
HEARTBEAT_SECONDS = 300
CLAIM_STALE_SECONDS = 3600

EMBEDDINGS_PREFIX = 'embeddings'
FAILURES_PREFIX = 'failures'
INDEX_PREFIX = 'index'
SHARD_NAME = '-SSSSS-of-NNNNN'  # Beam's shard name template: shard number, shard count
TFRECORD_SUFFIXES = ('.tfrecord', '.tfrecord.gz')
GZIP_SUFFIX = '.gz'
PARQUET_SUFFIX = '.parquet'  # embeddings and index
FAILURES_SUFFIX = '.jsonl'  # one Failure as JSON a line
TEMP_FOLDERS = 'beam-temp-*'  # where Beam's sinks write shards before finalizing them


def shard_glob(prefix: str, suffix: str = '') -> str:
  return f'{prefix}-*{suffix}'


def tfrecord_suffix(gzip: bool) -> str:
  return TFRECORD_SUFFIXES[0] + (GZIP_SUFFIX if gzip else '')


EMBEDDINGS_GLOB = shard_glob(EMBEDDINGS_PREFIX)
PARQUET_EMBEDDINGS_GLOB = shard_glob(EMBEDDINGS_PREFIX, PARQUET_SUFFIX)
TFRECORD_EMBEDDINGS_GLOB = shard_glob(EMBEDDINGS_PREFIX, TFRECORD_SUFFIXES[0] + '*')
FAILURES_GLOB = shard_glob(FAILURES_PREFIX)
INDEX_GLOB = shard_glob(INDEX_PREFIX, PARQUET_SUFFIX)
# Every file a run writes: what makes a directory hold a run, and what cleaning one deletes,
# matched first by these globs, then by name exactly (run_file_name).
RUN_FILES = (EMBEDDINGS_GLOB, FAILURES_GLOB, shard_glob(INDEX_PREFIX), SUMMARY_FILE, CLAIM_FILE)
_SHARD_NUMBERS = r'-\d{5,}-of-\d{5,}'  # what Beam makes of SHARD_NAME
# Beam's sinks write under beam-temp-<file prefix>-<uuid1().hex> before finalizing.
TEMP_FOLDER_NAME = re.compile(
    f'beam-temp-(?:{EMBEDDINGS_PREFIX}|{FAILURES_PREFIX}|{INDEX_PREFIX})-[0-9a-f]{{32}}')


def _shard_names(prefix: str, suffixes) -> str:
  return re.escape(prefix) + _SHARD_NUMBERS + '(?:' + '|'.join(map(re.escape, suffixes)) + ')'


def run_file_name(output_format: Optional[str] = None) -> Pattern:
  """Exactly the names a run gives the files at the top of its directory (a user's
  `index-01.jpg` is none of them); with `output_format`, only its embeddings' suffixes."""
  embeddings = {'tfrecord': TFRECORD_SUFFIXES, 'parquet': (PARQUET_SUFFIX,)}.get(
      output_format, TFRECORD_SUFFIXES + (PARQUET_SUFFIX,))
  return re.compile('|'.join([
      _shard_names(EMBEDDINGS_PREFIX, embeddings), _shard_names(FAILURES_PREFIX, (FAILURES_SUFFIX,)),
      _shard_names(INDEX_PREFIX, (PARQUET_SUFFIX,)), re.escape(SUMMARY_FILE),
      re.escape(CLAIM_FILE)]))


# The summary's outcome: within --max_failed_fraction, or not (the launcher's exit 3); or the
# night's work done but its commit to --collection refused (another night committed: exit 1).
FINISHED = 'finished'
TOO_MANY_FAILURES = 'too_many_failures'
FAILED = 'failed'


def outcome(matched: int, failed: int, max_failed_fraction: float) -> str:
  return TOO_MANY_FAILURES if failed > max_failed_fraction * matched else FINISHED

# What became of a matched file: the index's `outcome`; a failure's `stage` is one of STAGES.
EMBEDDED = 'embedded'
SKIPPED = 'skipped'  # --collection holds this version already: not read
READ = 'read'
DECODE = 'decode'
INFERENCE = 'inference'
STAGES = (READ, DECODE, INFERENCE)
