"""PNASNet-5 (Liu et al., 2018, arXiv:1712.00559) for inference in TensorFlow 2.

The graph is the one TF-Slim builds in `nets/nasnet/pnasnet.py` and `nets/nasnet/nasnet_utils.py`,
and every variable carries its TF-Slim checkpoint name, so the released checkpoint
`pnasnet-5_large_2017_12_13/model.ckpt` loads by name and the features match the TF-Hub module
exported from it. Plain `tf.nn` ops on `tf.Variable`s (no Keras) keep the network usable both
eagerly and inside a TF1 graph, which the TF1-Hub-format export needs.
"""

import threading
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from pnasnet.config import (CONFIGS, PNASNET5_CELL, PUBLIC_NAMES, Combination,  # noqa: F401
                            InputContract, PNASNetConfig)

BATCH_NORM_EPSILON = 0.001
MOVING_STATISTICS = ('moving_mean', 'moving_variance')

# Set while `PNASNet.calibrate_batch_norm` runs its forward pass.
_calibration = threading.local()


# (name, shape) -> initial value. Shapes follow TF-Slim's variable layouts.
Initializer = Callable[[str, Sequence[int]], object]


def seeded_initializer(seed: int) -> Initializer:
  """Untrained but deterministic weights: He-normal (fan-out) kernels, identity batch norm."""
  rng = np.random.default_rng(seed)

  def initialize(name: str, shape: Sequence[int]) -> np.ndarray:
    leaf = name.rsplit('/', 1)[-1]
    if leaf in ('gamma', 'moving_variance'):
      return np.ones(shape, np.float32)
    if leaf in ('beta', 'moving_mean', 'biases'):
      return np.zeros(shape, np.float32)
    if leaf == 'depthwise_weights':
      fan_out = shape[0] * shape[1] * shape[3]
    else:
      fan_out = int(np.prod(shape[:-2])) * shape[-1]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)

  return initialize


def zeros_initializer(name: str, shape: Sequence[int]):
  del name  # every variable alike
  return tf.zeros(shape, tf.float32)


class _Layers:
  """Creates the network's variables under their TF-Slim names, in construction order."""

  def __init__(self, initializer: Initializer):
    self._initializer = initializer
    self.variables: Dict[str, tf.Variable] = {}

  def variable(self, name: str, shape: Sequence[int], trainable: bool = True) -> tf.Variable:
    if name in self.variables:
      raise ValueError(f'variable {name} created twice')
    value = self._initializer(name, list(shape))
    var = tf.Variable(value, name=name, trainable=trainable, dtype=tf.float32)
    self.variables[name] = var
    return var

  def conv(self, scope: str, kernel: int, channels_in: int, channels_out: int,
           stride: int = 1, padding: str = 'SAME') -> 'Conv':
    return Conv(self.variable(f'{scope}/weights', [kernel, kernel, channels_in, channels_out]),
                stride, padding)

  def separable_conv(self, scope: str, kernel: int, channels_in: int, channels_out: int,
                     stride: int) -> 'SeparableConv':
    return SeparableConv(
        self.variable(f'{scope}/depthwise_weights', [kernel, kernel, channels_in, 1]),
        self.variable(f'{scope}/pointwise_weights', [1, 1, channels_in, channels_out]),
        stride)

  def batch_norm(self, scope: str, channels: int) -> 'BatchNorm':
    return BatchNorm(*(self.variable(f'{scope}/{leaf}', [channels],
                                     trainable=leaf not in MOVING_STATISTICS)
                       for leaf in ('gamma', 'beta', 'moving_mean', 'moving_variance')))


class Conv(NamedTuple):
  weights: tf.Variable
  stride: int
  padding: str

  def __call__(self, x):
    return tf.nn.conv2d(x, tf.cast(self.weights, x.dtype), self.stride, self.padding)


class SeparableConv(NamedTuple):
  """slim.separable_conv2d with depth_multiplier 1: the stride is the depthwise step's."""
  depthwise: tf.Variable
  pointwise: tf.Variable
  stride: int

  def __call__(self, x):
    return tf.nn.separable_conv2d(x, tf.cast(self.depthwise, x.dtype),
                                  tf.cast(self.pointwise, x.dtype),
                                  [1, self.stride, self.stride, 1], 'SAME')


