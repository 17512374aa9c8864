"""`python run_pipeline.py FLAGS` is `pnasnet-embeddings embed FLAGS` (commands/embed.py)."""

from commands.embed import main

if __name__ == '__main__':
  main()
