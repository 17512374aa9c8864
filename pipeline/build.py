"""The pipeline graph: match -> [skip what the collection holds] -> (read -> decode/resize ->
embed: the GPU step) -> write, dead letters, the index, [the collection's new rows] and the run
summary (after the night's commit) beside."""

import re
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from models.description import ModelDescription
from pipeline.options import EmbeddingOptions, shard_inputs
from pipeline.versions import CheckWorkerVersions, LaunchOptions
from run_format import RunLaunch
from transforms.decode import DecodeImages
from transforms.embed import EmbedImages, ImageEmbeddingModelHandler
from transforms.failures import FAILURES_TAG
from transforms.heartbeat import Heartbeat
from transforms.incremental import Coverage, NightState, SkipHeld
from transforms.progress import CountFailed, StartProgress
from transforms.provenance import Provenance
from transforms.read import SKIPPED_BY_NAME_TAG, MatchFiles
from transforms.shards import MEMBERS_TAG, ReadInputs
from transforms.summary import WriteRunSummary
from transforms.write import (WriteCollectionRows, WriteEmbeddings, WriteFailures, WriteIndex,
                              embedded_index_row, failed_index_row, skipped_index_row)

# The step that --inference_accelerator and --inference_min_ram put on GPU workers.
GPU_STEP = 'DecodeAndEmbed'


class DecodeAndEmbed(beam.PTransform):
  """FileRef -> Embedding (read, decode, embed), as one step, so that on Dataflow right fitting
  only file references (about 120 bytes each) cross to the GPU workers, not the files' bytes
  (380 KB on average for the sample photos) nor the decoded float32 pixels (1.3 MB each at
  331x331): the GPU workers' own CPUs read and decode (benchmarks/bench_boundary.py).
  `to_embed`: how many files it is given (a side input), for the progress lines."""

  def __init__(self, options: EmbeddingOptions, model_description: ModelDescription,
               to_embed: beam.pvalue.AsSingleton):
    super().__init__()
    self._options = options
    self._model_description = model_description
    self._to_embed = to_embed

  def expand(self, refs):
    options = self._options
    refs = (refs
            | 'CheckWorkerVersions' >> CheckWorkerVersions(
                options.view_as(LaunchOptions).launch_versions)
            | 'StartProgress' >> beam.ParDo(
                StartProgress(options.output, _one_process_embeds(options)), self._to_embed))
    # On Dataflow the GPU workers can be the only ones left working for hours.
    _ = refs | 'Heartbeat' >> Heartbeat(options.output)
    read = refs | 'ReadImages' >> ReadInputs(shard_inputs(options), options.max_file_bytes)
    decoded = read.images | 'DecodeImages' >> DecodeImages(
        self._model_description.height, self._model_description.width,
        center_crop_fraction=options.center_crop_fraction,
        max_image_pixels=options.max_image_pixels, jpeg_draft=options.jpeg_draft)
    handler = ImageEmbeddingModelHandler(
        options.model, checkpoint=options.checkpoint, seed=options.seed,
        compute_dtype=options.compute_dtype, min_batch_size=options.min_batch_size,
        max_batch_size=options.max_batch_size, large_model=options.large_model,
        model_copies=options.model_copies, jit_compile=options.jit_compile,
        model_id=self._model_description.model_id)
    embedded = decoded.decoded | 'EmbedImages' >> EmbedImages(handler)
    failures = ((read[FAILURES_TAG], decoded[FAILURES_TAG], embedded[FAILURES_TAG])
                | 'Failures' >> beam.Flatten())
    _ = failures | 'CountFailed' >> beam.ParDo(CountFailed())
    return {'embeddings': embedded['embeddings'], FAILURES_TAG: failures,
            MEMBERS_TAG: read[MEMBERS_TAG]}


def _one_process_embeds(options: EmbeddingOptions) -> bool:
  """Whether one process does all of the run's work, so that its progress is the run's: the local
  runner (no --runner) runs the pipeline in the launching process, but in its multi_processing
  mode."""
  return not options.view_as(StandardOptions).runner and \
      options.view_as(DirectOptions).direct_running_mode != 'multi_processing'


def _resource_hints(options: EmbeddingOptions) -> Dict[str, str]:
  hints = {'accelerator': options.inference_accelerator, 'min_ram': options.inference_min_ram}
  return {name: value for name, value in hints.items() if value}


