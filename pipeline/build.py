"""The pipeline graph: read -> decode/resize -> embed -> write, dead letters beside."""

import apache_beam as beam

from pipeline.options import EmbeddingOptions
from transforms.decode import DecodeImages
from transforms.embed import EmbedImages, ImageEmbeddingModelHandler
from transforms.failures import FAILURES_TAG
from transforms.models import ModelDescription
from transforms.read import ReadImages
from transforms.write import WriteEmbeddings, WriteFailures


def build_pipeline(pipeline: beam.Pipeline, options: EmbeddingOptions,
                   model: ModelDescription) -> None:
  read = pipeline | 'ReadImages' >> ReadImages(options.input, options.max_file_bytes)
  decoded = read.images | 'DecodeImages' >> DecodeImages(
      model.height, model.width, center_crop_fraction=options.center_crop_fraction,
      max_image_pixels=options.max_image_pixels, jpeg_draft=options.jpeg_draft)
  handler = ImageEmbeddingModelHandler(
      options.model, checkpoint=options.checkpoint, seed=options.seed,
      compute_dtype=options.compute_dtype, min_batch_size=options.min_batch_size,
      max_batch_size=options.max_batch_size, large_model=options.large_model,
      model_copies=options.model_copies, jit_compile=options.jit_compile)
  embedded = decoded.decoded | 'EmbedImages' >> EmbedImages(handler)
  _ = embedded['embeddings'] | 'WriteEmbeddings' >> WriteEmbeddings(
      options.output, num_shards=options.num_shards, compression=options.compression)
  failures = (read[FAILURES_TAG], decoded[FAILURES_TAG], embedded[FAILURES_TAG])
  _ = (failures
       | 'AllFailures' >> beam.Flatten()
       | 'WriteFailures' >> WriteFailures(options.output, num_shards=options.num_shards))
