"""Model handles: exports load through the pipeline's loader; bad handles fail clearly."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from models.description import describe_model
from models.handles import DEFAULT_MODEL_HANDLE, ModelLoadError
from models.loading import load_embedding_model
from pnasnet import build_model
from pnasnet.checkpoint import model_values, save_slim_checkpoint


def test_tf1_hub_module_has_the_published_interface(tf1_hub_module):
  assert os.path.exists(os.path.join(tf1_hub_module, 'tfhub_module.pb'))
  loaded = hub.load(tf1_hub_module)
  assert {'default', 'image_feature_vector'} <= set(loaded.signatures)
  signature = loaded.signatures['image_feature_vector']
  spec = signature.structured_input_signature[1]['images']
  assert spec.shape.as_list() == [None, 64, 64, 3] and spec.dtype == tf.float32
  assert set(signature.structured_outputs) == {'default'}


@pytest.mark.parametrize('fixture', ['tf1_hub_module', 'tf2_saved_model'])
def test_exports_give_the_networks_features(fixture, request, tiny_network, random_images):
  path = request.getfixturevalue(fixture)
  description = describe_model(path)
  assert (description.height, description.width, description.feature_size) == (64, 64, 160)
  model = load_embedding_model(path)
  features = model.embed(random_images)
  assert features.shape == (3, 160) and features.dtype == np.float32
  np.testing.assert_allclose(features, tiny_network(random_images).numpy(), rtol=0, atol=1e-5)


def test_builtin_without_checkpoint_is_labelled_untrained(random_images):
  description = describe_model('builtin:pnasnet_tiny', seed=4)
  assert description.model_id == 'builtin:pnasnet_tiny@untrained-seed4'
  model = load_embedding_model('builtin:pnasnet_tiny', seed=4)
  assert model.describe() == description
  assert model.embed(random_images).shape == (3, 160)


def test_builtin_with_checkpoint_uses_its_weights(tmp_path, tiny_network, random_images):
  prefix = str(tmp_path / 'model.ckpt')
  save_slim_checkpoint(prefix, model_values(tiny_network))
  model = load_embedding_model('builtin:pnasnet_tiny', checkpoint=prefix)
  assert model.describe().model_id == 'builtin:pnasnet_tiny'
  np.testing.assert_allclose(model.embed(random_images), tiny_network(random_images).numpy(),
                             rtol=0, atol=1e-5)


def test_checkpoint_on_gcs_is_staged_and_restaged_when_replaced(gcs_server, random_images,
                                                               tmp_path):
  gcs_server.create_bucket('checkpoints')
  uri = 'gs://checkpoints/tiny/model.ckpt'
  for seed in (1, 2):  # the second checkpoint replaces the first at the same URI
    network = build_model('tiny', seed=seed)
    local = tmp_path / f'seed{seed}'
    save_slim_checkpoint(str(local / 'model.ckpt'), model_values(network))
    for path in local.iterdir():
      gcs_server.upload(f'gs://checkpoints/tiny/{path.name}', path.read_bytes())
    features = load_embedding_model('builtin:pnasnet_tiny', checkpoint=uri).embed(random_images)
    np.testing.assert_allclose(features, network(random_images).numpy(), rtol=0, atol=1e-5)


def test_one_description_names_the_weights_and_the_loaded_model_agrees(tmp_path, tiny_network):
  """The launcher's description carries the weights' identity; a worker's load describes the
  model the same way."""
  prefix = str(tmp_path / 'model.ckpt')
  save_slim_checkpoint(prefix, model_values(tiny_network))
  described = describe_model('builtin:pnasnet_tiny', checkpoint=prefix)
  assert re.fullmatch(rf'checkpoint {re.escape(prefix)} index-sha256:[0-9a-f]{{16}}',
                      described.weights)
  assert load_embedding_model('builtin:pnasnet_tiny', checkpoint=prefix).describe() == described
  assert describe_model('builtin:pnasnet_tiny', seed=3).weights == 'untrained seed 3'


def test_unreachable_default_handle_names_the_offline_choices():
  with pytest.raises(ModelLoadError) as error:
    describe_model(DEFAULT_MODEL_HANDLE)
  assert 'builtin:pnasnet_large' in str(error.value) and '--checkpoint' in str(error.value)


def test_a_classifier_is_not_a_feature_vector_model(tmp_path):
  module = tf.Module()
  module.weights = tf.Variable(tf.ones([3, 10]))
  module.classify = tf.function(
      lambda text: {'logits': tf.matmul(tf.strings.to_number(text), module.weights)},
      input_signature=[tf.TensorSpec([None, 3], tf.string)])
  tf.saved_model.save(module, str(tmp_path), signatures={'serving_default': module.classify})
  with pytest.raises(ModelLoadError, match='not an image feature-vector model'):
    describe_model(str(tmp_path))


@pytest.mark.parametrize('handle, checkpoint, message', [
    ('builtin:resnet50', None, 'unknown built-in model'),
    ('/no/such/dir', None, 'neither a TF-Hub URL'),
    ('builtin:pnasnet_tiny', '/no/such/model.ckpt', 'no /no/such/model.ckpt.index'),
])
def test_bad_handles_fail_clearly(handle, checkpoint, message):
  with pytest.raises(ModelLoadError, match=message):
    describe_model(handle, checkpoint)


def test_empty_directory_is_not_a_model(tmp_path):
  with pytest.raises(ModelLoadError, match='no saved_model.pb'):
    describe_model(str(tmp_path))


def test_remote_model_is_described_without_copying(gcs_server, tf1_hub_module):
  gcs_server.create_bucket('described')
  with open(os.path.join(tf1_hub_module, 'saved_model.pb'), 'rb') as f:
    gcs_server.upload('gs://described/module/saved_model.pb', f.read())  # no variables at all
  description = describe_model('gs://described/module')
  assert (description.height, description.feature_size) == (64, 160)
  with pytest.raises(ModelLoadError, match='no saved_model.pb'):
    describe_model('gs://described/elsewhere')


def test_export_command_writes_a_loadable_module(tmp_path, capsys):
  from commands.export_model import main
  output = str(tmp_path / 'module')
  main(['--config', 'tiny', '--format', 'tf1_hub', '--output', output, '--seed', '2'])
  assert 'wrote tf1_hub of pnasnet_tiny' in capsys.readouterr().out
  described = describe_model(output)
  assert described.feature_size == 160
  assert described.model_id == f'{output}@untrained-seed2'
  assert re.fullmatch(r'untrained seed 2 \(exported by pnasnet.export\), '
                      r'index-sha256:[0-9a-f]{16}', described.weights)
  embedding_model = load_embedding_model(output)
  assert embedding_model.describe() == described  # the launcher and the workers agree
  gray = np.full((1, 64, 64, 3), 0.5, np.float32)
  np.testing.assert_allclose(embedding_model.embed(gray), build_model('tiny', seed=2)(gray),
                             rtol=0, atol=1e-5)
  with pytest.raises(SystemExit):
    main(['--config', 'tiny', '--output', output])  # not empty: refused
