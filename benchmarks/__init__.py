"""Benchmarks (`make bench`): they print their figures; targets are checked there, never in timed tests."""
