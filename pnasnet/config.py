"""The networks' configurations and input contracts, without TensorFlow: the launcher reads them
for its help text and option checks, which must not wait seconds for TensorFlow's import."""

from typing import List, NamedTuple, Tuple

# Beside saved_model.pb of an export: where the weights came from, so that a pipeline loading the
# export by path labels untrained weights as such (their vectors equal `builtin:...@untrained-seedN`).
EXPORT_MARK = 'pnasnet_export.json'

class InputContract(NamedTuple):
  """What the network takes, kept with it as timm keeps `input_size`, `interpolation` and
  `crop_pct` in a model's pretrained config: RGB float32 in `value_range`, `image_size` square,
  resized as `tf.image.resize` does by default (bilinear, half-pixel centres, no antialiasing) after
  keeping the central `crop_fraction`. It is the TF-Hub image recipe, which the published PNASNet-5
  module shares; `transforms/decode.py` implements it."""
  image_size: int
  value_range: Tuple[float, float] = (0.0, 1.0)
  interpolation: str = 'bilinear'
  half_pixel_centers: bool = True
  antialias: bool = False
  crop_fraction: float = 1.0  # by default the whole image


class PNASNetConfig(NamedTuple):
  """The hyper-parameters of TF-Slim's `large_imagenet_config` / `mobile_imagenet_config`, the
  public name users give it (`builtin:pnasnet_large`) and its input contract."""
  name: str
  public_name: str
  num_cells: int
  num_conv_filters: int
  stem_multiplier: float
  input_contract: InputContract
  num_reduction_layers: int = 2
  filter_scaling_rate: float = 2.0
  num_stem_cells: int = 2

  @property
  def image_size(self) -> int:
    return self.input_contract.image_size

  @property
  def reduction_indices(self) -> List[int]:
    """TF-Slim's `calc_reduction_layers`: reductions evenly spaced over the cells."""
    return [int(float(k) / (self.num_reduction_layers + 1) * self.num_cells)
            for k in range(1, self.num_reduction_layers + 1)]

  @property
  def feature_size(self) -> int:
    final_filters = int(self.num_conv_filters *
                        self.filter_scaling_rate ** self.num_reduction_layers)
    return len(PNASNET5_CELL) * final_filters


CONFIGS = {
    'large': PNASNetConfig('large', 'pnasnet_large', num_cells=12, num_conv_filters=216,
                           stem_multiplier=3.0, input_contract=InputContract(331)),
    'mobile': PNASNetConfig('mobile', 'pnasnet_mobile', num_cells=9, num_conv_filters=54,
                            stem_multiplier=1.0, input_contract=InputContract(224)),
    # Same cell, stem and reductions at a size a 2-core CI runs in milliseconds: for smoke tests,
    # not for embeddings.
    'tiny': PNASNetConfig('tiny', 'pnasnet_tiny', num_cells=3, num_conv_filters=8,
                          stem_multiplier=0.5, input_contract=InputContract(64)),
}
PUBLIC_NAMES = {config.public_name: config for config in CONFIGS.values()}


class Combination(NamedTuple):
  """One of the cell's five pairwise combinations: op(hidden state) + op(hidden state).

  Hidden state 0 is the cell's input after its 1x1 conv, 1 is the (adjusted) previous cell's
  output, and 2.. are earlier combinations of this cell.
  """
  left_input: int
  left_op: str
  right_input: int
  right_op: str


# PNASNet-5: TF-Slim's `PNasNetNormalCell` operations and hiddenstate_indices, pairwise.
PNASNET5_CELL = (
    Combination(1, 'separable_5x5_2', 1, 'max_pool_3x3'),
    Combination(0, 'separable_7x7_2', 0, 'max_pool_3x3'),
    Combination(0, 'separable_5x5_2', 0, 'separable_3x3_2'),
    Combination(4, 'separable_3x3_2', 0, 'max_pool_3x3'),
    Combination(1, 'separable_3x3_2', 0, 'none'),
)
