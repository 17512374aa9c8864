"""Checks `pnasnet` against timm's `pnasnet5large`, an independent port of the same checkpoint.

Both networks get identical weights (ours, randomised so that every tensor matters, copied into
timm by name) and the same images; the script prints how far apart their features and logits are.
The aim is a maximum relative error of the features, max|ours - timm| / max|timm|, <= 1e-4; the
exit status is 1 above `--tolerance`. Beside it stands the float32 rounding floor, timm in float32
against timm in float64: random weights amplify rounding, so agreement cannot be much closer.
`--float64` also runs both in float64 where, batch norm folded alike, only summation order differs.
It needs torch and timm, which the project does not depend on: run it from the separate
environment that tools/README.md sets up, from the repository root:

  python -m tools.timm_parity [--seed 0] [--batch 2] [--images sample_images/*.png] [--float64]

How TF-Slim's graph and timm's correspond (nothing is patched in either network; weights are
copied and both graphs run as built):
- Names. timm calls a cell's inputs `x_left` (the previous cell's output, TF-Slim's hidden state
  1) and `x_right` (the current input, hidden state 0), so `{scope}/prev_1x1`, `prev_bn`,
  `path{1,2}_conv` and `final_path_bn` live under timm's `conv_prev_1x1`, and `{scope}/1x1` with
  `beginning_bn` under `conv_1x1`. `comb_iter_i/{left,right}` is `comb_iter_i_{left,right}`; its
  `separable_KxK_j` is `separable_j` (depthwise_conv2d + pointwise_conv2d), `bn_sep_KxK_j` is
  `bn_sep_j`, and the 1x1 projection of a pooling or stride-2 identity branch (`1x1`, `bn_1`) is
  `conv`, `bn`. Batch norm's gamma, beta, moving_mean, moving_variance are weight, bias,
  running_mean, running_var; `final_layer/FC` is `last_linear`.
- Layouts. Conv kernels HWIO -> OIHW; depthwise kernels [k, k, C, 1] -> [C, 1, k, k] (a grouped
  conv with groups=C); FC weights [in, out] -> [out, in].
- Classes. timm's default and released config have 1000 classes, without TF-Slim's background
  class 0; built with num_classes=1001 its classifier has TF-Slim's shape, row for row.
- Input. Ours takes NHWC in [0, 1] and computes (x - 0.5) * 2; timm gets NCHW x * 2 - 1, its
  released config's mean = std = 0.5.
- Padding. timm's pnasnet5large uses pad_type='same': TF's SAME padding (asymmetric, more at the
  bottom/right, when the stride is 2), max pools padded with -inf as TF's SAME pooling ignores the
  border; conv_0 has padding 0, TF-Slim's VALID. timm's `Cell` builds `comb_iter_3_left` without
  pad_type: PyTorch's symmetric padding 1, which for its 3x3 stride-1 kernels is SAME exactly.
  Its factorized reduction's ZeroPad2d((-1, 1, -1, 1)) + AvgPool2d(1, 2) is TF-Slim's
  pad-bottom-right, crop-top-left and 1x1 stride-2 subsampling. Batch norm's epsilon is 0.001 in
  both.
- Imports. torch 2.13.0's CPU build cannot serve: timm imports torchvision unconditionally, and
  PyPI's torchvision wheels need a CUDA torch; tools/README.md installs torch 2.14.1 with its
  matching torchvision (run on the CPU).
"""

import argparse
import copy
import re
import sys
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
# torch and timm before tensorflow: the other order crashes (segmentation fault) as torch's CUDA
# build loads triton's native library after tensorflow's.
import timm
import torch
import tensorflow as tf

from pnasnet import PNASNet, build_model
from pnasnet.network import BATCH_NORM_EPSILON

NUM_CLASSES = 1001  # TF-Slim's: background + the 1000 ImageNet classes.

