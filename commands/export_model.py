"""`pnasnet-embeddings export-model`: writes the built-in network as a TF1 Hub module or a TF2
SavedModel with the TF-Hub image feature-vector interface (pnasnet/export.py), from a TF-Slim
checkpoint or from seeded untrained weights (labelled as such).

    pnasnet-embeddings export-model --config large --format tf1_hub \
        --output /tmp/pnasnet_large_hub [--checkpoint pnasnet-5_large_2017_12_13/model.ckpt]
"""

import argparse
import logging
from typing import Optional, Sequence

from commands.common import parse, verb_parser


def build_parser() -> argparse.ArgumentParser:
  from pnasnet import CONFIGS
  from pnasnet.export import EXPORTERS
  parser = verb_parser('export-model', __doc__.split('\n\n')[0], epilog=None)
  parser.add_argument('--config', choices=sorted(CONFIGS), default='large',
                      help='the network\'s size')
  parser.add_argument('--format', choices=sorted(EXPORTERS), default='tf1_hub',
                      help='what to write')
  parser.add_argument('--output', required=True, help='directory to create')
  parser.add_argument('--checkpoint',
                      help='TF-Slim checkpoint prefix (default: seeded untrained weights)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the untrained weights')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = build_parser()
  args, _ = parse(parser, argv, passes_to_beam=False)
  import tensorflow as tf
  from pnasnet import CONFIGS, build_model
  from pnasnet.export import EXPORTERS, write_export_mark
  if tf.io.gfile.exists(args.output) and tf.io.gfile.listdir(args.output):
    parser.error(f'--output {args.output} exists and is not empty; name a new directory')
  if not args.checkpoint:
    logging.warning('no --checkpoint: exporting UNTRAINED seeded weights (seed %d); their '
                    'features are not PNASNet embeddings', args.seed)
  EXPORTERS[args.format](build_model(args.config, args.checkpoint, args.seed), args.output)
  write_export_mark(args.output, args.config, args.checkpoint, args.seed)
  print(f'wrote {args.format} of {CONFIGS[args.config].public_name} to {args.output}')
