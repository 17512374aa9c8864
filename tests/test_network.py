"""The network's structure, checkpoint loading and mixed precision."""

import numpy as np
import pytest
import tensorflow as tf

from pnasnet import CONFIGS, PUBLIC_NAMES, PNASNet, build_model, count_parameters
from pnasnet.checkpoint import (CheckpointMismatchError, load_slim_checkpoint, model_values,
                                save_slim_checkpoint)


def test_large_has_the_published_parameter_counts():
  assert count_parameters(PNASNet(CONFIGS['large'])) == 81_736_668
  assert count_parameters(PNASNet(CONFIGS['large'], num_classes=1001)) == 86_061_989


def test_reductions_and_filters_follow_tf_slim():
  large = CONFIGS['large']
  assert large.reduction_indices == [4, 8]
  assert large.feature_size == 4320
  assert CONFIGS['mobile'].feature_size == 1080
  names = PNASNet(CONFIGS['tiny']).variables_by_name
  # cell_stem_0 has no previous layer: no adjustment; cell_stem_1 halves conv0's output.
  assert not any(n.startswith('cell_stem_0/prev') or n.startswith('cell_stem_0/path')
                 for n in names)
  assert names['cell_stem_1/path1_conv/weights'].shape == (1, 1, 16, 2)
  assert 'cell_1/prev_1x1/weights' in names and 'cell_0/final_path_bn/gamma' in names
  assert names['cell_stem_0/comb_iter_0/left/separable_5x5_1/depthwise_weights'].shape == (
      5, 5, 16, 1)
  assert names['conv0/weights'].shape == (3, 3, 3, 16)


def test_full_large_network_embeds_one_image():
  model = build_model('large')
  image = np.random.default_rng(0).random((1, 331, 331, 3), dtype=np.float32)
  features = model(image).numpy()
  assert features.shape == (1, 4320) and features.dtype == np.float32
  assert np.isfinite(features).all() and (features >= 0).all() and features.std() > 0


def test_checkpoint_round_trip_ignores_extras(tmp_path, tiny_network, random_images):
  values = model_values(build_model('tiny', seed=9, num_classes=1001))
  values['global_step'] = np.array(1234, np.int64)
  values['aux_7/aux_logits/proj/weights'] = np.ones((1, 1, 4, 4), np.float32)
  values['cell_0/1x1/weights/RMSProp'] = np.zeros((1, 1, 40, 8), np.float32)
  prefix = str(tmp_path / 'model.ckpt')
  save_slim_checkpoint(prefix, values)

  loaded = build_model('tiny', checkpoint=prefix)
  reference = build_model('tiny', seed=9)
  np.testing.assert_array_equal(loaded(random_images), reference(random_images))
  assert not np.allclose(loaded(random_images), tiny_network(random_images))


def test_checkpoint_mismatch_lists_every_problem(tmp_path):
  values = model_values(build_model('tiny'))
  del values['conv0/weights'], values['cell_2/beginning_bn/beta']
  values['cell_0/1x1/weights'] = np.zeros((1, 1, 3, 3), np.float32)
  prefix = str(tmp_path / 'broken.ckpt')
  save_slim_checkpoint(prefix, values)
  with pytest.raises(CheckpointMismatchError) as error:
    load_slim_checkpoint(PNASNet(CONFIGS['tiny']), prefix)
  message = str(error.value)
  assert '2 missing, 1 of another shape' in message
  for name in ('conv0/weights', 'cell_2/beginning_bn/beta', 'cell_0/1x1/weights'):
    assert name in message


# Measured on these inputs (tiny network, seed 3): max |diff| / max |features| is 0.0092 for
# float16 and 0.095 for bfloat16 (8 mantissa bits); the bounds leave 1.6-2x headroom.
@pytest.mark.parametrize('dtype, tolerance', [('float16', 0.02), ('bfloat16', 0.15)])
def test_mixed_precision_computes_low_and_returns_float32(dtype, tolerance, random_images):
  full = build_model('tiny', seed=3)(random_images).numpy()
  low = build_model('tiny', seed=3, compute_dtype=dtype)
  features = low(random_images)
  assert features.dtype == tf.float32
  assert low.compute_dtype == tf.as_dtype(dtype)
  error = np.abs(features.numpy() - full).max() / np.abs(full).max()
  assert 0 < error < tolerance


def test_seeded_weights_are_deterministic_and_calibrated(random_images):
  first = build_model('tiny', seed=5)(random_images).numpy()
  np.testing.assert_array_equal(first, build_model('tiny', seed=5)(random_images).numpy())
  assert not np.allclose(first, build_model('tiny', seed=6)(random_images).numpy())
  assert 0.1 < first.mean() < 10  # unit scale, not the 2x-per-cell growth of identity BN


def test_each_config_carries_its_public_name_and_input_contract():
  """As timm keeps input_size, interpolation and crop_pct in a model's pretrained config."""
  assert {name: config.name for name, config in PUBLIC_NAMES.items()} == {
      'pnasnet_large': 'large', 'pnasnet_mobile': 'mobile', 'pnasnet_tiny': 'tiny'}
  large = PUBLIC_NAMES['pnasnet_large'].input_contract
  assert (large.image_size, large.value_range, large.crop_fraction) == (331, (0.0, 1.0), 1.0)
  assert (large.interpolation, large.half_pixel_centers, large.antialias) == (
      'bilinear', True, False)
  assert PNASNet(CONFIGS['tiny']).image_size == CONFIGS['tiny'].input_contract.image_size == 64


def test_an_image_gets_the_same_vector_in_any_batch_at_any_place():
  """Tiny network, batches of 1 to 16 with the image first, in the middle and last.

  Without the padding row TensorFlow's CPU kernels gave 12 distinct vectors over these 45 cases
  on an AVX2 CPU (oneDNN off, TensorFlow's default there), differing in the last row's rounding.
  """
  from models.loading import load_embedding_model
  model = load_embedding_model('builtin:pnasnet_tiny')
  images = np.random.default_rng(1).random((17, 64, 64, 3), dtype=np.float32)
  target, others = images[0], images[1:]
  expected = model.embed(target[np.newaxis])[0]
  for size in range(1, 17):
    for place in sorted({0, size // 2, size - 1}):
      batch = np.concatenate([others[:place], target[np.newaxis], others[place:size - 1]])
      np.testing.assert_array_equal(model.embed(batch)[place], expected, f'{size}, {place}')


def test_an_image_alone_gets_the_same_vector_as_in_any_batch():
  """PNASNet-5 Large on CPU: alone, first, middle and last of a batch."""
  from models.loading import load_embedding_model
  model = load_embedding_model('builtin:pnasnet_large')
  images = np.random.default_rng(5).random((3, 331, 331, 3), dtype=np.float32)
  together = model.embed(images)
  np.testing.assert_array_equal(model.embed(images[:2])[1], together[1])
  for i in range(3):
    np.testing.assert_array_equal(model.embed(images[i:i + 1])[0], together[i])