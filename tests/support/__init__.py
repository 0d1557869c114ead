"""Helpers for the integration tests: real servers, real clients (shared parts live in benchmarks/harness.py)."""
