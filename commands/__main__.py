"""`python -m commands VERB ...`: the same as `pnasnet-embeddings VERB ...`."""

import sys

from commands.cli import main

sys.exit(main())
