"""--jit_compile: XLA on padded batches gives the plain path's features, compiling a few shapes."""

import numpy as np
import pytest

from apache_beam.options.pipeline_options import PipelineOptions

from models.loading import load_embedding_model
from models.xla import PaddedXlaFunction, batch_buckets
from pipeline.options import EmbeddingOptions, OptionsError, validate

RAGGED_SIZES = [3, 1, 6, 2, 5, 4, 7, 1, 9, 3]  # 9 is above the largest bucket: two calls


def _images(size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).random((size, 64, 64, 3), dtype=np.float32)


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
  assert batch_buckets(1) == [1]
  assert batch_buckets(8) == [1, 2, 4, 8]
  assert batch_buckets(12) == [1, 2, 4, 8, 12]


def test_xla_features_equal_the_plain_path_and_compiles_stay_bounded():
  plain = load_embedding_model('builtin:pnasnet_tiny')
  xla = load_embedding_model('builtin:pnasnet_tiny', jit_compile=True, max_batch_size=6)
  for seed, size in enumerate(RAGGED_SIZES):
    images = _images(size, seed)
    features = xla.embed(images)
    assert features.shape == (size, 160)  # padded rows never come out
    # XLA's CPU kernels and oneDNN's (on where TensorFlow enables it, e.g. Intel CPUs with AVX-512)
    # sum in different orders: measured up to 1.8e-5 relative on such a machine.
    np.testing.assert_allclose(features, plain.embed(images), rtol=1e-4, atol=1e-5)
  assert xla._function.compile_count() == len(batch_buckets(6))  # 1, 2, 4, 6: nothing else


def test_padding_never_reaches_the_real_rows(tiny_network):
  """Three images padded to four: their features do not depend on what fills the pad."""
  function = PaddedXlaFunction(tiny_network.__call__, max_batch_size=4)
  images = _images(3, 0)
  padded = function(images).numpy()
  alongside_noise = function(np.concatenate([images, _images(1, 1) * 100])).numpy()[:3]
  np.testing.assert_allclose(padded, alongside_noise, rtol=0, atol=1e-5)
  assert function.compile_count() == 1  # both calls ran the batch-of-4 program


def test_jit_compile_is_off_by_default_and_only_for_builtin_models(tf2_saved_model):
  assert EmbeddingOptions([]).jit_compile is False
  assert EmbeddingOptions(['--jit_compile']).jit_compile is True
  options = PipelineOptions(['--input=in/*.png', '--output=out', f'--model={tf2_saved_model}',
                             '--jit_compile'])
  with pytest.raises(OptionsError, match='--jit_compile applies to builtin'):
    validate(options.view_as(EmbeddingOptions), options)  # checked once, at launch
