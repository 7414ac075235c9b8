"""Benchmarks behind `detot bench ...`: each prints a table and writes JSON."""
