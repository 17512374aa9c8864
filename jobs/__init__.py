"""The Beam jobs over collections of runs, one module each, with its transforms, its options and
the entry point its command in `embeddings/` calls (lazily: `embeddings` imports without Beam)."""
