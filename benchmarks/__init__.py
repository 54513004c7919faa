"""Benchmarks of fused_rnn against torch.nn: `python -m benchmarks --help`, see README.md.

Modules: shapes (grids), measure (correctness guard, timing, memory), report (environment,
table, plots), schema (the results file and validate()), cli (the command line).
"""
from .schema import SCHEMA_VERSION, validate

__all__ = ["SCHEMA_VERSION", "validate"]
