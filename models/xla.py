"""XLA for the built-in network (--jit_compile) without a compile for every batch size.

XLA compiles once per input shape, and one compile of PNASNet-5 Large takes 1.5 minutes on a GPU;
Beam forms batches of any size up to --max_batch_size. So each batch is padded with zero images to
the next of a few sizes (powers of two, and the maximum), and the padded rows' features dropped:
a process compiles at most log2(max_batch_size) + 1 times.
"""

import logging
import threading
import time
from typing import Callable, List

import tensorflow as tf


def batch_buckets(max_batch_size: int) -> List[int]:
  """1, 2, 4, ... below max_batch_size, then max_batch_size itself."""
  buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
  return buckets + [max_batch_size]


class PaddedXlaFunction:
  """images [B, H, W, 3] -> features [B, D], compiled for a fixed set of batch sizes."""

  def __init__(self, forward: Callable, max_batch_size: int):
    self._function = tf.function(forward, jit_compile=True)  # one trace (compile) per shape
    self._buckets = batch_buckets(max_batch_size)
    self._compiled = set()
    self._compile_lock = threading.Lock()

  def __call__(self, images: tf.Tensor) -> tf.Tensor:
    largest = self._buckets[-1]
    chunks = [self._padded_call(images[start:start + largest])
              for start in range(0, int(images.shape[0]), largest)]
    return chunks[0] if len(chunks) == 1 else tf.concat(chunks, axis=0)

  def compile_count(self) -> int:
    """Shapes traced, hence compiled, so far in this process."""
    return self._function.experimental_get_tracing_count()

  def _padded_call(self, images: tf.Tensor) -> tf.Tensor:
    size = int(images.shape[0])
    bucket = next(b for b in self._buckets if b >= size)
    padded = tf.pad(images, [[0, bucket - size], [0, 0], [0, 0], [0, 0]])
    if bucket in self._compiled:
      return self._function(padded)[:size]
    with self._compile_lock:  # one compile per shape, however many threads arrive at once
      started = time.perf_counter()
      features = self._function(padded)[:size]
      if bucket not in self._compiled:
        features.numpy()  # waits for the compile and the forward pass, on a GPU too
        logging.info('XLA: compiled for batch size %d in %.1f s (one forward pass included)',
                     bucket, time.perf_counter() - started)
        self._compiled.add(bucket)
    return features
