"""Drops the log lines a healthy run prints every time that a user need not read (see
docs/running.md, "Log messages"): notes that read like problems and are none, Beam's routine
reports, TensorFlow's start-up notes from C++, and Pillow's decompression-bomb warning, which our
decoding turns into a failure. Warnings and errors that mean something are left alone."""

import contextlib
import ctypes
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings

HARMLESS = {
    # Beam 2.77's RunInference imports torch to measure memory; without torch it says this on
    # every batch, though nothing is wrong.
    '': ('Resource module is not available for current platform',),
    # Our sinks skip empty shards on purpose (S3 refuses empty multipart uploads); renaming the
    # temporary shards is how every write ends.
    'apache_beam.io.filebasedsink': ('No shards found to finalize', 'Renamed '),
    # Once a pipeline, and after every bundle: Beam's internals.
    'apache_beam.runners.worker.statecache': ('Creating state cache with size',),
    'apache_beam.transforms.util': ('BatchElements statistics',),
    # TensorFlow loading a SavedModel or Hub module written without a fingerprint (TF1 Hub).
    'absl': ('Fingerprint not found. Saved model loading will continue',
             'path_and_singleprint metric could not be logged'),
}
# Milvus Lite serves pymilvus in-process, without the timestamp call that pymilvus's query
# iterator tries first; pymilvus then uses its own clock, as it says.
MILVUS_LITE_HARMLESS = {
    'grpc._server': ('Exception calling application: Method not implemented!',),
    'pymilvus.orm.iterator': ('failed to get mvccTs from milvus server',),
}
# TensorFlow's native libraries print these from C++ as they load (once per library that loads
# them), before its log level applies: no CUDA driver on a CPU machine, oneDNN, CPU features; and
# its GPU probe's failure where there is no driver.
TENSORFLOW_NOTES = re.compile(
    r'^(WARNING: All log messages before absl::InitializeLog\(\) is called'
    r'|I\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\] '
    r'|To enable the following instructions: '
    r'|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: )')


class _DropHarmless(logging.Filter):

  def __init__(self, texts: tuple):
    super().__init__()
    self._texts = texts

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self._texts)


@contextlib.contextmanager
def tensorflow_notes_dropped():
  """Native stderr (fd 2) goes to a temporary file for the block, then back to stderr less
  TENSORFLOW_NOTES; lines printed meanwhile come out when the block ends."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not TENSORFLOW_NOTES.match(line)))
      sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
  """Loads the module as `loader` does, its native start-up notes dropped."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = module.__spec__.loader = self._loader  # no trace left once loaded
    with tensorflow_notes_dropped():
      self._loader.exec_module(module)
      if not _has_cuda_driver():  # the GPU probe can only fail: done now, its error unsaid
        module.config.list_physical_devices('GPU')


def _has_cuda_driver() -> bool:
  """Whether the CUDA driver library loads, as TensorFlow looks for it (no CUDA call)."""
  try:
    ctypes.CDLL('libcuda.so.1')
  except OSError:
    return False
  return True


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """The first `import tensorflow`, wherever it happens (a model load on a worker thread):
  TensorFlow is imported only where it is needed, so option checks stay fast."""

  def find_spec(self, name, path, target=None):
    if name != 'tensorflow':
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


def ignore_pillow_bomb_warnings() -> None:
  """Pillow warns on images over its global pixel limit (below twice it, where it raises). Our
  decoding enforces its own limit on every image and fails with its own reason (a `decode`
  failure, or a refused query), so the warning would only repeat that, raw, in the log.

  Process-wide, as Python's warning filters are; cheap enough to call before every decode, so a
  filter list reset since (warnings.catch_warnings, pytest) gets it back."""
  from PIL import Image
  if not any(action == 'ignore' and category is Image.DecompressionBombWarning and not message
             for action, message, category, *_ in warnings.filters):
    warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)


def drop_messages(harmless: dict) -> None:
  """Idempotent: `harmless` maps a logger to the messages (a part of each) it drops."""
  for name, texts in harmless.items():
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropHarmless) for f in logger.filters):
      logger.addFilter(_DropHarmless(texts))


def install() -> None:
  """Idempotent; per process (the launcher and each worker process)."""
  drop_messages(HARMLESS)
  # tensorflow_hub imports pkg_resources, which warns that it is deprecated, on every import.
  warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
  if 'tensorflow' not in sys.modules and not any(
      isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
