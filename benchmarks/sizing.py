"""A sizing table for GPU workers: images/s per GPU, hours and GPU-hours per 1M and 100M images.

No GPU has run this project's pipeline yet, so the rates are estimates, each labelled:
- measured here: the network's floating-point operations per image (TensorFlow's profiler on the
  built-in PNASNet-5 Large at 331x331);
- the anchor: this project's one GPU figure, 2,208 images/s on one H200 in bfloat16 at batch
  256 with the graph compiled by XLA (docs/performance.md), which is a fraction of that GPU's peak;
- assumed: a smaller GPU reaches the same fraction of its own peak, or is held back by its
  memory bandwidth in the same ratio as the H200's, whichever is slower (PNASNet's depthwise
  convolutions move much data per operation); peaks from NVIDIA's data sheets, dense, fp16/bf16;
- assumed: reading and decoding keep up (5-11 ms per photo per vCPU, benchmarks/bench_decode.py:
  the 7 vCPUs beside the model on an 8-vCPU worker decode 600-1,400 photos/s), and one GPU per
  worker with `--large_model` (or `--model_copies 1`).

    python -m benchmarks.sizing [--workers 8] [--startup_minutes 10]
"""

import argparse

ANCHOR = {'gpu': 'H200', 'images_per_second': 2208, 'peak_tflops': 989, 'bandwidth_gbs': 4800}
# NVIDIA data sheets: dense fp16/bf16 tensor throughput (TFLOPS) and memory bandwidth (GB/s).
GPUS = {
    'nvidia-tesla-t4': {'machine_type': 'n1-standard-8', 'peak_tflops': 65, 'bandwidth_gbs': 320,
                        'memory_gb': 16},
    'nvidia-l4': {'machine_type': 'g2-standard-8', 'peak_tflops': 121, 'bandwidth_gbs': 300,
                  'memory_gb': 24},
}


def flops_per_image() -> int:
  """Floating-point operations of one forward pass, counted by TensorFlow's profiler."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.python.profiler import model_analyzer, option_builder  # pylint: disable=import-outside-toplevel

  from pnasnet import build_model  # pylint: disable=import-outside-toplevel
  network = build_model('large')
  graph = tf.function(network.__call__).get_concrete_function(
      tf.TensorSpec([1, 331, 331, 3], tf.float32)).graph
  options = option_builder.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  return model_analyzer.profile(graph, options=options).total_float_ops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workers', type=int, default=8)
  parser.add_argument('--startup_minutes', type=float, default=10,
                      help='assumed per job: VM start, image pull, model load (and XLA compiles)')
  args = parser.parse_args()
  flops = flops_per_image()
  efficiency = ANCHOR['images_per_second'] * flops / (ANCHOR['peak_tflops'] * 1e12)
  print(f'measured: {flops / 1e9:.1f} GFLOP per image; the {ANCHOR["gpu"]} anchor reaches '
        f'{efficiency:.1%} of its peak')
  print(f'\n| GPU | machine type | images/s per GPU (estimate: bandwidth-bound / compute-bound) '
        f'| workers | hours per 1M | GPU-hours per 1M | hours per 100M | GPU-hours per 100M |')
  print('|' + ' --- |' * 8)
  for gpu, spec in GPUS.items():
    compute_bound = spec['peak_tflops'] * 1e12 * efficiency / flops
    bandwidth_bound = ANCHOR['images_per_second'] * spec['bandwidth_gbs'] / ANCHOR['bandwidth_gbs']
    rate = min(compute_bound, bandwidth_bound)
    cells = []
    for images in (1e6, 1e8):
      gpu_hours = images / rate / 3600
      cells.append((gpu_hours / args.workers + args.startup_minutes / 60, gpu_hours))
    print(f'| {gpu} | {spec["machine_type"]} | {round(rate)} ({round(bandwidth_bound)} / '
          f'{round(compute_bound)}) | {args.workers} | {cells[0][0]:.2f} | {cells[0][1]:.1f} | '
          f'{cells[1][0]:.1f} | {cells[1][1]:.0f} |')


if __name__ == '__main__':
  main()
