"""The collection's model-based test (tests/test_collection_model.py) for longer: more examples
of longer sequences than the suite's budget allows, with the time it took.

    python -m benchmarks.bench_collection_model --steps 40 --examples 10
"""

import argparse
import os
import subprocess
import sys
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=40, help='rules a sequence runs at most')
  parser.add_argument('--examples', type=int, default=10, help='sequences tried')
  args = parser.parse_args(argv)
  env = dict(os.environ, COLLECTION_MODEL_STEPS=str(args.steps),
             COLLECTION_MODEL_EXAMPLES=str(args.examples))
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p',
                           'no:cacheprovider', 'tests/test_collection_model.py'],
                          cwd=PROJECT, env=env)
  print(f'{args.examples} sequences of up to {args.steps} steps: '
        f'{"passed" if result.returncode == 0 else "FAILED"} in '
        f'{time.perf_counter() - start:.0f} s')
  sys.exit(result.returncode)


if __name__ == '__main__':
  main()
