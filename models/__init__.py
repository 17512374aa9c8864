"""The model runtime: handles, staging, descriptions, loading, GPUs, shared batches, XLA."""