class BatchNorm(NamedTuple):
  """Inference batch norm; scale and offset in float32 whatever the compute dtype."""
  gamma: tf.Variable
  beta: tf.Variable
  moving_mean: tf.Variable
  moving_variance: tf.Variable

  def __call__(self, x):
    if getattr(_calibration, 'active', False):
      mean, variance = tf.nn.moments(tf.cast(x, tf.float32), axes=[0, 1, 2])
      self.moving_mean.assign(mean)
      self.moving_variance.assign(variance)
    scale = self.gamma * tf.math.rsqrt(self.moving_variance + BATCH_NORM_EPSILON)
    offset = self.beta - self.moving_mean * scale
    return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)


def _sequential(*layers):
  def apply(x):
    for layer in layers:
      x = layer(x)
    return x
  return apply


def _identity(x):
  return x


class FactorizedReduction(NamedTuple):
  """Halves the resolution losslessly: two 1x1 convs on the even and the odd pixel grids."""
  path1: Conv
  path2: Conv
  bn: BatchNorm

  def __call__(self, x):
    path1 = self.path1(x[:, ::2, ::2, :])
    shifted = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])[:, 1:, 1:, :]
    path2 = self.path2(shifted[:, ::2, ::2, :])
    return self.bn(tf.concat([path1, path2], axis=3))


def _parse_op(op: str):
  """'separable_5x5_2' -> ('separable', 5, 2); 'max_pool_3x3' -> ('max_pool', 3, 1)."""
  if op == 'none':
    return 'none', 1, 1
  if op.startswith('separable_'):
    _, size, repeats = op.split('_')
    return 'separable', int(size.split('x')[0]), int(repeats)
  if op.startswith('max_pool_'):
    return 'max_pool', int(op[len('max_pool_'):].split('x')[0]), 1
  raise ValueError(f'unknown cell operation {op!r}')


class Cell:
  """One PNASNet cell (stem cells included), as nasnet_utils.NasNetABaseCell builds it."""

  def __init__(self, layers: _Layers, scope: str, filters: int, stride: int,
               channels_in: int, channels_prev: Optional[int], prev_needs_reduction: bool,
               spec: Sequence[Combination] = PNASNET5_CELL):
    """`channels_prev` None: the first stem cell, whose previous input is its input, as is."""
    self.spec = tuple(spec)
    if channels_prev is None:
      self.adjust_prev = _identity
      channels_prev = channels_in
    elif prev_needs_reduction:
      # int(filters / 2) per path, as TF-Slim: an odd count (mobile's 27) loses one channel.
      half = filters // 2
      self.adjust_prev = _sequential(tf.nn.relu, FactorizedReduction(
          layers.conv(f'{scope}/path1_conv', 1, channels_prev, half),
          layers.conv(f'{scope}/path2_conv', 1, channels_prev, half),
          layers.batch_norm(f'{scope}/final_path_bn', 2 * half)))
      channels_prev = 2 * half
    elif channels_prev != filters:
      self.adjust_prev = _sequential(tf.nn.relu,
                                     layers.conv(f'{scope}/prev_1x1', 1, channels_prev, filters),
                                     layers.batch_norm(f'{scope}/prev_bn', filters))
      channels_prev = filters
    else:
      self.adjust_prev = _identity
    self.base = _sequential(tf.nn.relu, layers.conv(f'{scope}/1x1', 1, channels_in, filters),
                            layers.batch_norm(f'{scope}/beginning_bn', filters))
    state_channels = [filters, channels_prev]
    self.branches = []
    for i, comb in enumerate(self.spec):
      pair = []
      for side, index, op in (('left', comb.left_input, comb.left_op),
                              ('right', comb.right_input, comb.right_op)):
        op_stride = stride if index < 2 else 1
        pair.append(self._branch(layers, f'{scope}/comb_iter_{i}/{side}', op, op_stride,
                                 state_channels[index], filters))
      self.branches.append(tuple(pair))
      state_channels.append(filters)
    self.channels_out = filters * len(self.spec)

  @staticmethod
  def _branch(layers: _Layers, scope: str, op: str, stride: int, channels_in: int,
              filters: int):
    kind, kernel, repeats = _parse_op(op)
    if kind == 'separable':
      steps = []
      for k in range(1, repeats + 1):
        steps += [tf.nn.relu,
                  layers.separable_conv(f'{scope}/separable_{kernel}x{kernel}_{k}', kernel,
                                        channels_in if k == 1 else filters, filters,
                                        stride if k == 1 else 1),
                  layers.batch_norm(f'{scope}/bn_sep_{kernel}x{kernel}_{k}', filters)]
      return _sequential(*steps)
    if kind == 'max_pool':
      pool = lambda x: tf.nn.max_pool2d(x, kernel, stride, 'SAME')
      if channels_in == filters:
        return pool
      return _sequential(pool, layers.conv(f'{scope}/1x1', 1, channels_in, filters),
                         layers.batch_norm(f'{scope}/bn_1', filters))
    if kind == 'none':
      if stride == 1 and channels_in == filters:
        return _identity
      return _sequential(tf.nn.relu, layers.conv(f'{scope}/1x1', 1, channels_in, filters, stride),
                         layers.batch_norm(f'{scope}/bn_1', filters))
    raise AssertionError(kind)

  def __call__(self, x, prev):
    states = [self.base(x), self.adjust_prev(x if prev is None else prev)]
    for (left, right), comb in zip(self.branches, self.spec):
      states.append(left(states[comb.left_input]) + right(states[comb.right_input]))
    return tf.concat(states[2:], axis=3)


