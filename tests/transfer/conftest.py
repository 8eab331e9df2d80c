"""Fixtures for the transfer tests (helpers live in transfer_helpers.py)."""
from transfer_helpers import domains, keys, sparse_image  # noqa: F401  (pytest fixtures)