# TF-Slim scope (the name without its leaf) -> timm module path.
_SCOPES = (
    (r'conv0', 'conv_0.conv'),
    (r'conv0_bn', 'conv_0.bn'),
    (r'final_layer/FC', 'last_linear'),
    (r'(cell_\w+)/1x1', r'\1.conv_1x1.conv'),
    (r'(cell_\w+)/beginning_bn', r'\1.conv_1x1.bn'),
    (r'(cell_\w+)/prev_1x1', r'\1.conv_prev_1x1.conv'),
    (r'(cell_\w+)/prev_bn', r'\1.conv_prev_1x1.bn'),
    (r'(cell_\w+)/path([12])_conv', r'\1.conv_prev_1x1.path_\2.conv'),
    (r'(cell_\w+)/final_path_bn', r'\1.conv_prev_1x1.final_path_bn'),
    (r'(cell_\w+)/comb_iter_(\d)/(left|right)/separable_(\d)x\4_(\d)',
     r'\1.comb_iter_\2_\3.separable_\5'),
    (r'(cell_\w+)/comb_iter_(\d)/(left|right)/bn_sep_(\d)x\4_(\d)',
     r'\1.comb_iter_\2_\3.bn_sep_\5'),
    (r'(cell_\w+)/comb_iter_(\d)/(left|right)/1x1', r'\1.comb_iter_\2_\3.conv'),
    (r'(cell_\w+)/comb_iter_(\d)/(left|right)/bn_1', r'\1.comb_iter_\2_\3.bn'),
)

# TF-Slim leaf -> (timm leaf, axes that turn TF-Slim's layout into PyTorch's; None: as is).
_LEAVES = {
    'gamma': ('weight', None),
    'beta': ('bias', None),
    'moving_mean': ('running_mean', None),
    'moving_variance': ('running_var', None),
    'biases': ('bias', None),
    'depthwise_weights': ('depthwise_conv2d.weight', (2, 3, 0, 1)),  # [k,k,C,1] -> [C,1,k,k]
    'pointwise_weights': ('pointwise_conv2d.weight', (3, 2, 0, 1)),  # HWIO -> OIHW
}
_KERNEL_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}  # 'weights': HWIO -> OIHW, FC [in,out] -> [out,in].


def timm_key(tf_name: str, ndim: int):
  """The timm state_dict key of a TF-Slim variable, and the transpose that converts its layout."""
  scope, leaf = tf_name.rsplit('/', 1)
  for pattern, replacement in _SCOPES:
    match = re.fullmatch(pattern, scope)
    if match:
      module = match.expand(replacement)
      break
  else:
    raise KeyError(f'no timm module for TF-Slim scope {scope!r}')
  if leaf == 'weights':
    return f'{module}.weight', _KERNEL_AXES[ndim]
  if leaf not in _LEAVES:
    raise KeyError(f'no timm parameter for TF-Slim variable {tf_name!r}')
  timm_leaf, axes = _LEAVES[leaf]
  return f'{module}.{timm_leaf}', axes


