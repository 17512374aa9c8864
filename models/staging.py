"""Local copies of models: TF-Hub downloads, remote (gs://, s3://, ...) directories and
checkpoints, copied once per machine and version."""

import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import uuid
from typing import Callable, Sequence

from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from models.handles import ModelLoadError, is_remote_directory

STAGING_DIR = os.path.join(tempfile.gettempdir(), 'pnasnet-embeddings-staging')

OFFLINE_CHOICES = (
    'Offline choices: --model builtin:pnasnet_large --checkpoint PATH/model.ckpt (the TF-Slim '
    'checkpoint the module was exported from); --model DIR with the module downloaded and '
    'uncompressed (a local or gs:// directory); or TFHUB_CACHE_DIR pointing at a cache that '
    'already holds it. To try the pipeline without any weights: --model builtin:pnasnet_large '
    '(seeded, untrained; the output is labelled so).')


def _stage(uri: str, files: Sequence[FileMetadata], relative_path: Callable[[str], str]) -> str:
  """A local copy of remote files, made once per machine and version.

  The directory's name hashes the URI with every file's path and checksum, so a model replaced
  at the same URI is copied anew. The copy goes to a fresh directory that is then
  renamed into place, so concurrent workers on one VM never see a half-written copy, and a
  failed copy is removed. Object names are untrusted: one that is absolute or holds a `..`
  component would be written outside the copy, and is refused.
  """
  version = json.dumps([uri] + sorted((m.path, FileSystems.checksum(m.path)) for m in files))
  target = os.path.join(STAGING_DIR, hashlib.sha256(version.encode()).hexdigest()[:16])
  if os.path.isdir(target):
    return target
  partial = f'{target}.{uuid.uuid4().hex}.partial'
  try:
    for metadata in files:
      relative = relative_path(metadata.path)
      if os.path.isabs(relative) or '..' in relative.split('/'):
        raise ModelLoadError(f'{uri} holds an object named {metadata.path!r}, which would be '
                             f'staged outside {STAGING_DIR}; refusing to copy the model')
      local = os.path.join(partial, relative)
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
          open(local, 'wb') as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.rename(partial, target)
  except OSError:
    if not os.path.isdir(target):  # not "another process staged it first": a real failure
      raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; else the failed copy
  return target


def _stage_directory(uri: str) -> str:
  prefix = uri.rstrip('/') + '/'
  files = [m for m in FileSystems.match([prefix + '**'])[0].metadata_list
           if not m.path.endswith('/')]
  if not files:
    raise ModelLoadError(f'model directory {uri} is empty or does not exist')
  return _stage(uri, files, lambda path: path[len(prefix):])


def resolve_model_dir(model_handle: str) -> str:
  """A local directory holding the SavedModel the handle names."""
  if model_handle.startswith(('http://', 'https://')):
    import tensorflow_hub as hub
    try:
      return hub.resolve(model_handle)
    except urllib.error.HTTPError as exc:  # the server answered: the handle is wrong or gone
      raise ModelLoadError(f'cannot fetch {model_handle}: the server answered HTTP {exc.code} '
                           f'{exc.reason}. ' + OFFLINE_CHOICES) from exc
    except (urllib.error.URLError, ConnectionError, socket.timeout) as exc:  # DNS, proxy, refused
      raise ModelLoadError(f'cannot fetch {model_handle} ({type(exc).__name__}: {exc}). '
                           + OFFLINE_CHOICES) from exc
    except Exception as exc:  # the download broke off or is not a module archive
      raise ModelLoadError(
          f'the download of {model_handle} is not a complete module archive '
          f'({type(exc).__name__}: {exc}); nothing was cached, so the next run downloads it '
          f'again. Bake the model into the worker image (docs/dataflow.md) to stop depending on '
          f'the download.') from exc
  if is_remote_directory(model_handle):
    try:
      return _stage_directory(model_handle)
    except ModelLoadError:
      raise
    except Exception as exc:
      raise ModelLoadError(f'cannot copy the model from {model_handle}: {exc}') from exc
  if not os.path.isdir(model_handle):
    raise ModelLoadError(f'--model {model_handle!r} is neither a TF-Hub URL, a directory, nor '
                         f'builtin:NAME. ' + OFFLINE_CHOICES)
  return model_handle


def check_checkpoint(prefix: str) -> None:
  if not FileSystems.exists(prefix + '.index'):
    raise ModelLoadError(f'--checkpoint {prefix}: there is no {prefix}.index; give the '
                         'checkpoint prefix, e.g. pnasnet-5_large_2017_12_13/model.ckpt')


def resolve_checkpoint(prefix: str) -> str:
  """A local path for a TF-Slim checkpoint prefix (staged when remote)."""
  check_checkpoint(prefix)
  if is_remote_directory(prefix):
    files = FileSystems.match([prefix + '.*'])[0].metadata_list
    return os.path.join(_stage(prefix, files, os.path.basename), os.path.basename(prefix))
  return prefix
