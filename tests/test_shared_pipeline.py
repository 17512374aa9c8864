"""End to end with a model shared across worker processes: the same features, bit for bit."""

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from models.loading import load_embedding_model
from pipeline.launcher import run
from tests.shared_callers import shm_files
from transforms.decode import decode_and_resize

MULTI_PROCESSING = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']


def _embeddings(output: str) -> dict:
  embeddings = {}
  for match in FileSystems.match([FileSystems.join(output, 'embeddings-*')])[0].metadata_list:
    for record in tf.data.TFRecordDataset(match.path):
      feature = tf.train.Example.FromString(record.numpy()).features.feature
      embeddings[feature['image/uri'].bytes_list.value[0].decode()] = np.array(
          feature['embedding'].float_list.value, np.float32)
  return embeddings


@pytest.mark.parametrize('sharing', [['--large_model'], ['--model_copies=2']],
                         ids=['large_model', 'model_copies_2'])
def test_shared_model_features_are_bit_identical_to_in_process(sharing, image_folder, tmp_path):
  """Batches of one, so that each feature comes from the same computation in both paths."""
  shm_before = shm_files()
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/*', f'--output={output}',
                 '--model=builtin:pnasnet_tiny', '--max_batch_size=1'] + MULTI_PROCESSING +
                sharing)
  embeddings = _embeddings(output)
  assert summary['embedded'] == len(embeddings) == 6 and summary['failed'] == 3
  in_process = load_embedding_model('builtin:pnasnet_tiny')
  for uri, embedding in embeddings.items():
    with open(uri, 'rb') as f:
      _, _, pixels = decode_and_resize(f.read(), 64, 64)
    np.testing.assert_array_equal(embedding, in_process.embed(pixels[np.newaxis])[0])
  assert shm_files() == shm_before  # batches travel in memory files, which have no name there


def test_jit_compile_through_the_pipeline(image_folder, tmp_path):
  output = str(tmp_path / 'out')
  summary = run([f'--input={image_folder}/*.png', f'--output={output}',
                 '--model=builtin:pnasnet_tiny', '--max_batch_size=2', '--jit_compile'])
  embeddings = _embeddings(output)
  assert summary['embedded'] == len(embeddings) == 4
  plain = load_embedding_model('builtin:pnasnet_tiny')
  for uri, embedding in embeddings.items():
    with open(uri, 'rb') as f:
      _, _, pixels = decode_and_resize(f.read(), 64, 64)
    np.testing.assert_allclose(embedding, plain.embed(pixels[np.newaxis])[0], rtol=0, atol=1e-5)
