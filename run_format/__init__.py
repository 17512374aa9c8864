"""The run directory's format, for the writer (transforms/, pipeline/) and every reader (embeddings/).

A run directory holds `run_claim.json` (written first), `embeddings-SSSSS-of-NNNNN.tfrecord[.gz]`
and/or `.parquet`, `failures-SSSSS-of-NNNNN.jsonl` (only when something failed),
`index-SSSSS-of-NNNNN.parquet` and `run_summary.json` (written last: its presence marks a finished
run). `layout` names the files and outcomes, `columns` the embeddings' columns and the index, and
`summary` the summary's fields.

Compatibility: this version reads runs written by pnasnet-embeddings 0.2.0 and later. Those always
have an index and a summary with `finished_at` and the model's options; a summary without them
(0.1.0) is refused with IncompatibleRunError. A summary field added since (`outcome`,
`embedding_dtype`, `skipped_by_name`, ...) has a default, which an older summary reads as (for
`skipped_by_name`, 0: those runs skipped nothing by name). Needs only pyarrow and the standard
library.
"""

from run_format.columns import (COLUMNS, EMBEDDING, EMBEDDING_DTYPES, EMBEDDING_FLOAT16,
                                INDEX_SCHEMA, METADATA_COLUMNS,
                                METADATA_SCHEMA, RUN_COLUMN, Column, embedding_type,
                                embeddings_schema, example_vectors, from_example_batch, to_example_batch)
from run_format.layout import (CLAIM_FILE, CLAIM_STALE_SECONDS, DECODE, EMBEDDED, EMBEDDINGS_GLOB, EMBEDDINGS_PREFIX,
                               FAILED,
                               FAILURES_GLOB, FAILURES_PREFIX, FAILURES_SUFFIX, FINISHED,
                               GZIP_SUFFIX, HEARTBEAT_SECONDS, INDEX_GLOB, INDEX_PREFIX, INFERENCE,
                               PARQUET_EMBEDDINGS_GLOB, PARQUET_SUFFIX, READ, RUN_FILES,
                               SHARD_NAME, SKIPPED, STAGES, SUMMARY_FILE, TEMP_FOLDER_NAME,
                               TEMP_FOLDERS, TFRECORD_EMBEDDINGS_GLOB, TFRECORD_SUFFIXES,
                               TOO_MANY_FAILURES, outcome, run_file_name, shard_glob,
                               tfrecord_suffix)
from run_format.summary import IncompatibleRunError, RunLaunch, RunSummary, utc_now