def timm_state_dict(tf_variables: Mapping[str, tf.Variable],
                    reference: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
  """TF-Slim variables as timm's state_dict, checked to be a shape-preserving bijection.

  Every timm parameter and buffer but batch norm's num_batches_tracked (a training counter that
  inference ignores; kept from `reference`) must get exactly one TF-Slim variable, and every
  TF-Slim variable must land somewhere.
  """
  converted, sources = {}, {}
  for name, var in tf_variables.items():
    key, axes = timm_key(name, len(var.shape))
    if key in sources:
      raise AssertionError(f'{name} and {sources[key]} both map to {key}')
    value = var.numpy()
    converted[key] = torch.from_numpy(np.ascontiguousarray(
        value if axes is None else value.transpose(axes)))
    sources[key] = name
  expected = {k for k in reference if not k.endswith('.num_batches_tracked')}
  unknown, missing = sorted(set(converted) - expected), sorted(expected - set(converted))
  if unknown or missing:
    raise AssertionError(f'not a bijection; TF-Slim variables with no timm tensor: '
                         f'{[sources[k] for k in unknown]}; timm tensors with no TF-Slim variable: '
                         f'{missing}')
  wrong_shapes = [f'{sources[k]} -> {k}: {tuple(v.shape)} vs timm {tuple(reference[k].shape)}'
                  for k, v in converted.items() if v.shape != reference[k].shape]
  if wrong_shapes:
    raise AssertionError('shape mismatches:\n  ' + '\n  '.join(wrong_shapes))
  return {k: converted.get(k, v) for k, v in reference.items()}


def randomize(model: PNASNet, seed: int, calibration_images: np.ndarray) -> None:
  """Random batch-norm parameters and statistics and classifier biases, activations kept O(1).

  The build's batch norm is an identity up to calibration and its biases are zero, so a copying
  slip (gamma for beta, mean for variance) would go unseen; random values expose it. Kernels keep
  their seeded He-normal values. Statistics are calibrated on noise images after gamma and beta
  change, then perturbed so they are not mere functions of the kernels.
  """
  rng = np.random.default_rng([seed, 1])
  draws = {'gamma': lambda n: rng.uniform(0.5, 1.5, n),
           'beta': lambda n: rng.normal(0.0, 0.2, n),
           'biases': lambda n: rng.normal(0.0, 0.1, n)}
  variables = model.variables_by_name
  for name, var in variables.items():
    leaf = name.rsplit('/', 1)[-1]
    if leaf in draws:
      var.assign(draws[leaf](var.shape).astype(np.float32))
  model.calibrate_batch_norm(calibration_images)
  for name, var in variables.items():
    if name.endswith('/moving_variance'):
      scope = name[:-len('/moving_variance')]
      mean = variables[f'{scope}/moving_mean']
      shift = rng.normal(0.0, 0.1, var.shape) * np.sqrt(var.numpy())
      mean.assign((mean.numpy() + shift).astype(np.float32))
      var.assign((var.numpy() * rng.uniform(0.8, 1.25, var.shape)).astype(np.float32))


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
  """Photos as our model takes them: RGB, resized bilinearly to size x size, float32 in [0, 1]."""
  from PIL import Image  # Only for --images.
  images = []
  for path in paths:
    with Image.open(path) as image:
      image = image.convert('RGB').resize((size, size), Image.Resampling.BILINEAR)
      images.append(np.asarray(image, np.float32) / 255.0)
  return np.stack(images)


def compare(label: str, ours: np.ndarray, theirs: np.ndarray) -> float:
  """Prints the errors of `ours` against `theirs`; returns max|ours - theirs| / max|theirs|."""
  diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
  magnitude = np.abs(theirs.astype(np.float64))
  scale = magnitude.max()
  max_relative = diff.max() / scale
  # Per element |a-b|/|b| only where |b| is not negligible; near-zero elements would dominate.
  significant = magnitude >= 1e-3 * scale
  relative = diff[significant] / magnitude[significant]
  print(f'{label} {list(ours.shape)}: max|b| {scale:.4g}, max abs err {diff.max():.3g}, '
        f'max rel err (max|a-b|/max|b|) {max_relative:.3g}')
  print(f'  per element |a-b|/|b| over the {significant.sum()} of {diff.size} elements with '
        f'|b| >= 1e-3 max|b|: median {np.median(relative):.3g}, '
        f'99th percentile {np.percentile(relative, 99):.3g}, max {relative.max():.3g}')
  return max_relative


def timm_outputs(reference: torch.nn.Module, images: np.ndarray):
  """timm's pre-logits features and logits, in the reference's dtype."""
  dtype = next(reference.parameters()).dtype
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype) * 2.0 - 1.0
  with torch.inference_mode():
    feature_map = reference.forward_features(x)
    return (reference.forward_head(feature_map, pre_logits=True).numpy(),
            reference.forward_head(feature_map).numpy())


