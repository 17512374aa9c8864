"""TF-Slim name-based checkpoints: read into a `PNASNet` by variable name, and write them."""

from typing import Mapping

import numpy as np
import tensorflow as tf

from pnasnet.network import PNASNet


MAX_LISTED = 20  # names listed per kind of mismatch; the rest are counted


class CheckpointMismatchError(ValueError):
  """The checkpoint lacks variables the network needs, or holds them in other shapes."""


def load_slim_checkpoint(model: PNASNet, checkpoint_prefix: str) -> None:
  """Assigns every network variable from the checkpoint variable of the same TF-Slim name.

  What the feature extractor does not use (global_step, the auxiliary head, the classifier when
  the network has none, optimizer slots) is ignored; anything missing or of another shape is an
  error that lists them all, so a wrong checkpoint is diagnosed in one run.
  """
  reader = tf.train.load_checkpoint(checkpoint_prefix)
  check_variables(model, reader.get_variable_to_shape_map(), checkpoint_prefix)
  for name, var in model.variables_by_name.items():
    var.assign(reader.get_tensor(name))


def check_variables(model: PNASNet, shapes: Mapping[str, list], checkpoint_prefix: str) -> None:
  """Every network variable is in `shapes` with its shape; long lists are summarised, since a
  checkpoint of another network misses hundreds of names and one error should stay readable."""
  missing = sorted(name for name in model.variables_by_name if name not in shapes)
  mismatched = sorted(
      f'{name}: checkpoint {shapes[name]}, network {var.shape.as_list()}'
      for name, var in model.variables_by_name.items()
      if name in shapes and list(shapes[name]) != var.shape.as_list())
  if missing or mismatched:
    lines = [f'{checkpoint_prefix} does not fit PNASNet {model.config.name!r} '
             f'({len(missing)} missing, {len(mismatched)} of another shape):']
    lines += [f'  missing: {name}' for name in missing[:MAX_LISTED]]
    if len(missing) > MAX_LISTED:
      lines.append(f'  ... and {len(missing) - MAX_LISTED} more missing')
    lines += [f'  shape: {entry}' for entry in mismatched[:MAX_LISTED]]
    if len(mismatched) > MAX_LISTED:
      lines.append(f'  ... and {len(mismatched) - MAX_LISTED} more of another shape')
    lines.append('  Is it a checkpoint of this network? pnasnet_large needs '
                 'pnasnet-5_large_2017_12_13/model.ckpt, pnasnet_mobile '
                 'pnasnet-5_mobile_2017_12_13/model.ckpt.')
    raise CheckpointMismatchError('\n'.join(lines))


def save_slim_checkpoint(checkpoint_prefix: str, values: Mapping[str, np.ndarray]) -> None:
  """Writes a name-based (TF1 `Saver` layout) checkpoint, the format TF-Slim releases use."""
  names = sorted(values)
  tf.raw_ops.SaveV2(prefix=checkpoint_prefix, tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tf.convert_to_tensor(values[name]) for name in names])


def model_values(model: PNASNet) -> dict:
  return {name: var.numpy() for name, var in model.variables_by_name.items()}
