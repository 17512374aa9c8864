"""`python -m commands VERB ...`: the same as `pnasnet-embeddings VERB ...`."""

from commands.cli import run

run()
