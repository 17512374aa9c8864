"""Shared fixtures: small real models written by the tests, sample images, a GCS server."""

import os
import shutil

import numpy as np
import pytest

from pnasnet import build_model
from pnasnet.export import export_saved_model, export_tf1_hub_module
from tests.gcs_emulator import gcs_server  # noqa: F401  (fixtures for every test module)
from tests.s3_server import s3_server  # noqa: F401

SAMPLE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'sample_images')


@pytest.fixture(scope='session')
def tiny_network():
  return build_model('tiny', seed=3)


@pytest.fixture(scope='session')
def tf1_hub_module(tiny_network, tmp_path_factory):
  """A TF1-Hub-format module like the published one: tags [], two signatures, tfhub_module.pb."""
  path = str(tmp_path_factory.mktemp('models') / 'tiny_tf1_hub')
  export_tf1_hub_module(tiny_network, path)
  return path


@pytest.fixture(scope='session')
def tf2_saved_model(tiny_network, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('models') / 'tiny_saved_model')
  export_saved_model(tiny_network, path)
  return path


@pytest.fixture(scope='session')
def random_images():
  return np.random.default_rng(11).random((3, 64, 64, 3), dtype=np.float32)


@pytest.fixture
def image_folder(tmp_path):
  """The sample photos plus the broken files users have: empty, truncated, text named .jpg."""
  folder = tmp_path / 'images'
  folder.mkdir()
  for name in os.listdir(SAMPLE_IMAGES):
    if not name.endswith('.md'):
      shutil.copy(os.path.join(SAMPLE_IMAGES, name), folder / name)
  (folder / 'empty.jpg').write_bytes(b'')
  jpeg = (folder / 'rocket.jpg').read_bytes()
  (folder / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  (folder / 'notes.jpg').write_text('this is not an image\n')
  return folder
