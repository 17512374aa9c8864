"""File names, globs and outcomes of a run directory."""

CLAIM_FILE = 'run_claim.json'  # created atomically before any work: one run per directory
SUMMARY_FILE = 'run_summary.json'  # written last, by the job: the run finished

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
# Every file a run writes: what makes a directory hold a run, and what cleaning one deletes.
RUN_FILES = (EMBEDDINGS_GLOB, FAILURES_GLOB, shard_glob(INDEX_PREFIX), SUMMARY_FILE, CLAIM_FILE)

# What became of a matched file: the index's `outcome`; a failure's `stage` is one of STAGES.
EMBEDDED = 'embedded'
SKIPPED = 'skipped'  # an earlier finished run had it (--incremental_from)
READ = 'read'
DECODE = 'decode'
INFERENCE = 'inference'
STAGES = (READ, DECODE, INFERENCE)
