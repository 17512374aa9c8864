"""Reading the pipeline's runs back: vectors with their URIs and metadata, neighbours, duplicates.

    import embeddings
    collection = embeddings.load(['gs://bucket/embeddings/run1', 'gs://bucket/embeddings/run2'])
    collection.uris, collection.vectors, collection.metadata.to_pandas()

No Beam needed to import this package; gs:// and s3:// paths go through Beam's FileSystems.
"""

from embeddings.runs import Embeddings, iter_shards, load
from embeddings.shards import CorruptShardError, Shard
from run_format import METADATA_SCHEMA, IncompatibleRunError
from storage.run_dirs import MixedModelsError, NoRunsError, Run, find_runs, select_model

__all__ = ['CorruptShardError', 'Embeddings', 'IncompatibleRunError', 'METADATA_SCHEMA',
           'MixedModelsError', 'NoRunsError', 'Run', 'Shard', 'find_runs', 'iter_shards', 'load',
           'select_model']
