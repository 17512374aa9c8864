"""Forward images/s and peak resident memory of PNASNet-5 on this machine's CPU.

Three ways of running the same weights, each in its own process so that its peak memory is its
own: the in-memory network as a tf.function, the same with XLA (jit_compile), and its TF1-Hub
export loaded with hub.load (what the pipeline runs for a downloaded module).

    python -m benchmarks.bench_network [--config large] [--batches 1 8 16] [--repeats 2] \
        [--variants tf_function tf_function_xla tf1_hub_export]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VARIANTS = ('tf_function', 'tf_function_xla', 'tf1_hub_export')


def measure(variant: str, config: str, batches, repeats: int, export_dir: str) -> dict:
  import numpy as np
  import tensorflow as tf
  from pnasnet import CONFIGS, build_model
  size = CONFIGS[config].image_size
  spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
  if variant == 'tf1_hub_export':
    import tensorflow_hub as hub
    signature = hub.load(export_dir).signatures['image_feature_vector']
    forward = lambda images: signature(images=images)['default']
  else:
    model = build_model(config)
    forward = tf.function(model.__call__, input_signature=spec,
                          jit_compile=variant == 'tf_function_xla')
  rates = {}
  for batch in batches:
    images = tf.constant(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
    forward(images).numpy()  # trace, compile, warm up
    started = time.perf_counter()
    for _ in range(repeats):
      forward(images).numpy()
    rates[batch] = round(batch * repeats / (time.perf_counter() - started), 3)
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'variant': variant, 'images_per_second': rates, 'peak_rss_mib': round(peak_mib)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='large')
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 8, 16])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument('--variant', choices=VARIANTS, help=argparse.SUPPRESS)  # child process
  parser.add_argument('--export_dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.variant:
    print(json.dumps(measure(args.variant, args.config, args.batches, args.repeats,
                             args.export_dir)))
    return

  with tempfile.TemporaryDirectory() as tmp:
    export_dir = os.path.join(tmp, 'module')
    subprocess.run([sys.executable, '-m', 'commands', 'export-model', '--config', args.config,
                    '--format', 'tf1_hub', '--output', export_dir], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f'PNASNet {args.config}, CPU: {os.cpu_count()} cores, repeats {args.repeats}')
    print(f'{"variant":<18}' + ''.join(f'{"batch " + str(b):>12}' for b in args.batches) +
          f'{"peak RSS":>12}')
    for variant in args.variants:
      child = subprocess.run(
          [sys.executable, '-m', 'benchmarks.bench_network', '--variant', variant,
           '--config', args.config, '--repeats', str(args.repeats), '--export_dir', export_dir,
           '--batches', *map(str, args.batches)],
          check=True, capture_output=True, text=True)
      result = json.loads(child.stdout.strip().splitlines()[-1])
      rates = result['images_per_second']
      print(f'{variant:<18}' + ''.join(f'{rates[str(b)]:>8} i/s' for b in args.batches) +
            f'{result["peak_rss_mib"]:>8} MiB', flush=True)


if __name__ == '__main__':
  main()
