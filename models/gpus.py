"""GPU memory settings, and which device a model runs on: the i-th model a run loads on a machine
goes to GPU i mod G.

With --model_copies N Beam loads N models per VM, each in its own load, but TensorFlow would put
them all on the first GPU. Beam does not tell a load which copy it is, and the copies may be
loaded by different processes, so the index comes from a counter file per run, shared by all the
processes of the machine under a file lock.
"""

import fcntl
import logging
import os
import tempfile
from typing import Optional

COUNTER_PREFIX = 'pnasnet-embeddings-loads-'


def configure_gpus() -> list:
  """Memory growth on every GPU, before TensorFlow initialises them.

  Without it TensorFlow reserves nearly all GPU memory in the first process, and the other
  processes of a multi-process worker (or a second model copy) fail to allocate.
  """
  import tensorflow as tf
  gpus = tf.config.list_physical_devices('GPU')
  for gpu in gpus:
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # already initialised in this process: nothing left to set
      logging.info('GPU memory growth left as is: %s', exc)
  return gpus


def claim_load_index(run_token: str) -> int:
  """0, 1, 2, ... for the successive calls with one token, from any process of this machine."""
  path = os.path.join(tempfile.gettempdir(), COUNTER_PREFIX + run_token)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by closing
    index = int(os.pread(fd, 32, 0) or b'0')
    os.pwrite(fd, str(index + 1).encode(), 0)  # the count only grows: never shorter
    return index
  finally:
    os.close(fd)


def device_for_load(run_token: str, device_type: str = 'GPU') -> Optional[str]:
  """The logical device of this type for the next model load, None when there is none.

  Call after GPU memory growth is configured: listing devices initialises them.
  """
  import tensorflow as tf
  devices = tf.config.list_logical_devices(device_type)
  if len(devices) <= 1:  # nothing to choose: no counter file either
    return devices[0].name if devices else None
  return devices[claim_load_index(run_token) % len(devices)].name
