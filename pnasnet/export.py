"""Exports the network as a TF2 SavedModel or as a TF1-Hub-format module.

Both carry the TF-Hub image feature-vector interface: signature `image_feature_vector` (and
`default` / `serving_default`), input `images` float32 [batch, H, W, 3] in [0, 1], output
`default` float32 [batch, D]; so `hub.load` and the pipeline treat them like the published module.

    pnasnet-embeddings export-model --config large --format tf1_hub \
        --output /tmp/pnasnet_large_hub [--checkpoint pnasnet-5_large_2017_12_13/model.ckpt]
"""

import json
import os

import tensorflow as tf

from pnasnet.checkpoint import model_values
from pnasnet.config import EXPORT_MARK
from pnasnet.network import PNASNet, zeros_initializer

FEATURE_SIGNATURES = ('image_feature_vector', 'default')
# tensorflow_hub's ModuleDef proto {format: FORMAT_V3}; tensorflow_hub 0.16 no longer ships it.
TFHUB_MODULE_PB = b'\x08\x03'


def write_export_mark(export_dir: str, config: str, checkpoint, seed: int) -> None:
  mark = {'config': config, 'checkpoint': checkpoint, 'untrained': not checkpoint, 'seed': seed}
  with tf.io.gfile.GFile(os.path.join(export_dir, EXPORT_MARK), 'w') as f:
    f.write(json.dumps(mark))


def _images_spec(model: PNASNet) -> tf.TensorSpec:
  size = model.image_size
  return tf.TensorSpec([None, size, size, 3], tf.float32, name='images')


def export_saved_model(model: PNASNet, export_dir: str) -> None:
  """TF2 SavedModel with `image_feature_vector` and `serving_default` signatures."""

  @tf.function(input_signature=[_images_spec(model)])
  def feature_vector(images):
    return {'default': model(images)}

  tf.saved_model.save(model, export_dir, signatures={
      'image_feature_vector': feature_vector, 'serving_default': feature_vector})


def export_tf1_hub_module(model: PNASNet, export_dir: str) -> None:
  """TF1 SavedModel with tags [] plus `tfhub_module.pb`: TF1 Hub format, as on tfhub.dev.

  The graph is built anew in graph mode with zero-initialised variables whose values are then
  fed in, so the weights live in the variables files and not as constants in the graph.
  """
  values = model_values(model)
  graph = tf.Graph()
  with graph.as_default():
    images = tf.compat.v1.placeholder(tf.float32, _images_spec(model).shape, name='images')
    graph_model = PNASNet(model.config, num_classes=model.num_classes,
                          initializer=zeros_initializer, compute_dtype=model.compute_dtype)
    features = tf.identity(graph_model(images), name='default')
    signature = tf.compat.v1.saved_model.predict_signature_def(
        inputs={'images': images}, outputs={'default': features})
    with tf.compat.v1.Session(graph=graph) as session:
      variables = graph_model.variables_by_name
      session.run([var.initializer for var in variables.values()],
                  {var.initializer.inputs[1]: values[name] for name, var in variables.items()})
      builder = tf.compat.v1.saved_model.Builder(export_dir)
      builder.add_meta_graph_and_variables(
          session, tags=[], signature_def_map={name: signature for name in FEATURE_SIGNATURES},
          strip_default_attrs=True)
      builder.save()
  with tf.io.gfile.GFile(os.path.join(export_dir, 'tfhub_module.pb'), 'wb') as f:
    f.write(TFHUB_MODULE_PB)


EXPORTERS = {'saved_model': export_saved_model, 'tf1_hub': export_tf1_hub_module}
