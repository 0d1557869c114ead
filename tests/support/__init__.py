"""Helpers shared by integration tests and benchmarks: real servers, real clients."""
