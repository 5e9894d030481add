"""Triton kernels. Importing this package requires Triton; the ops layer guards the import."""
