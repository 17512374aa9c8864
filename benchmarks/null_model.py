"""A SavedModel with the TF-Hub module's interface and almost no compute.

331x331x3 float32 in, 4320 float32 out, signature `image_feature_vector`: with it, a run's cost is
the pipeline's own (reading, decoding, batching, moving pixels, writing), which a real network on
a CPU hides. Each feature is a per-image channel mean, so the output still depends on the input.

    python -m benchmarks.null_model /tmp/null_model
"""

import sys

import tensorflow as tf

IMAGE_SIZE = 331
FEATURE_SIZE = 4320


class _NullModel(tf.Module):

  @tf.function(input_signature=[
      tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32, name='images')])
  def feature_vector(self, images):
    means = tf.reduce_mean(images, axis=[1, 2])  # [batch, 3]
    return {'default': tf.tile(means, [1, FEATURE_SIZE // 3])}


def write_null_model(export_dir: str) -> str:
  module = _NullModel()
  tf.saved_model.save(module, export_dir, signatures={
      'image_feature_vector': module.feature_vector, 'serving_default': module.feature_vector})
  return export_dir


if __name__ == '__main__':
  print(write_null_model(sys.argv[1]))