def fold_batch_norm(tf_variables: Mapping[str, tf.Variable],
                    state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
  """`state` with each batch norm reduced to the float32 scale and offset that ours applies.

  Ours computes gamma * rsqrt(variance + eps) and beta - mean * scale in float32 whatever its
  compute dtype; giving timm those very numbers (mean 0, variance 1 - eps) leaves summation order
  as the only difference between the two in float64.
  """
  folded = dict(state)
  for name, gamma in tf_variables.items():
    if name.endswith('/gamma'):
      scope = name[:-len('/gamma')]
      scale = gamma * tf.math.rsqrt(tf_variables[f'{scope}/moving_variance'] + BATCH_NORM_EPSILON)
      offset = tf_variables[f'{scope}/beta'] - tf_variables[f'{scope}/moving_mean'] * scale
      module = timm_key(name, 1)[0].rsplit('.', 1)[0]
      like = state[f'{module}.running_var']
      folded[f'{module}.weight'] = torch.from_numpy(scale.numpy()).to(like.dtype)
      folded[f'{module}.bias'] = torch.from_numpy(offset.numpy()).to(like.dtype)
      folded[f'{module}.running_mean'] = torch.zeros_like(like)
      folded[f'{module}.running_var'] = torch.full_like(like, 1.0 - BATCH_NORM_EPSILON)
  return folded


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exit status 0 when the features agree within --tolerance."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--config', choices=['large'], default='large',
                      help="timm has only PNASNet-5 large; there is no mobile port")
  parser.add_argument('--seed', type=int, default=0, help='weights, noise images, calibration')
  parser.add_argument('--batch', type=int, default=2, help='seeded noise images, without --images')
  parser.add_argument('--images', nargs='+', help='photos to use instead of noise images')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest acceptable max relative error of the features')
  parser.add_argument('--float64', action='store_true',
                      help='also compare both in float64, where only summation order differs')
  args = parser.parse_args(argv)

  model = build_model(args.config, seed=args.seed, num_classes=NUM_CLASSES)
  size = model.image_size
  rng = np.random.default_rng([args.seed, 2])
  randomize(model, args.seed, rng.random((2, size, size, 3), dtype=np.float32))
  if args.images:
    images = load_images(args.images, size)
  else:
    images = rng.random((args.batch, size, size, 3), dtype=np.float32)

  reference = timm.create_model('pnasnet5large', pretrained=False, num_classes=NUM_CLASSES)
  reference.load_state_dict(timm_state_dict(model.variables_by_name, reference.state_dict()),
                            strict=True)
  reference.eval()
  print(f'timm {timm.__version__} pnasnet5large, torch {torch.__version__}, '
        f'tensorflow {tf.__version__}: {len(model.variables_by_name)} TF-Slim variables mapped '
        f'one-to-one onto timm tensors; {images.shape[0]} {"photo" if args.images else "noise"} '
        f'image(s) of {size}x{size}; a: ours, b: timm')

  features = model(images)
  timm_features, timm_logits = timm_outputs(reference, images)
  feature_error = compare('features', features.numpy(), timm_features)
  compare('logits', model.logits(features).numpy(), timm_logits)
  # What float32 rounding alone moves these features by: timm in float32 against itself in float64.
  reference64 = copy.deepcopy(reference).double()
  compare('float32 rounding floor, a: timm float32, b: timm float64', timm_features,
          timm_outputs(reference64, images)[0])

  if args.float64:
    exact = build_model(args.config, seed=args.seed, num_classes=NUM_CLASSES,
                        compute_dtype='float64')
    for name, var in model.variables_by_name.items():
      exact.variables_by_name[name].assign(var)
    reference64.load_state_dict(fold_batch_norm(model.variables_by_name,
                                                reference64.state_dict()), strict=True)
    # Multiples of 1/256 make both input scalings exact; ours returns float32 features.
    quantized = np.round(images * 256.0) / 256.0
    compare('float64 (batch norm folded as ours folds it, ours cast to float32 at the end)',
            exact(quantized).numpy(), timm_outputs(reference64, quantized)[0])

  passed = feature_error <= args.tolerance
  print(f'features max relative error {feature_error:.3g} '
        f'{"<=" if passed else ">"} tolerance {args.tolerance:g}')
  return 0 if passed else 1


if __name__ == '__main__':
  sys.exit(main())