class PNASNet(tf.Module):
  """PNASNet-5 feature extractor: images [B, H, W, 3] in [0, 1] -> features [B, D].

  With `num_classes` it also carries TF-Slim's `final_layer/FC` classifier (`logits`).
  """

  def __init__(self, config: PNASNetConfig, num_classes: Optional[int] = None,
               initializer: Optional[Initializer] = None, compute_dtype=tf.float32):
    super().__init__(name=f'pnasnet_{config.name}')
    self.config = config
    self.num_classes = num_classes
    self.compute_dtype = tf.as_dtype(compute_dtype)
    layers = _Layers(initializer or seeded_initializer(0))

    stem_filters = int(32 * config.stem_multiplier)
    self._conv0 = _sequential(layers.conv('conv0', 3, 3, stem_filters, stride=2,
                                          padding='VALID'),
                              layers.batch_norm('conv0_bn', stem_filters))
    # Resolution level of each output: a cell whose previous input is one level finer than its
    # current input reduces it (TF-Slim compares the two shapes; this is the same test).
    channels, levels = [None, stem_filters], [None, 0]
    self._cells = []
    filter_scaling = 1.0 / config.filter_scaling_rate ** config.num_stem_cells
    scopes = [(f'cell_stem_{i}', 2) for i in range(config.num_stem_cells)]
    for i in range(config.num_cells):
      scopes.append((f'cell_{i}', 2 if i in config.reduction_indices else 1))
    for n, (scope, stride) in enumerate(scopes):
      if n >= config.num_stem_cells and stride == 2:
        filter_scaling *= config.filter_scaling_rate
      cell = Cell(layers, scope, int(config.num_conv_filters * filter_scaling), stride,
                  channels_in=channels[-1], channels_prev=channels[-2],
                  prev_needs_reduction=levels[-2] != levels[-1])
      self._cells.append(cell)
      channels.append(cell.channels_out)
      levels.append(levels[-1] + (stride == 2))
      if n < config.num_stem_cells:
        filter_scaling *= config.filter_scaling_rate
    self.feature_size = channels[-1]
    if num_classes:
      self._fc_weights = layers.variable('final_layer/FC/weights', [self.feature_size,
                                                                    num_classes])
      self._fc_biases = layers.variable('final_layer/FC/biases', [num_classes])
    self.variables_by_name = layers.variables

  @property
  def image_size(self) -> int:
    return self.config.image_size

  def __call__(self, images):
    x = tf.cast((tf.convert_to_tensor(images, tf.float32) - 0.5) * 2.0, self.compute_dtype)
    x = self._conv0(x)
    outputs = [None, x]
    for cell in self._cells:
      outputs.append(cell(outputs[-1], outputs[-2]))
    # The global average in float32 whatever the compute dtype: a 121-term sum in float16 rounds.
    return tf.reduce_mean(tf.cast(tf.nn.relu(outputs[-1]), tf.float32), axis=[1, 2])

  def calibrate_batch_norm(self, images) -> None:
    """Sets every moving mean and variance to its input's statistics on `images`, in order.

    Untrained seeded weights with identity batch norm grow activations ~2x per cell (4e9 at the
    end of `large`); calibrated, the features keep a unit scale, so float16 and tolerances work.
    """
    _calibration.active = True
    try:
      self(images)
    finally:
      _calibration.active = False

  def logits(self, features):
    if not self.num_classes:
      raise ValueError('this network was built without a classifier (num_classes)')
    return tf.matmul(features, self._fc_weights) + self._fc_biases


def count_parameters(model: PNASNet) -> int:
  """Learned parameters, as TF-Slim and timm count them: batch-norm moving statistics excluded."""
  return sum(int(np.prod(v.shape)) for name, v in model.variables_by_name.items()
             if name.rsplit('/', 1)[-1] not in MOVING_STATISTICS)
