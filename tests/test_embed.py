"""The embed stage: dead-lettered batches, model sharing flags, CPU paths of the GPU set-up."""

import logging
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from models.gpus import configure_gpus
from transforms.decode import DecodedImage
from transforms.embed import EmbedImages, ImageEmbeddingModelHandler
from transforms.failures import FAILURES_TAG
from transforms.progress import ProgressReporter


def _images(sizes):
  rng = np.random.default_rng(2)
  return [DecodedImage(f'mem://{i}.png', f'{i:064x}', 10, 20, 1000 + i, None,
                       rng.random((size, size, 3), dtype=np.float32))
          for i, size in enumerate(sizes)]


@pytest.mark.parametrize('max_batch_size, embedded, failed', [(1, [0, 1, 3], 1), (4, [], 4)])
def test_failed_batch_becomes_one_record_per_image(max_batch_size, embedded, failed):
  """A 32x32 image among 64x64 ones: alone it fails alone; batched, its whole batch fails."""
  handler = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', min_batch_size=max_batch_size,
                                       max_batch_size=max_batch_size)
  with test_pipeline.TestPipeline() as pipeline:
    outputs = (pipeline | beam.Create(_images([64, 64, 32, 64]))
               | EmbedImages(handler))
    assert_that(outputs['embeddings'] | 'Uris' >> beam.Map(lambda e: (e.uri, e.model,
                                                                    e.embedding.shape)),
                equal_to([(f'mem://{i}.png', 'builtin:pnasnet_tiny@untrained-seed0', (160,))
                          for i in embedded]),
                label='embedded')
    assert_that(outputs[FAILURES_TAG] | 'Stages' >> beam.Map(lambda f: (f.stage, bool(f.message))),
                equal_to([('inference', True)] * failed), label='failed')


def test_model_sharing_flags_reach_beam():
  assert not ImageEmbeddingModelHandler('builtin:pnasnet_tiny').share_model_across_processes()
  large = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', large_model=True)
  assert large.share_model_across_processes()
  copies = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', model_copies=2)
  assert copies.share_model_across_processes() and copies.model_copies() == 2
  batching = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', min_batch_size=2,
                                        max_batch_size=8).batch_elements_kwargs()
  assert batching == {'min_batch_size': 2, 'max_batch_size': 8}


def test_cpu_only_machine_loads_and_runs_the_model():
  assert configure_gpus() == []  # no GPU here; memory growth has nothing to configure
  handler = ImageEmbeddingModelHandler('builtin:pnasnet_tiny', compute_dtype='float16')
  model = handler.load_model()
  [result] = handler.run_inference([np.zeros((64, 64, 3), np.float32)], model)
  assert result.inference.dtype == np.float32 and result.inference.shape == (160,)


def test_progress_is_logged_while_idle(caplog):
  reporter = ProgressReporter(interval=0.05)
  reporter.add(3)
  with caplog.at_level(logging.INFO):
    time.sleep(0.3)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('progress:')]
  assert len(lines) >= 2 and 'embedded 3 images' in lines[-1]
