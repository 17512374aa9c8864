"""The collection: one versioned table (Lance) of each image URI's current vector, the state that
ties nightly runs together, for the pipeline that commits to it and every reader and follower.

A collection lives at a URI the user names (a local folder, `gs://bucket/collection`,
`s3://bucket/collection`). Each row is one image URI and the vector of its current version, with
that version's identity (size, content identity, modification time, sha256), its pixel size, the
model and recipe, the run directory that embedded it and when; a URI that is gone, or whose
current version failed to read or decode, has no row. Every change is one atomic commit, so every
reader works on one snapshot (a version), and followers (an export, the neighbour index) read
only what changed since the version they last applied.

- `table.py`: the format (schema, columns, commit messages, where the table is and how to reach
  it), `Collection` (a snapshot: streamed batches, rows by row id, lookups by URI, the changes
  since a version) and `create`.
- `night.py`: one night's commit: fragments written by the workers, rows removed by row id, one
  commit that refuses to land over another night's.
- `maintenance.py`: compaction, cleanup of old versions, the history of versions.
"""

from collection.maintenance import Cleaned, Compacted, HistoryEntry, cleanup, compact, history
from collection.night import ConcurrentNightError, NightChanges, commit_night, write_fragment
from collection.table import (COLLECTION_COLUMNS, EMBEDDED_AT, STATE_COLUMNS, Changes, Collection,
                              CollectionError, CollectionNotFoundError, CommitRecord, create,
                              open_collection, set_store_options, storage_options)
