"""The commands: `pnasnet-embeddings VERB`, one module a verb, on a floor above everything else.

Each verb parses its flags, checks them, calls the library (embeddings/) or a job (pipeline/,
jobs/) and turns what they raise into one `error:` line and an exit code (commands/common.py).
Nothing below imports this package.
"""