def _collection_files(night: Optional[NightState]) -> List[str]:
  """The collection's own files are never images, even inside an input folder: an --exclude."""
  if night is None:
    return []
  return [re.sub(r'([*?\[\\])', r'\\\1', night.uri) + '/**']


def build_pipeline(pipeline: beam.Pipeline, options: EmbeddingOptions,
                   model_description: ModelDescription, provenance: Provenance,
                   summary_fields: RunLaunch, night: Optional[NightState] = None) -> None:
  """`summary_fields`: what run_summary.json says beside the counts (launch time, options);
  `night`: the collection this night skips against and commits to (None: a one-off run)."""
  # With a collection, the join on URI also keeps one of each URI: one shuffle, not two.
  matched = pipeline | 'MatchFiles' >> MatchFiles(
      options.input or (), options.input_manifest or (),
      list(options.exclude or ()) + _collection_files(night), options.output,
      deduplicate=night is None, include_all_files=options.include_all_files,
      shard_suffixes=shard_inputs(options).suffixes)
  refs = matched['refs'] | 'CheckWorkerVersions' >> CheckWorkerVersions(
      options.view_as(LaunchOptions).launch_versions)  # the CPU workers; the GPU step's its own
  _ = refs | 'Heartbeat' >> Heartbeat(options.output)  # the writes and the GPU step beat too
  if night is not None:
    split = ({'refs': refs, 'failures': matched[FAILURES_TAG],
              'not_listed': matched[SKIPPED_BY_NAME_TAG]}
             | 'SkipHeld' >> SkipHeld(night, provenance, Coverage(
                 options.input or (), options.exclude or (), options.include_all_files)))
    to_read, skipped, removed = split.new, split.skipped, split.removed
    refs = (to_read, skipped | 'SkippedRefs' >> beam.Map(lambda skipped: skipped.ref)) \
        | 'UniqueRefs' >> beam.Flatten()
  else:
    to_read = refs
    skipped = pipeline | 'NothingSkipped' >> beam.Create([])
    removed = pipeline | 'NothingRemoved' >> beam.Create([])
  to_embed = beam.pvalue.AsSingleton(to_read | 'CountToEmbed' >> beam.combiners.Count.Globally())
  embedded = to_read | GPU_STEP >> DecodeAndEmbed(
      options, model_description, to_embed).with_resource_hints(**_resource_hints(options))
  embeddings = embedded['embeddings']
  failures = ((matched[FAILURES_TAG], embedded[FAILURES_TAG])
              | 'AllFailures' >> beam.Flatten())

  embedding_files = embeddings | 'WriteEmbeddings' >> WriteEmbeddings(
      options.output, provenance, model_description.feature_size, num_shards=options.num_shards,
      compression=options.compression, output_format=options.output_format,
      embedding_dtype=options.embedding_dtype)
  if night is not None:
    fragments = embeddings | 'WriteCollectionRows' >> WriteCollectionRows(
        night.uri, night.storage_options, provenance, model_description.feature_size,
        options.embedding_dtype, options.output)
  else:
    fragments = pipeline | 'NoFragments' >> beam.Create([])
  failure_files = failures | 'WriteFailures' >> WriteFailures(options.output,
                                                              num_shards=options.num_shards)
  index_files = ((embeddings | 'EmbeddedRows' >> beam.Map(embedded_index_row, provenance),
                  failures | 'FailedRows' >> beam.Map(failed_index_row, provenance),
                  skipped | 'SkippedRows' >> beam.Map(skipped_index_row, provenance))
                 | 'IndexRows' >> beam.Flatten()
                 | 'WriteIndex' >> WriteIndex(options.output, provenance,
                                              num_shards=options.num_shards))
  # A shard is counted as its members, as they are read.
  all_matched = ((refs | 'MatchedUris' >> beam.FlatMap(shard_inputs(options).file_uri),
                  embedded[MEMBERS_TAG],
                  matched[FAILURES_TAG] | 'UnstatedUris' >> beam.Map(lambda failure: failure.uri))
                 | 'Matched' >> beam.Flatten())
  _ = ({'matched': all_matched, 'skipped': skipped,
        'skipped_by_name': matched[SKIPPED_BY_NAME_TAG], 'embeddings': embeddings,
        'failures': failures,
        'files': (embedding_files, failure_files, index_files) | 'Written' >> beam.Flatten(),
        'fragments': fragments, 'removed': removed}
       | 'WriteRunSummary' >> WriteRunSummary(options.output, summary_fields, night))
