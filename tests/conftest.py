"""Shared pytest fixtures for migsec."""
