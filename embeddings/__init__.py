"""Reading vectors back: a collection's (one snapshot), neighbours, duplicates, the browse page.

    import embeddings
    collection = embeddings.load('gs://bucket/collection')  # or version=N: that snapshot
    collection.uris, collection.vectors, collection.metadata.to_pandas()
    for shard in embeddings.iter_shards('gs://bucket/collection'):  # memory: one batch
      ...

`load_run(path)` reads one run directory made without a collection. No Beam needed to import
this package; gs:// and s3:// paths go through Beam's FileSystems, the collection through Lance.
"""

from collection import CollectionError, CollectionNotFoundError
from embeddings.runs import Embeddings, iter_run_shards, iter_shards, load, load_run
from embeddings.shards import CorruptShardError, Shard
from run_format import METADATA_SCHEMA, IncompatibleRunError
from storage.run_dirs import MixedModelsError, NoRunsError, Run, find_runs, select_model

__all__ = ['CollectionError', 'CollectionNotFoundError', 'CorruptShardError', 'Embeddings',
           'IncompatibleRunError', 'METADATA_SCHEMA', 'MixedModelsError', 'NoRunsError', 'Run',
           'Shard', 'find_runs', 'iter_run_shards', 'iter_shards', 'load', 'load_run',
           'select_model']
