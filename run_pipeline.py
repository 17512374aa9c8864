"""`python run_pipeline.py FLAGS` is `pnasnet-embeddings embed FLAGS` (commands/embed.py)."""

import sys

from commands.cli import run

if __name__ == '__main__':
  run(['embed'] + sys.argv[1:])
